"""Drive ppcr-demo in headless Chromium: start the server, upload an image, type an expression,
press Segment, wait for the overlay, and save a screenshot of the page.

    python launch/demo_screenshot.py --checkpoint exports/default --out launch/figures/demo.png

The README's demo picture is made this way, and tests/test_demo.py runs it on the tiny model. Prints,
as one JSON line, what the page showed: both answers, the overlay's pixel size, the details text
and the seconds from the click to the answer. Needs Debian's chromium and chromium-driver (or
--chromium/--chromedriver) and selenium; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from ppcr.common.distributed import free_port
from ppcr.eval.demo import examples

# Chromium on a machine without a network: no background calls, no sandbox as root, no GPU.
CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-quic",
    "--window-size=1400,1000",
)


def start_server(checkpoint: str, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    cmd = [str(Path(sys.executable).parent / "ppcr-demo"), "--checkpoint", checkpoint, "--port", str(port)]
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)


def wait_until_serving(url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"ppcr-demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"ppcr-demo did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def browser(chromium: str, chromedriver: str, profile: Path) -> webdriver.Chrome:
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    return webdriver.Chrome(options=options, service=Service(chromedriver))


def ask(driver: webdriver.Chrome, *, url: str, image: str, expression: str, timeout: float) -> dict:
    """Upload, type, click, wait: what the page shows afterwards."""
    driver.get(url)
    wait = WebDriverWait(driver, timeout)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ppcr-image input[type=file]"))
    upload.send_keys(str(Path(image).resolve()))
    box = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ppcr-expression textarea"))
    box.clear()
    box.send_keys(expression)
    wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#ppcr-image img"))  # the upload is in
    t0 = time.monotonic()
    driver.find_element(By.CSS_SELECTOR, "#ppcr-segment").click()

    def answered(d):  # the overlay has loaded and the details are in (answers may be empty strings)
        img = d.find_elements(By.CSS_SELECTOR, "#ppcr-overlay img")
        facts = d.find_element(By.CSS_SELECTOR, "#ppcr-details").text
        if (
            img
            and "mask" in facts
            and d.execute_script("return arguments[0].complete && arguments[0].naturalWidth", img[0])
        ):
            return img[0]
        return False

    img = wait.until(answered)
    seconds = time.monotonic() - t0
    return {
        "semantic_answer": driver.find_element(By.CSS_SELECTOR, "#ppcr-semantic textarea").get_attribute("value"),
        "spatial_answer": driver.find_element(By.CSS_SELECTOR, "#ppcr-spatial textarea").get_attribute("value"),
        "overlay_size": [
            driver.execute_script("return arguments[0].naturalWidth", img),
            driver.execute_script("return arguments[0].naturalHeight", img),
        ],
        "details": driver.find_element(By.CSS_SELECTOR, "#ppcr-details").text,
        "seconds": round(seconds, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="the screenshot (PNG)")
    default_image, default_expression = examples()[0]
    p.add_argument("--image", default=default_image)
    p.add_argument("--expression", default=default_expression)
    p.add_argument("--chromium", default="/usr/bin/chromium")
    p.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    p.add_argument("--timeout", type=float, default=180.0, help="seconds for the server to start, and for the answer")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    scratch = Path(tempfile.mkdtemp(prefix="ppcr-demo-"))  # the server's log and the browser's profile
    log = scratch / "server.log"
    server = start_server(args.checkpoint, port, log)
    driver = None
    try:
        wait_until_serving(url, server, log, args.timeout)
        driver = browser(args.chromium, args.chromedriver, scratch / "chromium")
        shown = ask(driver, url=url, image=args.image, expression=args.expression, timeout=args.timeout)
        driver.save_screenshot(str(out))
        shown["screenshot"] = str(out)
        print(json.dumps(shown))
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)
    shutil.rmtree(scratch, ignore_errors=True)  # kept when something failed, for its server.log
    return 0


if __name__ == "__main__":
    sys.exit(main())

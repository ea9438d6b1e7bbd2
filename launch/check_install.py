"""Resolve every install the Makefile offers with pip, installing nothing: ``make check-install``.

The Makefile's ``TORCH_SPEC_<name>`` lines are the one list of torch builds (``make install TORCH=<name>``;
the README quotes the same strings, which a test checks). Each is resolved the way ``make install``
installs, with ``pip install --dry-run --ignore-installed --report``:

1. the spec alone, with its own index options (``--index-url https://download.pytorch.org/whl/cpu``);
2. deepspeed and ppcr[dev] from the default index, as ``make install`` adds them afterwards, with torch
   and torchvision pinned at the versions step 1 picked (those later installs must keep that torch).

pip reads only metadata: an index's PEP 658 files where it announces them, else (``fast-deps``) HTTP
range requests for a wheel's METADATA member, so a CUDA torch costs about 1 MB, not its 915 MB wheel
(measured: a mirror that does not announce the PEP 658 files made plain pip download whole wheels).
Nothing is cached. A spec whose index does not answer is reported as skipped, with the reason, never
as passed. Exit status: 1 if any spec fails to resolve, else 0.

    python launch/check_install.py              # every TORCH_SPEC_* of the Makefile
    python launch/check_install.py cu12 --json  # one, as JSON
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYPI = "https://pypi.org/simple"
_SPEC_LINE = re.compile(r"^TORCH_SPEC_(\w+)\s*:?=\s*(.+?)\s*$")
_INDEX_OPTIONS = ("--index-url", "-i", "--extra-index-url")


def torch_specs(makefile: Path = ROOT / "Makefile") -> dict[str, str]:
    """{name: spec} of the Makefile's ``TORCH_SPEC_<name> := <spec>`` lines, in file order."""
    specs = {}
    for line in makefile.read_text().splitlines():
        m = _SPEC_LINE.match(line)
        if m:
            specs[m.group(1)] = m.group(2)
    if not specs:
        raise SystemExit(f"no TORCH_SPEC_<name> lines in {makefile}")
    return specs


def index_urls(args: list[str], default_index: str) -> list[str]:
    """The indexes pip would ask for these arguments: --index-url (or the default) and any extra ones."""
    main, extra = default_index, []
    for opt, value in zip(args, args[1:]):
        if opt in ("--index-url", "-i"):
            main = value
        elif opt == "--extra-index-url":
            extra.append(value)
    return [main, *extra]


def unreachable(url: str, timeout: float = 10.0) -> str | None:
    """Why the index at ``url`` cannot be asked (None if it answers): an HTTP HEAD of its torch page.
    Any HTTP status counts as an answer; only a failed name lookup, connection or timeout does not."""
    if url.startswith("file://"):
        return None if Path(url[7:]).exists() else f"{url} does not exist"
    try:
        urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + "/torch/", method="HEAD"), timeout=timeout)
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError) as e:
        return f"{url} does not answer ({getattr(e, 'reason', e)})"
    return None


def resolve(args: list[str], python: str = sys.executable) -> dict[str, str]:
    """{name: version} that ``pip install <args>`` would install into an empty environment; raises
    RuntimeError with pip's message when the requirements do not resolve."""
    cmd = [
        python,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--ignore-installed",
        "--quiet",
        "--report",
        "-",
        "--no-cache-dir",
        "--use-feature=fast-deps",
        *args,
    ]
    # DS_BUILD_OPS=0 and --no-build-isolation (below) as make install: deepspeed's setup.py imports torch
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "DS_BUILD_OPS": "0"})
    if out.returncode != 0:
        err = [ln for ln in out.stderr.splitlines() if ln.strip() and not ln.startswith("WARNING: ")]
        raise RuntimeError(f"pip {shlex.join(args)} does not resolve:\n" + "\n".join(err[-15:]))
    return {i["metadata"]["name"].lower(): i["metadata"]["version"] for i in json.loads(out.stdout)["install"]}


def check(name: str, spec: str, default_index: str = PYPI) -> dict:
    """Resolve one torch spec and then the rest of ``make install`` on top of it; a dict with status
    "ok" (and the versions picked), "skipped" (an index that does not answer) or "failed", the reason,
    and the seconds it took."""
    t0 = time.monotonic()
    args = shlex.split(spec)
    result = {"name": name, "spec": spec}
    for url in dict.fromkeys(index_urls(args, default_index) + [default_index]):
        why = unreachable(url)
        if why:
            return {**result, "status": "skipped", "reason": why, "seconds": round(time.monotonic() - t0, 1)}
    try:
        torch_env = resolve(args)
        pins = [f"{pkg}=={torch_env[pkg].split('+')[0]}" for pkg in ("torch", "torchvision")]
        rest = resolve(["--index-url", default_index, "--no-build-isolation", *pins, "deepspeed", f"{ROOT}[dev]"])
    except (RuntimeError, KeyError) as e:
        return {**result, "status": "failed", "reason": str(e), "seconds": round(time.monotonic() - t0, 1)}
    picked = {pkg: torch_env[pkg] for pkg in ("torch", "torchvision")}
    picked.update({pkg: rest[pkg] for pkg in ("deepspeed", "transformers", "torchcodec") if pkg in rest})
    return {
        **result,
        "status": "ok",
        "versions": picked,
        "packages": len(rest),
        "seconds": round(time.monotonic() - t0, 1),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("names", nargs="*", help="TORCH_SPEC_<name> names to check (default: all)")
    ap.add_argument("--makefile", type=Path, default=ROOT / "Makefile")
    ap.add_argument(
        "--spec", action="append", default=[], metavar="NAME=SPEC", help="check this spec too (not from the Makefile)"
    )
    ap.add_argument(
        "--default-index",
        default=os.environ.get("PIP_INDEX_URL", PYPI),
        help="the index deepspeed and ppcr come from (default: $PIP_INDEX_URL or PyPI)",
    )
    ap.add_argument("--json", action="store_true", help="print the results as one JSON list")
    a = ap.parse_args(argv)

    specs = torch_specs(a.makefile)
    unknown = [n for n in a.names if n not in specs]
    if unknown:
        ap.error(f"no TORCH_SPEC_{unknown[0]} in {a.makefile} (there are: {', '.join(specs)})")
    todo = {n: specs[n] for n in a.names}
    todo.update(s.split("=", 1) for s in a.spec)
    todo = todo or specs
    results = []
    for name, spec in todo.items():
        r = check(name, spec, default_index=a.default_index)
        results.append(r)
        if not a.json:
            line = f"TORCH={name} [{spec}]: {r['status']} in {r['seconds']} s"
            if r["status"] == "ok":
                line += " -> " + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
            print(line + (f"\n  {r['reason']}" if "reason" in r else ""), flush=True)
    if a.json:
        print(json.dumps(results, indent=1))
    return 1 if any(r["status"] == "failed" for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

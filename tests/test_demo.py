"""ppcr-demo: answers with overlay, both answers and details; every bad input answered with a message;
a checkpoint that does not load ends the command; and the page driven in a real headless Chromium."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_images import exif_rotated_jpeg

from ppcr.eval.demo import MAX_EXPRESSION_CHARS, DemoInputError, RequestHandler, examples
from ppcr.eval.demo import main as demo_main
from ppcr.eval.segmenter import Segmenter

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="module")
def handler(exported):
    return RequestHandler(Segmenter.from_pretrained(exported / "model", device="cpu", batch_size=1))


def test_an_example_gets_the_overlay_both_answers_and_the_details(handler):
    image, expression = examples()[0]
    answer = handler(image, expression)
    with Image.open(image) as im:
        assert answer.overlay.size == im.size
    assert isinstance(answer.semantic_answer, str) and isinstance(answer.spatial_answer, str)
    for fact in ("**mask**", "**box head** (yellow)", "**box in the answer** (cyan)", "**agreement**", "**time**"):
        assert fact in answer.details


@pytest.mark.parametrize(
    "case,message",
    [
        ("no image", "Upload an image"),
        ("empty expression", "Type an expression"),
        ("overlong expression", f"{MAX_EXPRESSION_CHARS + 1} characters; at most {MAX_EXPRESSION_CHARS}"),
        ("missing file", "image not found"),
        ("not an image", "cannot read image"),
        ("huge image", "9000 x 8000 px (72 MP)"),
    ],
)
def test_bad_input_is_answered_with_a_message(handler, tmp_path, case, message):
    image, expression = examples()[0]
    if case == "no image":
        image = None
    elif case == "empty expression":
        expression = "   "
    elif case == "overlong expression":
        expression = "x" * (MAX_EXPRESSION_CHARS + 1)
    elif case == "missing file":
        image = str(tmp_path / "gone.png")
    elif case == "not an image":
        (tmp_path / "fake.png").write_bytes(b"\x89PNG but not really")
        image = str(tmp_path / "fake.png")
    elif case == "huge image":
        Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")
        image = str(tmp_path / "huge.png")
    with pytest.raises(DemoInputError) as caught:
        handler(image, expression)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    "kind,note,shown_size",
    [
        ("grey", "grey scale shown as RGB", (64, 48)),
        ("rgba", "transparency composited over white", (64, 48)),
        ("16-bit", "16-bit grey scaled to 8 bits", (64, 48)),
        ("exif", "rotated as its EXIF orientation (6) says", (40, 60)),
    ],
)
def test_odd_images_are_answered_and_the_page_says_what_was_converted(handler, tmp_path, kind, note, shown_size):
    path = tmp_path / ("photo.jpg" if kind == "exif" else "photo.png")
    if kind == "grey":
        Image.fromarray(np.full((48, 64), 90, np.uint8)).save(path)
    elif kind == "rgba":
        Image.fromarray(np.full((48, 64, 4), 128, np.uint8)).save(path)
    elif kind == "16-bit":
        Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(path)
    else:
        exif_rotated_jpeg(path)
    answer = handler(str(path), "the thing in the middle")
    assert answer.overlay.size == shown_size  # (width, height) as a viewer shows the image
    assert note in answer.details


def test_a_checkpoint_that_does_not_load_ends_the_command_before_serving(tmp_path, capsys):
    assert demo_main(["--checkpoint", str(tmp_path / "no_model"), "--port", "1"]) == 2
    assert f"cannot load {tmp_path / 'no_model'}" in capsys.readouterr().err


def browser_missing() -> str | None:
    missing = [p for p in ("/usr/bin/chromium", "/usr/bin/chromedriver") if not Path(p).exists()]
    if missing:
        return f"no browser here ({', '.join(missing)} missing: apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e .[dev])"
    return None


def test_the_page_answers_in_a_real_browser(handler, exported, tmp_path):
    reason = browser_missing()
    if reason:
        print(f"SKIPPED browser test: {reason}")
        pytest.skip(reason)
    image, expression = examples()[1]
    shot = tmp_path / "demo.png"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "launch/demo_screenshot.py"),
            "--checkpoint",
            str(exported / "model"),
            "--image",
            image,
            "--expression",
            expression,
            "--out",
            str(shot),
            "--timeout",
            "120",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    shown = json.loads(done.stdout.strip().splitlines()[-1])
    expected = handler(image, expression)  # the same model in this process: the page must show its answer
    assert shown["semantic_answer"] == expected.semantic_answer
    assert shown["spatial_answer"] == expected.spatial_answer
    with Image.open(image) as im:
        assert tuple(shown["overlay_size"]) == im.size
    assert "box head (yellow)" in shown["details"] and "agreement" in shown["details"]
    with Image.open(shot) as page:
        assert page.size[0] >= 1000 and page.size[1] >= 700
    print(f"browser answered in {shown['seconds']} s; screenshot {shot}")

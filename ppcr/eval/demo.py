"""``ppcr-demo``: try a trained model by hand in the browser (a Gradio Blocks app).

    ppcr-demo --checkpoint exports/default            # then open http://127.0.0.1:7860
    ppcr-demo --checkpoint runs/default --port 8000 --device cuda

The model loads once, before the server starts; a checkpoint that does not load ends the command
with the reason (exit 2). Requests queue and run one at a time on the loaded model. Each answer is
the overlay (the mask in red, the box head's box in yellow, the box written in the answer in cyan),
both generated answers, the agreement of the two boxes and the time of each stage.

Bad input is answered in the page, never with a stack trace: no image, an empty or overlong
expression, an image that cannot be read (corrupt or truncated: the upload reaches ppcr's own
decoding, not Gradio's), is too large or of a degenerate shape, or one that fails in the model.
Odd images are taken as a viewer shows them (``ppcr.data.images``: EXIF orientation, grey, 16-bit,
transparency) and the page says what was converted. The server binds to 127.0.0.1 unless ``--host``
says otherwise; a public Gradio link only with ``--share``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ppcr.config import ConfigError
from ppcr.data.images import ImageError
from ppcr.eval.segmenter import Segmentation, Segmenter
from ppcr.model.fingerprint import BASE_FLAG

EXAMPLES_DIR = Path(__file__).parent / "demo_examples"
MAX_EXPRESSION_CHARS = 200  # RefCOCOg's longest expressions are under 100 words' worth of characters
DISPLAY_MAX_SIDE = 2048  # larger overlays are shown downscaled (the mask itself is at full resolution)


class DemoInputError(ValueError):
    """A request the demo answers with a message in the page."""


@dataclass
class Answer:
    overlay: Image.Image
    semantic_answer: str
    spatial_answer: str
    details: str  # Markdown: boxes, agreement, timings, conversions


def check_expression(expression: str | None) -> str:
    text = (expression or "").strip()
    if not text:
        raise DemoInputError('Type an expression that says which object to segment, e.g. "the red circle".')
    if len(text) > MAX_EXPRESSION_CHARS:
        raise DemoInputError(
            f"The expression has {len(text)} characters; at most {MAX_EXPRESSION_CHARS} are "
            f"taken. Shorten it to the words that pick out the object."
        )
    return text


class RequestHandler:
    """The one request path of the app around the loaded :class:`ppcr.Segmenter` (also called directly by the
    tests): the checks a page needs, then the answer as the page shows it."""

    def __init__(self, segmenter: Segmenter) -> None:
        self.segmenter = segmenter

    def __call__(self, image_path: str | None, expression: str | None) -> Answer:
        if not image_path:
            raise DemoInputError("Upload an image (or pick one of the examples) first.")
        text = check_expression(expression)
        t0 = time.perf_counter()
        try:
            result = self.segmenter(image_path, text)
        except ImageError as e:
            raise DemoInputError(str(e)) from e
        except (ValueError, RuntimeError) as e:  # in the model: an input the checks let through, or the device
            first = (str(e).strip().splitlines() or [""])[0]
            raise DemoInputError(
                f"This image could not be segmented ({type(e).__name__}: {first}). Try another image, or a smaller one."
            ) from e
        total = time.perf_counter() - t0
        picture = result.overlay()
        notes = list(result.notes)
        if max(picture.size) > DISPLAY_MAX_SIDE:
            notes.append(f"shown at most {DISPLAY_MAX_SIDE} px wide (the image is {picture.width} x {picture.height})")
            picture.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE))
        return Answer(picture, result.semantic_answer, result.spatial_answer, details(result, total=total, notes=notes))


def details(result: Segmentation, *, total: float, notes: list[str]) -> str:
    """The answer's facts as Markdown."""
    h, w = result.mask.shape

    def fmt(box):
        if box is None:
            return "none written"
        x1, y1, x2, y2 = box
        return f"({x1:.0f}, {y1:.0f}) - ({x2:.0f}, {y2:.0f}) px"

    agreement = "-" if result.box_agreement is None else f"{result.box_agreement:.2f}"
    stages = ", ".join(f"{k} {1000 * v:.0f} ms" for k, v in result.timings.items())
    lines = [
        f"- **mask**: {int(result.mask.sum())} px of {w} x {h}",
        f"- **box head** (yellow): {fmt(result.box)}",
        f"- **box in the answer** (cyan): {fmt(result.text_box)}",
        f"- **agreement** of the two boxes (IoU): {agreement}",
        f"- **time**: {1000 * total:.0f} ms ({stages})",
    ]
    if not all(result.stopped.values()):
        missing = [k for k, v in result.stopped.items() if not v]
        lines.append(
            f"- ended (end of sequence or token limit) before its [SEM] / [LOC] token: "
            f"{' and '.join(missing)} stage{'s' if len(missing) > 1 else ''}"
        )
    lines += [f"- *{n}*" for n in notes]
    return "\n".join(lines)


def examples() -> list[list[str]]:
    """[image path, expression] pairs of the bundled examples (held-out images of the synthetic set)."""
    listed = json.loads((EXAMPLES_DIR / "examples.json").read_text())
    return [[str(EXAMPLES_DIR / e["image"]), e["expression"]] for e in listed]


def build_app(handler: RequestHandler, *, title: str):
    """The Gradio Blocks page around ``handler``."""
    import gradio as gr  # only the demo needs it

    def unopened(payload):
        """The uploaded file's path, unopened (Gradio's own image preprocessing opens it with PIL first, so a corrupt
        or truncated upload failed there: a bare "Error" in the page and a traceback in the log); ppcr's decoding
        (ppcr.data.images) answers it. Set on the input element itself rather than in a subclass of gr.Image:
        Gradio's component metaclass writes a .pyi stub beside the module of every subclass."""
        if payload is None or payload.path is None or (payload.url or "").startswith("data:"):
            return image_preprocess(payload)
        return str(payload.path)

    def run(image_path, expression):
        try:
            a = handler(image_path, expression)
        except DemoInputError as e:
            raise gr.Error(str(e), print_exception=False) from None
        return a.overlay, a.semantic_answer, a.spatial_answer, a.details

    with gr.Blocks(title="PPCR referring segmentation") as app:
        gr.Markdown(
            f"## PPCR: referring image segmentation\n{title}. Give an image and an expression that "
            "picks out one object; the model answers in two stages and SAM draws the mask."
        )
        with gr.Row():
            with gr.Column():
                image = gr.Image(
                    type="filepath",
                    image_mode=None,
                    label="image",
                    elem_id="ppcr-image",
                    sources=["upload", "clipboard"],
                )
                image_preprocess, image.preprocess = image.preprocess, unopened
                expression = gr.Textbox(
                    label="expression", placeholder="the red circle on the left", max_lines=3, elem_id="ppcr-expression"
                )
                button = gr.Button("Segment", variant="primary", elem_id="ppcr-segment")
            with gr.Column():
                result = gr.Image(
                    type="pil",
                    label="mask (red), box head (yellow), box in the answer (cyan)",
                    format="png",
                    elem_id="ppcr-overlay",
                    interactive=False,
                )
                semantic = gr.Textbox(label="stage 1: semantic answer", elem_id="ppcr-semantic")
                spatial = gr.Textbox(label="stage 2: spatial answer", elem_id="ppcr-spatial")
                facts = gr.Markdown(elem_id="ppcr-details")
        gr.Examples(examples(), inputs=[image, expression], label="examples (held-out synthetic images)")
        outputs = [result, semantic, spatial, facts]
        button.click(run, inputs=[image, expression], outputs=outputs, api_name="segment")
        expression.submit(run, inputs=[image, expression], outputs=outputs)
    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ppcr-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="saved model (ppcr-export), run directory or checkpoint")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio link (off by default)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--device-map", help="'auto' spreads a large MLLM over the visible GPUs (saved models)")
    p.add_argument(
        BASE_FLAG,
        action="store_true",
        help="load even when the base weights differ from those the model was trained on",
    )
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home from a local demo
    try:
        segmenter = Segmenter.from_pretrained(
            args.checkpoint,
            device=args.device,
            device_map=args.device_map,
            batch_size=1,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError, OSError) as e:
        print(f"error: cannot load {args.checkpoint}: {e}", file=sys.stderr)
        return 2
    title = f"Model: `{args.checkpoint}`" + (f" ({segmenter.tag})" if segmenter.tag else "")
    app = build_app(RequestHandler(segmenter), title=title)
    app.queue(default_concurrency_limit=1)  # one request at a time on the one model; the rest wait
    print(f"ppcr-demo: serving {args.checkpoint} on http://{args.host}:{args.port}", flush=True)
    app.launch(server_name=args.host, server_port=args.port, share=args.share, show_error=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

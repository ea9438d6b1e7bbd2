"""``ppcr-infer``: segment what an expression refers to in your own image.

    ppcr-infer --checkpoint exports/default --image photo.jpg --expression "the red circle" --out out/
    ppcr-infer --checkpoint runs/default --jsonl requests.jsonl --out out/
        (one {"image": "path", "expression": "...", "id": "optional name"} per line)

For each request it writes <id>.mask.png (the mask at the image's resolution), <id>.overlay.png
(mask, the head's box in yellow and the answer's box in cyan over the image) and <id>.json (both
generated answers, the box from the box head and the one parsed from the answer, in pixels and
normalised, their agreement, per-stage timings), through the Python API (ppcr.Segmenter). A bad
request (missing file, unreadable image, empty expression) is reported with its line and skipped;
the others still run, and the exit code is 1 if any failed. The model loads once; requests are
decoded --batch-size at a time (a request's answer does not depend on the others in its batch).
Images are taken as a viewer shows them (EXIF orientation applied; grey, 16-bit and transparent
images converted: ppcr.data.images).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from PIL import Image

from ppcr.config import ConfigError
from ppcr.data.images import ImageError, LoadedImage, load_image
from ppcr.eval.segmenter import Segmentation, Segmenter
from ppcr.model.fingerprint import BASE_FLAG


class RequestError(ValueError):
    pass


def read_requests(args: argparse.Namespace) -> list[tuple[str, dict | None, str | None]]:
    """(where, request, error) per request; ``where`` names the line of a JSONL file."""
    if args.jsonl is None:
        return [("--image/--expression", {"image": args.image, "expression": args.expression, "id": args.id}, None)]
    path = Path(args.jsonl)
    if not path.is_file():
        raise RequestError(f"requests file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            req = json.loads(line)
            if not isinstance(req, dict):
                raise ValueError("not a JSON object")
            out.append((where, req, None))
        except ValueError as e:
            out.append((where, None, f"line is not a request object ({e})"))
    return out


def check(req: dict) -> tuple[LoadedImage, str]:
    expression = str(req.get("expression") or "").strip()
    if not expression:
        raise RequestError("empty expression")
    try:
        loaded = load_image(str(req.get("image") or ""))
    except ImageError as e:
        raise RequestError(str(e)) from e
    for note in loaded.notes:
        print(f"{req.get('image')}: {note}")
    return loaded, expression


def write_outputs(out: Path, name: str, *, req: dict, result: Segmentation) -> None:
    Image.fromarray(result.mask).save(out / f"{name}.mask.png")
    result.overlay().save(out / f"{name}.overlay.png")
    (out / f"{name}.json").write_text(json.dumps({"image": str(req["image"]), **result.to_json()}, indent=1))
    print(f"{name}: {result.expression!r} -> mask of {int(result.mask.sum())} px, box "
          f"{[round(v, 1) for v in result.box]} px")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ppcr-infer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="saved model, run directory or checkpoint directory")
    p.add_argument("--image")
    p.add_argument("--expression")
    p.add_argument("--id", help="output name for --image (default: the image's file name)")
    p.add_argument("--jsonl", help="many requests, one JSON object per line")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together (answers do not depend on it)")
    p.add_argument("--device-map", help="'auto' spreads a large MLLM over the visible GPUs (saved models)")
    p.add_argument(BASE_FLAG, action="store_true", help="load even when the base weights differ from those the "
                   "model was trained on")
    args = p.parse_args(argv)
    if (args.jsonl is None) == (args.image is None):
        p.error("give either --image with --expression, or --jsonl")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, not {args.batch_size}")
    try:
        requests = read_requests(args)
        segmenter = Segmenter.from_pretrained(args.checkpoint, device=args.device, device_map=args.device_map,
                                              batch_size=args.batch_size, allow_base_mismatch=args.allow_base_mismatch)
    except (RequestError, ConfigError, FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed, good = 0, []
    for i, (where, req, error) in enumerate(requests):
        try:
            if error:
                raise RequestError(error)
            image, expression = check(req)
        except RequestError as e:
            failed += 1
            print(f"error: {where}: {e}", file=sys.stderr)
            continue
        name = req.get("id") or f"{Path(req['image']).stem}" + (f"_{i}" if args.jsonl else "")
        good.append((name, req, image, expression))
    for start in range(0, len(good), args.batch_size):
        chunk = good[start: start + args.batch_size]
        results = segmenter([g[2] for g in chunk], [g[3] for g in chunk])
        for (name, req, _, _), result in zip(chunk, results):
            write_outputs(out, name, req=req, result=result)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

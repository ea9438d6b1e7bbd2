"""``ppcr-infer``: segment what an expression refers to in your own image.

    ppcr-infer --checkpoint exports/default --image photo.jpg --expression "the red circle" --out out/
    ppcr-infer --checkpoint runs/default --jsonl requests.jsonl --out out/
        (one {"image": "path", "expression": "...", "id": "optional name"} per line)

For each request it writes <id>.mask.png (the mask at the image's resolution), <id>.overlay.png
(mask, the head's box in yellow and the answer's box in cyan over the image) and <id>.json (both
generated answers, the box from the box head and the one parsed from the answer, in pixels and
normalised, their agreement, per-stage timings), through the Python API (ppcr.Segmenter). A bad
request (missing file, unreadable, truncated or degenerate image, empty expression, an id that cannot be
a file name or is taken) is reported with its line and skipped, and so is one that fails in the model;
the others still run, and the exit code is 1 if any failed. The model loads once; requests are read
and decoded --batch-size at a time, never all held at once (a request's answer does not depend on the
others in its batch).
Images are taken as a viewer shows them (EXIF orientation applied; grey, 16-bit and transparent
images converted: ppcr.data.images).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from ppcr.config import ConfigError
from ppcr.data.images import ImageError, LoadedImage, load_image
from ppcr.eval.segmenter import Segmentation, Segmenter
from ppcr.model.fingerprint import BASE_FLAG


class RequestError(ValueError):
    pass


# An output name: it becomes <id>.mask.png etc. in --out, so nothing that leaves it or hides it (no '/', no '..',
# no leading dot or dash), and short.
SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def read_requests(args: argparse.Namespace) -> Iterator[tuple[str, dict | None, str | None]]:
    """(where, request, error) per request, read as they are used (a requests file of any length is never held
    whole); ``where`` names the line of a JSONL file."""
    if args.jsonl is None:
        yield "--image/--expression", {"image": args.image, "expression": args.expression, "id": args.id}, None
        return
    path = Path(args.jsonl)
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                req = json.loads(line)
                if not isinstance(req, dict):
                    raise ValueError("not a JSON object")
                yield where, req, None
            except ValueError as e:
                yield where, None, f"line is not a request object ({e})"


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


def output_name(req: dict, *, index: int, many: bool, used: dict[str, str], where: str) -> str:
    """The file name stem of a request's outputs: its ``id`` (checked: :data:`SAFE_ID`) or its image's name (with
    the request's position when there are many); a name another request took already is refused."""
    if req.get("id") is not None:
        name = str(req["id"])
        if not SAFE_ID.fullmatch(name):
            raise RequestError(
                f"id {name!r} cannot be a file name: up to 100 letters, digits, '.', '_' and '-', "
                "not starting with '.' or '-'"
            )
    else:
        name = Path(str(req.get("image"))).stem + (f"_{index}" if many else "")
    if name in used:
        raise RequestError(f"id {name!r} is taken by {used[name]}: its outputs would be overwritten")
    used[name] = where
    return name


def write_outputs(out: Path, name: str, *, req: dict, result: Segmentation) -> None:
    Image.fromarray(result.mask).save(out / f"{name}.mask.png")
    result.overlay().save(out / f"{name}.overlay.png")
    (out / f"{name}.json").write_text(json.dumps({"image": str(req["image"]), **result.to_json()}, indent=1))
    print(
        f"{name}: {result.expression!r} -> mask of {int(result.mask.sum())} px, box "
        f"{[round(v, 1) for v in result.box]} px"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ppcr-infer", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, help="saved model, run directory or checkpoint directory")
    p.add_argument("--image")
    p.add_argument("--expression")
    p.add_argument("--id", help="output name for --image (default: the image's file name)")
    p.add_argument("--jsonl", help="many requests, one JSON object per line")
    p.add_argument("--out", required=True)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8, help="requests decoded together (answers do not depend on it)")
    p.add_argument("--device-map", help="'auto' spreads a large MLLM over the visible GPUs (saved models)")
    p.add_argument(
        BASE_FLAG,
        action="store_true",
        help="load even when the base weights differ from those the model was trained on",
    )
    args = p.parse_args(argv)
    if (args.jsonl is None) == (args.image is None):
        p.error("give either --image with --expression, or --jsonl")
    if args.batch_size < 1:
        p.error(f"--batch-size must be at least 1, not {args.batch_size}")
    if args.jsonl is not None and not Path(args.jsonl).is_file():
        print(f"error: requests file not found: {args.jsonl}", file=sys.stderr)
        return 2
    try:
        segmenter = Segmenter.from_pretrained(
            args.checkpoint,
            device=args.device,
            device_map=args.device_map,
            batch_size=args.batch_size,
            allow_base_mismatch=args.allow_base_mismatch,
        )
    except (ConfigError, FileNotFoundError, RuntimeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    failed, batch, used = 0, [], {}
    for i, (where, req, error) in enumerate(read_requests(args)):
        try:
            if error:
                raise RequestError(error)
            name = output_name(req, index=i, many=args.jsonl is not None, used=used, where=where)
            image, expression = check(req)
        except RequestError as e:
            failed += 1
            print(f"error: {where}: {e}", file=sys.stderr)
            continue
        batch.append(Request(where, name, req, image, expression))
        if len(batch) == args.batch_size:  # only one batch of images is held at a time
            failed += segment(segmenter, batch, out)
            batch = []
    if batch:
        failed += segment(segmenter, batch, out)
    return 1 if failed else 0


@dataclass
class Request:
    where: str
    name: str
    req: dict
    image: LoadedImage
    expression: str


def segment(segmenter: Segmenter, batch: list[Request], out: Path) -> int:
    """Segment ``batch`` together and write each answer; returns how many requests failed. A batch that fails in
    the model is tried again request by request, so that one bad request is reported with its line and the
    others are answered (a request's answer does not depend on its batch)."""
    try:
        results = segmenter([r.image for r in batch], [r.expression for r in batch])
    except (ValueError, RuntimeError) as e:  # a request the checks let through, or the device (out of memory)
        if len(batch) > 1:
            return sum(segment(segmenter, [r], out) for r in batch)
        print(
            f"error: {batch[0].where}: could not segment it ({type(e).__name__}: "
            f"{(str(e).strip().splitlines() or [''])[0]})",
            file=sys.stderr,
        )
        return 1
    for r, result in zip(batch, results):
        write_outputs(out, r.name, req=r.req, result=result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

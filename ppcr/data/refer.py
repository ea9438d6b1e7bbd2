"""One reader for the REFER family: RefCOCO, RefCOCO+, RefCOCOg (umd, google) and the synthetic set.

REFER layout (lichengunc/refer): ``<refer_root>/<dataset>/refs(<split_by>).p`` is a pickled list of
refs (ref_id, ann_id, image_id, category_id, split, sentences[{raw, sent, sent_id, tokens}]) and
``<refer_root>/<dataset>/instances.json`` is COCO (images, annotations with polygon or RLE
segmentation and bbox [x, y, w, h], categories).

The refs file is a pickle. It is read only from the path the user gives, and with an unpickler that
builds nothing but lists, dicts, strings and numbers (all a REFER refs file holds): a pickle that
names any class or function, the way a malicious one runs code, is refused. Still, take refs files
only from sources you trust.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

# The split names each (dataset, split_by) publishes.
DATASET_SPLITS: dict[tuple[str, str], tuple[str, ...]] = {
    ("refcoco", "unc"): ("train", "val", "testA", "testB"),
    ("refcoco", "google"): ("train", "val", "test"),
    ("refcoco+", "unc"): ("train", "val", "testA", "testB"),
    ("refcocog", "umd"): ("train", "val", "test"),
    ("refcocog", "google"): ("train", "val"),
    ("synthetic", "unc"): ("train", "val", "testA", "testB"),
}
BOX_TOLERANCE = 1.0  # pixels a COCO box may overhang the image before it counts as outside


@dataclass
class ReferRecord:
    """One ref with everything needed to write its shard sample."""

    ref_id: int
    ann_id: int
    image_id: int
    category_id: int
    category: str
    split: str
    sentences: list[str]
    groups: list[str]  # per sentence, the expression group evaluation reports by (expression_group)
    bbox: list[float]  # COCO [x, y, w, h] in original pixels
    height: int
    width: int
    image_path: str
    segmentation: list | dict  # COCO polygons or RLE


@dataclass
class Rejection:
    file: str
    ref_id: int | None
    kind: str  # short code, counted in the manifest: missing_image, empty_sentence, zero_area_mask, ...
    reason: str

    def to_dict(self) -> dict:
        return asdict(self)


def segmentation_to_mask(segm: list | dict, height: int, width: int) -> np.ndarray:
    """COCO segmentation (polygons, uncompressed or compressed RLE) -> (H, W) uint8 mask in {0, 1}.

    Polygons of one object are merged as a union: overlapping parts stay 1, never 2.
    """
    if isinstance(segm, list):
        polys = [p for p in segm if isinstance(p, (list, tuple)) and len(p) >= 6]
        if not polys:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polys, height, width))
    elif isinstance(segm, dict) and "counts" in segm and "size" in segm:
        if list(segm["size"]) != [height, width]:
            raise ValueError(f"RLE size {list(segm['size'])} differs from the image size {[height, width]}")
        if isinstance(segm["counts"], list):
            rle = mask_utils.frPyObjects(segm, height, width)
        else:
            counts = segm["counts"]
            rle = {"size": list(segm["size"]), "counts": counts.encode() if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"segmentation is neither polygons nor RLE: {type(segm).__name__}")
    return (mask_utils.decode(rle) > 0).astype(np.uint8)


def expression_group(sentence: dict, supercategory: str) -> str:
    """The group an expression is scored in beside its split: its difficulty level where the REFER file
    records one ("level 0" unique attributes, "level 1" size or position, "level 2" relations: the
    synthetic set's own field), else the target's COCO supercategory ("person", "vehicle", ... for the
    RefCOCO family)."""
    level = sentence.get("level")
    return f"level {level}" if isinstance(level, int) and not isinstance(level, bool) else supercategory


def supercategories(categories: list[dict]) -> dict[int, str]:
    """Each COCO category id's supercategory (the group :func:`expression_group` falls back to), its name where
    the category has none."""
    return {c["id"]: str(c.get("supercategory") or c["name"]) for c in categories}


def refer_files(refer_root: str | Path, dataset: str, split_by: str) -> tuple[Path, Path]:
    base = Path(refer_root) / dataset
    return base / f"refs({split_by}).p", base / "instances.json"


class _PlainUnpickler(pickle.Unpickler):
    """Builds only pickle's built-in types; any global (class, function) is refused."""

    def find_class(self, module: str, name: str):
        raise pickle.UnpicklingError(f"it names {module}.{name}; a REFER refs file holds only lists, dicts, "
                                     f"strings and numbers, so it is not loaded (a pickle that names "
                                     f"functions can run code)")


def load_refs(path: Path) -> list:
    """The list of refs in a REFER ``refs(<split_by>).p``, read without running any code."""
    with open(path, "rb") as f:
        try:
            refs = _PlainUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, ValueError) as e:
            raise ValueError(f"{path}: not a plain REFER refs pickle: {e}") from e
    if not isinstance(refs, list):
        raise ValueError(f"{path}: expected a list of refs, got {type(refs).__name__}")
    return refs


def read_refer(refer_root: str | Path, dataset: str, split_by: str, images_dir: str | Path,
               splits: list[str] | None = None) -> tuple[list[ReferRecord], list[Rejection]]:
    """Read a REFER dataset into records, with a rejection for every ref that cannot be used."""
    if (dataset, split_by) not in DATASET_SPLITS:
        known = ", ".join(f"{d}/{s}" for d, s in DATASET_SPLITS)
        raise ValueError(f"unknown dataset/split_by '{dataset}/{split_by}' (known: {known})")
    valid_splits = DATASET_SPLITS[(dataset, split_by)]
    for s in splits or []:
        if s not in valid_splits:
            raise ValueError(f"split '{s}' does not exist in {dataset}/{split_by} (splits: {', '.join(valid_splits)})")
    refs_path, instances_path = refer_files(refer_root, dataset, split_by)
    for p in (refs_path, instances_path):
        if not p.is_file():
            raise FileNotFoundError(f"REFER file not found: {p}")
    refs = load_refs(refs_path)
    instances = json.loads(instances_path.read_text())
    for key in ("images", "annotations", "categories"):
        if key not in instances:
            raise ValueError(f"{instances_path}: missing top-level field '{key}'")
    images = {im["id"]: im for im in instances["images"]}
    anns = {a["id"]: a for a in instances["annotations"]}
    cats = {c["id"]: c["name"] for c in instances["categories"]}
    supercats = supercategories(instances["categories"])
    images_dir = Path(images_dir)
    file = str(refs_path)

    records: list[ReferRecord] = []
    rejected: list[Rejection] = []
    for i, ref in enumerate(refs):
        ref_id = ref.get("ref_id") if isinstance(ref, dict) else None

        def reject(kind: str, reason: str) -> None:
            rejected.append(Rejection(file, ref_id, kind, reason))

        if not isinstance(ref, dict):
            rejected.append(Rejection(file, None, "malformed_record", f"record {i} is not a mapping"))
            continue
        missing = [k for k in ("ref_id", "ann_id", "image_id", "split", "sentences") if k not in ref]
        if missing:
            reject("malformed_record", f"record {i} lacks field(s) {', '.join(missing)}")
            continue
        split = ref["split"]
        if split not in valid_splits:
            reject("unknown_split", f"unknown split '{split}' (splits of {dataset}/{split_by}: {', '.join(valid_splits)})")
            continue
        if splits and split not in splits:
            continue
        ann = anns.get(ref["ann_id"])
        if ann is None:
            reject("missing_annotation", f"annotation {ref['ann_id']} not in {instances_path.name}")
            continue
        image = images.get(ref["image_id"])
        if image is None:
            reject("missing_image_entry", f"image {ref['image_id']} not in {instances_path.name}")
            continue
        category_id = int(ref.get("category_id", ann["category_id"]))
        kept = [(str(s.get("sent", s.get("raw", ""))).strip(), s) for s in ref["sentences"] if isinstance(s, dict)]
        kept = [(text, s) for text, s in kept if text]
        sentences = [text for text, _ in kept]
        groups = [expression_group(s, supercats.get(category_id, str(category_id))) for _, s in kept]
        if not sentences:
            reject("empty_sentence", "empty sentence: the ref has no non-empty expression")
            continue
        image_path = images_dir / image["file_name"]
        if not image_path.is_file():
            reject("missing_image", f"missing image {image_path}")
            continue
        h, w = int(image["height"]), int(image["width"])
        x, y, bw, bh = (float(v) for v in ann["bbox"])
        if bw <= 0 or bh <= 0:
            reject("empty_box", f"empty box {ann['bbox']}")
            continue
        if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + bw > w + BOX_TOLERANCE or y + bh > h + BOX_TOLERANCE:
            reject("box_outside_image", f"box {ann['bbox']} outside the image ({w}x{h})")
            continue
        records.append(ReferRecord(
            ref_id=int(ref["ref_id"]), ann_id=int(ref["ann_id"]), image_id=int(ref["image_id"]),
            category_id=category_id, category=cats.get(category_id, str(category_id)), split=split,
            sentences=sentences, groups=groups, bbox=[x, y, bw, bh], height=h, width=w, image_path=str(image_path),
            segmentation=ann["segmentation"],
        ))
    return records, rejected

"""Expression groups: the synthetic set records each sentence's level without changing a scene, sentence
or split; RefCOCO-family refs fall back to the target's supercategory; the shards carry the group."""

from __future__ import annotations

import hashlib
import json
import pickle
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
from conftest import _ref, _write_refer

from ppcr.config import load_config
from ppcr.data import synthetic
from ppcr.data.refer import expression_group, read_refer, segmentation_to_mask
from ppcr.data.shards import build_shards, decode_sample, iter_tar_samples, load_manifest

ROOT = Path(__file__).parent.parent
# sha256 per split of (pixels, mask, sentences) of every ref of the default recipe's eval splits, taken
# before the generator recorded levels: the default val / testA / testB must stay exactly these.
DEFAULT_EVAL_DIGESTS = {
    "val": "78c09869cfc456cb6c124cfdb9607d4b92c78022838b62122d27e9594393a2b9",
    "testA": "859de059bed096627112624d62ec47fea1b7777c97ed0bdf7e463f362bc09bbe",
    "testB": "03b87cc41dc01fef1d321eea30c9c05dd07ba3e397eb0fad5352b60961389412",
}
RELATION = re.compile(r" (left of|right of|above|below) the ")
SIZE_OR_POSITION = re.compile(r"\b(small|large|left|right|leftmost|rightmost|top|bottom)\b")


def level_from_form(sentence: str) -> int:
    """The level a sentence's wording shows (how the issue's table was read off the predictions)."""
    return 2 if RELATION.search(sentence) else 1 if SIZE_OR_POSITION.search(sentence) else 0


def test_levels_are_recorded_and_the_default_eval_splits_are_unchanged(tmp_path):
    cfg = load_config(ROOT / "launch/configs/default.yaml").data.synthetic
    cfg = replace(cfg, num_images={**cfg.num_images, "train": 0})  # each split is drawn from its own seed
    synthetic.generate(cfg, tmp_path / "refer", tmp_path / "images", workers=2)
    refs = pickle.loads((tmp_path / "refer/synthetic/refs(unc).p").read_bytes())
    instances = json.loads((tmp_path / "refer/synthetic/instances.json").read_text())
    anns = {a["id"]: a for a in instances["annotations"]}
    images = {im["id"]: im for im in instances["images"]}
    first = {}
    for split, _, image_id in synthetic.image_plan(cfg):
        first.setdefault(split, image_id)
    levels = []
    for split, expected in DEFAULT_EVAL_DIGESTS.items():
        h = hashlib.sha256()
        for r in sorted((r for r in refs if r["split"] == split), key=lambda r: r["ref_id"]):
            _, pixels, _, _ = synthetic.draw_image(cfg, split, r["image_id"] - first[split])
            im = images[r["image_id"]]
            mask = segmentation_to_mask(anns[r["ann_id"]]["segmentation"], im["height"], im["width"])
            h.update(hashlib.sha256(pixels.tobytes()).digest())
            h.update(hashlib.sha256(np.packbits(mask).tobytes()).digest())
            h.update(json.dumps([s["sent"] for s in r["sentences"]]).encode())
            levels += [(s["sent"], s["level"]) for s in r["sentences"]]
        assert h.hexdigest() == expected, split
    assert all(level == level_from_form(sentence) for sentence, level in levels)
    assert {level for _, level in levels} == {0, 1, 2}


def test_groups_reach_the_shards_and_their_manifest(tiny_refer, tiny_shards):
    records, _ = read_refer(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"])
    assert all(len(r.groups) == len(r.sentences) for r in records)
    assert {g for r in records for g in r.groups} <= {"level 0", "level 1", "level 2"}
    manifest = load_manifest(tiny_shards)
    for split, entry in manifest["splits"].items():
        seen: dict[str, int] = {}
        for shard in entry["shards"]:
            for raw in iter_tar_samples(tiny_shards / shard["name"]):
                meta = decode_sample(raw)["meta"]
                assert [f"level {level_from_form(s)}" for s in meta["sentences"]] == meta["groups"]
                for g in meta["groups"]:
                    seen[g] = seen.get(g, 0) + 1
        assert seen == entry["groups"] and sum(seen.values()) == entry["expressions"], split


def test_refcoco_refs_are_grouped_by_the_targets_supercategory(tmp_path):
    root = tmp_path / "refer"
    img_dir = tmp_path / "images"
    img_dir.mkdir()
    from PIL import Image

    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(img_dir / "COCO_train2014_000000000001.jpg")
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": 20, "width": 30}]
    poly = [[2.0, 2.0, 12.0, 2.0, 12.0, 12.0, 2.0, 12.0]]
    anns = [
        {
            "id": 10,
            "image_id": 1,
            "category_id": 1,
            "segmentation": poly,
            "bbox": [2, 2, 10, 10],
            "area": 100.0,
            "iscrowd": 0,
        },
        {
            "id": 11,
            "image_id": 1,
            "category_id": 2,
            "segmentation": poly,
            "bbox": [2, 2, 10, 10],
            "area": 100.0,
            "iscrowd": 0,
        },
    ]
    categories = (
        {"id": 1, "name": "man", "supercategory": "person"},
        {"id": 2, "name": "car", "supercategory": "vehicle"},
    )
    refs = [_ref(0, 10, sents=("man on the left", "guy")), {**_ref(1, 11), "category_id": 2}]
    _write_refer(root, images, anns, refs, categories)
    records, rejected = read_refer(root, "refcoco", "unc", img_dir)
    assert not rejected
    assert [r.groups for r in records] == [["person", "person"], ["vehicle"]]
    build_shards(root, "refcoco", "unc", img_dir, tmp_path / "shards", workers=1)
    assert load_manifest(tmp_path / "shards")["splits"]["train"]["groups"] == {"person": 2, "vehicle": 1}
    assert expression_group({"sent": "x", "level": 1}, "person") == "level 1"
    assert expression_group({"sent": "x", "level": True}, "person") == "person"  # not a level

import json
import pickle

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from ppcr.data import synthetic
from ppcr.data.refer import read_refer, segmentation_to_mask
from ppcr.data.shards import build_shards


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_synthetic_round_trip_gives_back_refs_masks_and_boxes(tiny_refer):
    cfg = tiny_refer["cfg"]
    records, rejected = read_refer(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"])
    assert rejected == []
    raw = pickle.load(open(tiny_refer["refer_root"] / "synthetic" / "refs(unc).p", "rb"))
    assert [r.ref_id for r in records] == [r["ref_id"] for r in raw]
    for rec, ref in zip(records, raw):
        assert (rec.ann_id, rec.image_id, rec.category_id, rec.split) == (ref["ann_id"], ref["image_id"], ref["category_id"], ref["split"])
        assert rec.sentences == [s["sent"] for s in ref["sentences"]]
    assert {r.split for r in records} == {"train", "val", "testA", "testB"}
    assert sum(c["refs"] for c in tiny_refer["counts"].values()) == len(records)

    # Masks and boxes agree with what the generator drew, pixel for pixel up to polygon rasterisation.
    plan = {image_id: (split, index) for split, index, image_id in synthetic.image_plan(cfg)}
    for rec in records:
        split, index = plan[rec.image_id]
        scene, pixels, labels, _ = synthetic.draw_image(cfg, split, index)
        drawn = labels == (rec.ann_id - rec.image_id * 100) + 1
        mask = segmentation_to_mask(rec.segmentation, rec.height, rec.width)
        assert mask.shape == (scene.height, scene.width) == pixels.shape[:2]
        assert set(np.unique(mask)) <= {0, 1}
        assert iou(mask.astype(bool), drawn) > 0.95, rec.ref_id
        ys, xs = np.nonzero(drawn)
        x, y, w, h = rec.bbox
        assert abs(x - xs.min()) <= 1.5 and abs(y - ys.min()) <= 1.5
        assert abs(x + w - (xs.max() + 1)) <= 1.5 and abs(y + h - (ys.max() + 1)) <= 1.5


def test_synthetic_is_deterministic_and_splits_by_category(tiny_refer, tmp_path):
    again = synthetic.generate(tiny_refer["cfg"], tmp_path / "refer", tmp_path / "images", workers=1)
    assert again == tiny_refer["counts"]
    a = pickle.load(open(tiny_refer["refer_root"] / "synthetic" / "refs(unc).p", "rb"))
    b = pickle.load(open(tmp_path / "refer" / "synthetic" / "refs(unc).p", "rb"))
    assert a == b
    name = "synthetic_000000000001.jpg"
    assert (tiny_refer["images"] / name).read_bytes() == (tmp_path / "images" / "synthetic" / name).read_bytes()
    sup = {cid: s for cid, _, s in synthetic.CATEGORIES}
    assert {sup[r["category_id"]] for r in a if r["split"] == "testA"} == {"round"}
    assert {sup[r["category_id"]] for r in a if r["split"] == "testB"} == {"angular"}


def test_every_expression_names_exactly_one_object():
    cfg = synthetic.SyntheticConfig(seed=3)
    levels_seen = set()
    for index in range(40):
        scene, _, _, _ = synthetic.draw_image(cfg, "train", index)
        for t, obj in enumerate(scene.objects):
            for level, exprs in synthetic.expressions(scene, t).items():
                for e in exprs:
                    levels_seen.add(level)
                    words = e.split()
                    assert obj.shape in words
                    # Independent check of the attribute words: no other object of the scene has
                    # the same shape together with every colour and size word the phrase uses
                    # for its head noun and no relation or position word.
                    if level == 0:
                        colour = words[1] if len(words) == 3 else None
                        same = [o for o in scene.objects if o.shape == obj.shape and (colour is None or o.colour == colour)]
                        assert same == [obj], e
    assert levels_seen == {0, 1, 2}


def _write_refer(root, images, annotations, refs, categories=({"id": 1, "name": "thing", "supercategory": "x"},)):
    (root / "refcoco").mkdir(parents=True)
    (root / "refcoco" / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": annotations, "categories": list(categories)}))
    with open(root / "refcoco" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f)


def _ref(ref_id, ann_id, image_id=1, split="train", sents=("the thing",)):
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "category_id": 1, "split": split,
            "sent_ids": list(range(len(sents))),
            "sentences": [{"raw": s, "sent": s, "sent_id": i, "tokens": s.split()} for i, s in enumerate(sents)],
            "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg"}


@pytest.fixture
def handmade(tmp_path):
    """A REFER set in RefCOCO's layout: overlapping polygons, compressed and uncompressed RLE, and
    one bad record of each kind."""
    h, w = 40, 60
    img_dir = tmp_path / "train2014"
    img_dir.mkdir()
    Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(img_dir / "COCO_train2014_000000000001.jpg")
    images = [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "height": h, "width": w},
              {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "height": h, "width": w}]  # no file
    rle_mask = np.zeros((h, w), np.uint8, order="F")
    rle_mask[5:15, 30:50] = 1
    compressed = mask_utils.encode(rle_mask)
    compressed["counts"] = compressed["counts"].decode()
    uncompressed = {"size": [h, w], "counts": []}
    flat, prev, run = rle_mask.flatten(order="F"), 0, 0
    for v in flat:
        if v != prev:
            uncompressed["counts"].append(run)
            prev, run = v, 0
        run += 1
    uncompressed["counts"].append(run)
    annotations = [
        # Two overlapping squares, 10x10 each, overlap 5x5: union area 175.
        {"id": 10, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 15, 15], "area": 175,
         "segmentation": [[0, 0, 10, 0, 10, 10, 0, 10], [5, 5, 15, 5, 15, 15, 5, 15]]},
        {"id": 11, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [30, 5, 20, 10], "area": 200,
         "segmentation": compressed},
        {"id": 12, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [30, 5, 20, 10], "area": 200,
         "segmentation": uncompressed},
        {"id": 13, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 1, 1], "area": 0,
         "segmentation": [[0, 0, 0, 0, 0, 0]]},  # zero area
        {"id": 14, "image_id": 1, "category_id": 1, "iscrowd": 0, "bbox": [50, 30, 20, 20], "area": 100,
         "segmentation": [[50, 30, 60, 30, 60, 40, 50, 40]]},  # box beyond the right edge
        {"id": 15, "image_id": 2, "category_id": 1, "iscrowd": 0, "bbox": [0, 0, 5, 5], "area": 25,
         "segmentation": [[0, 0, 5, 0, 5, 5, 0, 5]]},
    ]
    refs = [_ref(0, 10), _ref(1, 11, split="val"), _ref(2, 12, split="testA"), _ref(3, 13),
            _ref(4, 14), _ref(5, 15, image_id=2), _ref(6, 10, sents=("  ",)), _ref(7, 99), _ref(8, 10, split="testC")]
    _write_refer(tmp_path, images, annotations, refs)
    return tmp_path, img_dir


def test_overlapping_polygons_merge_to_binary_mask_and_rle_decodes(handmade):
    root, img_dir = handmade
    records, rejected = read_refer(root, "refcoco", "unc", img_dir)
    by_id = {r.ref_id: r for r in records}
    poly = segmentation_to_mask(by_id[0].segmentation, 40, 60)
    assert poly.max() == 1 and poly.dtype == np.uint8
    assert poly.sum() == 175  # the union, not the sum (which would count the overlap twice)
    assert poly[7, 7] == 1 and poly[12, 12] == 1 and poly[2, 12] == 0
    for ref_id in (1, 2):  # compressed and uncompressed RLE of the same region
        m = segmentation_to_mask(by_id[ref_id].segmentation, 40, 60)
        assert m.sum() == 200 and m[5:15, 30:50].all()
    with pytest.raises(ValueError, match="RLE size"):
        segmentation_to_mask(by_id[1].segmentation, 41, 60)


def test_bad_records_are_rejected_with_file_ref_and_reason(handmade, tmp_path_factory):
    root, img_dir = handmade
    records, rejected = read_refer(root, "refcoco", "unc", img_dir)
    kinds = {r.ref_id: r.kind for r in rejected}
    assert kinds == {4: "box_outside_image", 5: "missing_image", 6: "empty_sentence", 7: "missing_annotation",
                     8: "unknown_split"}
    assert all(r.file.endswith("refs(unc).p") for r in rejected)
    assert "testC" in next(r.reason for r in rejected if r.ref_id == 8)
    assert sorted(r.ref_id for r in records) == [0, 1, 2, 3]

    # The zero-area mask is found when the mask is built; the build goes on with the good refs.
    out = tmp_path_factory.mktemp("hm") / "refcoco_unc"
    manifest = build_shards(root, "refcoco", "unc", img_dir, out, workers=1, max_reject_share=1.0)
    assert manifest["rejected"]["reasons"] == {"box_outside_image": 1, "missing_image": 1, "empty_sentence": 1,
                                               "missing_annotation": 1, "unknown_split": 1, "zero_area_mask": 1}
    lines = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(d["ref_id"], d["kind"]) for d in lines} >= {(3, "zero_area_mask"), (5, "missing_image")}
    assert all({"file", "ref_id", "kind", "reason"} <= set(d) for d in lines)
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 1, "val": 1, "testA": 1}


def test_unknown_dataset_or_split_is_refused(handmade):
    root, img_dir = handmade
    with pytest.raises(ValueError, match="unknown dataset/split_by 'refcoco/umd'"):
        read_refer(root, "refcoco", "umd", img_dir)
    with pytest.raises(ValueError, match="split 'test' does not exist in refcoco/unc"):
        read_refer(root, "refcoco", "unc", img_dir, splits=["test"])

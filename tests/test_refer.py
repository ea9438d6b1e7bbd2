import pickle

import numpy as np
import pytest

from ppcr.data import synthetic
from ppcr.data.refer import read_refer, segmentation_to_mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def test_synthetic_round_trip_gives_back_refs_masks_and_boxes(tiny_refer):
    cfg = tiny_refer["cfg"]
    records, rejected = read_refer(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"])
    assert rejected == []
    raw = pickle.load(open(tiny_refer["refer_root"] / "synthetic" / "refs(unc).p", "rb"))
    assert [r.ref_id for r in records] == [r["ref_id"] for r in raw]
    for rec, ref in zip(records, raw):
        assert (rec.ann_id, rec.image_id, rec.category_id, rec.split) == (
            ref["ann_id"],
            ref["image_id"],
            ref["category_id"],
            ref["split"],
        )
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
                        same = [
                            o for o in scene.objects if o.shape == obj.shape and (colour is None or o.colour == colour)
                        ]
                        assert same == [obj], e
    assert levels_seen == {0, 1, 2}


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

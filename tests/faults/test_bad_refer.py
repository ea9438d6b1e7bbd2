"""Bad REFER input to the shard builder: a report per record, a build of the good ones, and a non-zero
exit only past the configured rejection share."""

import json
import shutil

import pytest

from ppcr.data.cli import main as shards_cli
from ppcr.data.refer import read_refer
from ppcr.data.shards import build_shards, load_manifest, verify_shards


def test_bad_records_are_rejected_with_file_ref_and_reason(handmade, tmp_path_factory):
    root, img_dir = handmade
    records, rejected = read_refer(root, "refcoco", "unc", img_dir)
    kinds = {r.ref_id: r.kind for r in rejected}
    assert kinds == {
        4: "box_outside_image",
        5: "missing_image",
        6: "empty_sentence",
        7: "missing_annotation",
        8: "unknown_split",
    }
    assert all(r.file.endswith("refs(unc).p") for r in rejected)
    assert "testC" in next(r.reason for r in rejected if r.ref_id == 8)
    assert sorted(r.ref_id for r in records) == [0, 1, 2, 3, 9]

    # Zero-area masks (a degenerate polygon, one outside the image) are found when the mask is built;
    # the build goes on with the good refs.
    out = tmp_path_factory.mktemp("hm") / "refcoco_unc"
    manifest = build_shards(root, "refcoco", "unc", img_dir, out, workers=1, max_reject_share=1.0)
    assert manifest["rejected"]["reasons"] == {
        "box_outside_image": 1,
        "missing_image": 1,
        "empty_sentence": 1,
        "missing_annotation": 1,
        "unknown_split": 1,
        "zero_area_mask": 2,
    }
    lines = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert {(d["ref_id"], d["kind"]) for d in lines} >= {
        (3, "zero_area_mask"),
        (9, "zero_area_mask"),
        (5, "missing_image"),
    }
    assert all({"file", "ref_id", "kind", "reason"} <= set(d) for d in lines)
    assert {k: v["samples"] for k, v in manifest["splits"].items()} == {"train": 1, "val": 1, "testA": 1}


def test_unknown_dataset_or_split_is_refused(handmade):
    root, img_dir = handmade
    with pytest.raises(ValueError, match="unknown dataset/split_by 'refcoco/umd'"):
        read_refer(root, "refcoco", "umd", img_dir)
    with pytest.raises(ValueError, match="split 'test' does not exist in refcoco/unc"):
        read_refer(root, "refcoco", "unc", img_dir, splits=["test"])


def test_cli_build_fails_past_reject_share_but_keeps_good_refs(tiny_refer, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(tiny_refer["images"], images)
    files = sorted(images.glob("*.jpg"))
    for f in files[: len(files) // 4]:
        f.unlink()
    out = tmp_path / "partial_unc"
    args = [
        "build",
        "--refer-root",
        str(tiny_refer["refer_root"]),
        "--dataset",
        "synthetic",
        "--split-by",
        "unc",
        "--images",
        str(images),
        "--out",
        str(out),
        "--workers",
        "1",
        "--max-samples",
        "5",
    ]
    assert shards_cli(args + ["--max-reject-share", "0.05"]) == 1
    err = capsys.readouterr().err
    assert "rejected" in err and "rejected.jsonl" in err
    manifest = load_manifest(out)
    assert manifest["rejected"]["reasons"]["missing_image"] == manifest["rejected"]["count"] > 0
    assert verify_shards(out)[0] == []
    assert shards_cli(args + ["--max-reject-share", "0.9"]) == 0
    rejected = [json.loads(line) for line in (out / "rejected.jsonl").read_text().splitlines()]
    assert all(r["kind"] == "missing_image" and r["ref_id"] is not None for r in rejected)

import numpy as np

from ppcr.data.cli import main as shards_cli
from ppcr.data.refer import read_refer, segmentation_to_mask
from ppcr.data.shards import FORMAT_VERSION, build_shards, decode_sample, iter_tar_samples, load_manifest, verify_shards


def test_build_writes_manifest_that_verifies(tiny_refer, tiny_shards):
    manifest = load_manifest(tiny_shards)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["source"]["dataset"] == "synthetic" and manifest["source"]["split_by"] == "unc"
    counts = tiny_refer["counts"]
    for split, info in manifest["splits"].items():
        assert info["samples"] == counts[split]["refs"]
        assert info["expressions"] == counts[split]["sentences"]
        assert all(s["samples"] <= 5 and len(s["sha256"]) == 64 for s in info["shards"])
        assert info["bytes"] == sum((tiny_shards / s["name"]).stat().st_size for s in info["shards"])
    problems, found = verify_shards(tiny_shards)
    assert problems == []
    assert found["samples"] == sum(c["refs"] for c in counts.values())


def test_samples_hold_the_source_image_and_mask(tiny_refer, tiny_shards):
    records, _ = read_refer(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"], splits=["val"])
    by_ref = {r.ref_id: r for r in records}
    seen = 0
    for shard in load_manifest(tiny_shards)["splits"]["val"]["shards"]:
        for raw in iter_tar_samples(tiny_shards / shard["name"]):
            s = decode_sample(raw)
            rec = by_ref[s["meta"]["ref_id"]]
            assert raw["jpg"] == open(rec.image_path, "rb").read()
            assert np.array_equal(s["mask"], segmentation_to_mask(rec.segmentation, rec.height, rec.width))
            assert s["meta"]["sentences"] == rec.sentences and s["meta"]["bbox"] == rec.bbox
            seen += 1
    assert seen == len(records)


def test_build_is_deterministic_and_uses_two_processes(tiny_refer, tiny_shards, tmp_path):
    out = tmp_path / "again"
    build_shards(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"], out, workers=2, max_samples=5)
    a, b = load_manifest(tiny_shards)["splits"], load_manifest(out)["splits"]
    assert {k: [s["sha256"] for s in v["shards"]] for k, v in a.items()} == {
        k: [s["sha256"] for s in v["shards"]] for k, v in b.items()
    }


def test_cli_verify_ok_and_show(tiny_shards, capsys):
    assert shards_cli(["verify", str(tiny_shards)]) == 0
    assert "OK:" in capsys.readouterr().out
    assert shards_cli(["show", str(tiny_shards), "--split", "val", "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("synthetic_unc_") == 2 and "  - the " in out and "mask area" in out

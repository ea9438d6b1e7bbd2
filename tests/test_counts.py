"""Expression counts checked against the REFER source and the published tables, and training images
that an evaluation split shows left out of training."""

import itertools
import json
import shutil

import pytest
import torch
from conftest import _ref, coco_image, make_config, square_annotation, write_refer

from ppcr.data import counts
from ppcr.data.counts import expected_expressions
from ppcr.data.overlap import COCO_POOL, image_pool, plan_exclusions, split_images
from ppcr.data.shards import FORMAT_VERSION, build_shards, load_manifest, sample_key
from ppcr.data.stream import build_train_loader


@pytest.fixture
def rejecting(tmp_path):
    """refcoco/unc with a train split of four refs, two of them rejected (a zero-area mask found at
    encoding, a box outside the image found at reading), and a val ref with one blank expression."""
    img_dir = tmp_path / "train2014"
    img_dir.mkdir()
    images = [coco_image(img_dir, 1), coco_image(img_dir, 2)]
    annotations = [
        square_annotation(10, 1),
        square_annotation(12, 1, x=30),
        square_annotation(14, 2),
        {**square_annotation(11, 1), "segmentation": [[5, 5, 5, 5, 5, 5]]},  # zero area
        square_annotation(13, 1, x=60),
    ]  # box runs 8 px past the right edge
    refs = [
        _ref(0, 10, sents=("the left thing", "thing on the left")),
        _ref(1, 11, sents=("the flat thing", "a line", "nothing at all")),
        _ref(2, 12, sents=("the right thing",)),
        _ref(3, 13, sents=("the thing past the edge",)),
        _ref(4, 14, image_id=2, split="val", sents=("the other thing", "  ")),
    ]
    write_refer(tmp_path / "refer", "refcoco", "unc", images=images, annotations=annotations, refs=refs)
    out = tmp_path / "shards" / "refcoco_unc"
    build_shards(tmp_path / "refer", "refcoco", "unc", img_dir, out, workers=1, max_reject_share=1.0)
    return out


def test_manifest_counts_the_source_split_with_its_rejected_refs(rejecting, monkeypatch):
    train = load_manifest(rejecting)["splits"]["train"]
    assert train["source"] == {"refs": 4, "expressions": 7}  # the rejected refs 1 and 3 included
    assert train["samples"] == 2 and train["expressions"] == 3  # refs 0 and 2 written
    assert train["rejected"] == {"refs": 2, "expressions": 4}
    assert train["image_ids"] == [1] and train["image_refs"] == [2]

    monkeypatch.setattr(counts, "OFFICIAL_EXPRESSIONS", {("refcoco", "unc", "train"): 7})
    c = expected_expressions(rejecting, "train")
    assert (c.source, c.written, c.rejected, c.official) == (7, 3, 4, 7)
    assert c.source - c.written == c.rejected
    # A blank expression of a kept ref is neither written nor rejected: counted apart.
    v = expected_expressions(rejecting, "val")
    assert (v.source, v.written, v.rejected, v.blank, v.official) == (2, 1, 0, 1, None)


def test_a_source_count_that_differs_from_the_published_one_is_refused(rejecting):
    with pytest.raises(ValueError) as e:
        expected_expressions(rejecting, "train")  # the real table: refcoco/unc train has 120624
    msg = str(e.value)
    assert "'train'" in msg and " 7 expressions" in msg and "120624" in msg and str(rejecting) in msg
    with pytest.raises(ValueError, match="has no split 'testC'"):
        expected_expressions(rejecting, "testC")


def test_a_manifest_of_another_format_asks_for_a_rebuild(rejecting, tmp_path):
    """Counts and the images left out of training read the manifest's fields with no fallback: a manifest of
    another format_version (1: from before per-sentence groups, or before source counts and image ids) is
    refused, naming it."""
    old = tmp_path / "old_unc"
    shutil.copytree(rejecting, old)
    manifest = load_manifest(old)
    for version in (None, 1, FORMAT_VERSION + 1):
        manifest["format_version"] = version
        (old / "manifest.json").write_text(json.dumps(manifest))
        refused = (
            rf"{old}/manifest.json: format_version {version} is not {FORMAT_VERSION}, a shard set written by "
            r"another ppcr; rebuild it \('make clean-data shards' for the synthetic set, 'ppcr-shards build'"
        )
        with pytest.raises(ValueError, match=refused):
            expected_expressions(old, "val")
        with pytest.raises(ValueError, match=refused):
            split_images(old, "train")


def test_the_synthetic_set_has_no_published_count_and_drops_nothing(tiny_shards):
    c = expected_expressions(tiny_shards, "val")
    assert c.official is None and c.source == c.written == load_manifest(tiny_shards)["splits"]["val"]["expressions"]
    assert c.rejected == 0
    # The default recipe trains on synthetic train and evaluates on its other splits: no image shared.
    plan = plan_exclusions(
        tiny_shards.parent, make_config(tiny_shards).data.train_sets, make_config(tiny_shards).eval.sets
    )
    assert plan.sets[0].refs == 0 and plan.sets[0].image_ids == frozenset() and plan.missing == []


def keys(dataset, split_by, ref_ids):
    return {sample_key(dataset, split_by, r) for r in ref_ids}


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def pool_config(coco_pool, *overrides):
    return make_config(
        coco_pool["shards_root"] / "refcocog_umd",
        "data.flip_prob=0.0",
        "eval.sets=[{name: refcoco_unc, split: val}, {name: refcoco_unc, split: testA}, "
        "{name: refcocog_umd, split: val}]",
        *overrides,
    )


def test_images_are_one_pool_across_the_refcoco_family():
    assert image_pool("refcoco") == image_pool("refcoco+") == image_pool("refcocog") == COCO_POOL
    assert image_pool("synthetic") == "synthetic"


def test_training_drops_exactly_the_refs_whose_image_an_eval_split_shows(coco_pool, capsys):
    cfg = pool_config(coco_pool)
    loader = build_train_loader(cfg, 0, 1)
    report = capsys.readouterr().out
    assert (
        "exclude_eval_images: dropped 2 training refs of refcocog_umd/train (1 images) whose image is in "
        "refcoco_unc/val (2 refs)"
    ) in report
    seen = {k for b in take(loader, 8) for k in b["keys"]}  # 24 samples: six passes over the 4 kept refs
    assert seen == keys("refcocog", "umd", [202, 203, 204, 205])  # 205 shows a refcoco *train* image: kept
    build_train_loader(cfg, 1, 2)
    assert capsys.readouterr().out == ""  # printed by rank 0 only


def test_nothing_is_dropped_with_exclude_eval_images_false(coco_pool, capsys):
    cfg = pool_config(coco_pool, "data.exclude_eval_images=false")
    seen = {k for b in take(build_train_loader(cfg, 0, 1), 8) for k in b["keys"]}
    assert seen == keys("refcocog", "umd", [200, 201, 202, 203, 204, 205])
    assert "exclude_eval_images" not in capsys.readouterr().out


def test_every_training_set_is_checked_and_the_report_counts_per_set(coco_pool):
    root = coco_pool["shards_root"]
    cfg = pool_config(
        coco_pool,
        "data.train_sets=[{name: refcoco_unc, split: train}, "
        "{name: refcocog_umd, split: train}, {name: refcoco_unc, split: val}]",
        "eval.sets=[{name: refcoco_unc, split: val}, {name: refcoco_nope, split: val}]",
    )
    plan = plan_exclusions(root, cfg.data.train_sets, cfg.eval.sets)
    assert [x.refs for x in plan.sets] == [0, 2, 0]  # refcoco_unc/train shares image 1 only with a training split
    assert plan.sets[1].image_ids == frozenset({2}) and plan.sets[1].by_eval == (("refcoco_unc/val", 2),)
    assert plan.sets[2].is_eval  # trained on an eval split: kept, and said so
    assert plan.missing == ["refcoco_nope/val"]
    report = "\n".join(plan.report())
    assert "refcoco_unc/val is also in eval.sets" in report and "refcoco_nope/val not found" in report


def test_resume_with_excluded_images_is_exact_and_a_state_without_them_is_refused(coco_pool):
    cfg = pool_config(coco_pool)
    full = take(build_train_loader(cfg, 0, 1), 6)
    first = build_train_loader(cfg, 0, 1)
    head = take(first, 3)
    resumed = build_train_loader(cfg, 0, 1)
    resumed.load_state_dict(first.state_dict())
    for x, y in zip(head + take(resumed, 3), full):
        assert x["keys"] == y["keys"] and x["expressions"] == y["expressions"]
        assert torch.equal(x["sam_images"], y["sam_images"])

    unfiltered = build_train_loader(pool_config(coco_pool, "data.exclude_eval_images=false"), 0, 1)
    with pytest.raises(ValueError, match="excluded_images"):
        build_train_loader(cfg, 0, 1).load_state_dict(unfiltered.state_dict())
    with pytest.raises(ValueError, match="excluded_images"):
        unfiltered.load_state_dict(first.state_dict())


def test_evaluation_stops_on_missing_expressions_or_scores_them_as_misses(
    rejecting, tiny_shards, tiny_models, monkeypatch
):
    from conftest import model_config

    from ppcr.common.distributed import DistInfo
    from ppcr.eval.splits import evaluate_splits
    from ppcr.model.model import PPCRModel
    from ppcr.model.predict import PPCR

    monkeypatch.setattr(counts, "OFFICIAL_EXPRESSIONS", {("refcoco", "unc", "train"): 7})
    one = DistInfo(rank=0, world_size=1, local_rank=0, node_rank=0)
    sets = f"eval.sets=[{{name: {rejecting.name}, split: train}}]"
    cfg = model_config(
        tiny_shards, tiny_models, "llava", f"paths.shards_root={rejecting.parent}", sets, "model.max_new_tokens=4"
    )
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
    (failed,) = evaluate_splits(model, cfg, one, synced=False, ablations=[PPCR])
    assert failed.rows == [] and "refcoco_unc/train: the shards hold 3 of the source's 7 expressions" in failed.error
    cfg.eval.on_missing = "score_zero"
    (scored,) = evaluate_splits(model, cfg, one, synced=False, ablations=[PPCR])
    row = scored.rows[0]
    assert row["group"] == "all" and scored.error is None
    assert row["count"] == 7 and row["missing"] == 4  # the 3 written are scored, the 4 rejected are misses
    assert row["Prec@0.5"] <= 3 / 7 and row["BoxAcc@0.5"] <= 3 / 7


def test_training_refuses_an_eval_split_without_shards_unless_opted_out(tiny_shards, tmp_path):
    """Its images could not be left out of training; data.eval_splits_missing_ok or exclude_eval_images off
    lets the run start (and make eval then flags the split, see test_eval)."""
    from ppcr.config import ConfigError
    from ppcr.train.preflight import check_run_inputs

    sets = f"eval.sets=[{{name: {tiny_shards.name}, split: val}}, {{name: nowhere_unc, split: testA}}]"
    with pytest.raises(
        ConfigError,
        match=r"eval split\(s\) nowhere_unc/testA have no shards under .*"
        r"data.eval_splits_missing_ok",
    ):
        check_run_inputs(make_config(tiny_shards, sets), 1, tmp_path / "run")
    check_run_inputs(
        make_config(tiny_shards, sets, "data.eval_splits_missing_ok=[nowhere_unc/testA]"), 1, tmp_path / "run"
    )
    check_run_inputs(make_config(tiny_shards, sets, "data.exclude_eval_images=false"), 1, tmp_path / "run")

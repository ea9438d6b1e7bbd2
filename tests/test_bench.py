import json
import time

import pytest
import torch
from conftest import make_config
from torch.profiler import ProfilerActivity, profile

from ppcr.bench.refer_loader import ReferRandomAccess
from ppcr.bench.report import Figure, paired_ratio
from ppcr.data.shards import decode_sample, iter_tar_samples, load_manifest
from ppcr.data.stream import collate, prepare
from ppcr.data.transforms import Preprocessor
from ppcr.profiling import STAGES, StepProfiler, mark, stage_split


def test_figure_is_the_median_with_its_range_and_ratios_pair_repetitions():
    f = Figure.of([3.0, 1.0, 10.0, 2.0, 4.0], "samples/s")
    assert (f.median, f.min, f.max, f.n) == (3.0, 1.0, 10.0, 5)
    assert f.fmt(1) == "3.0 (1.0-10.0)"
    r = paired_ratio([10.0, 20.0, 30.0], [5.0, 5.0, 10.0])  # per pair: 2, 4, 3
    assert (r.median, r.min, r.max) == (3.0, 2.0, 4.0)
    with pytest.raises(ValueError):
        paired_ratio([1.0], [1.0, 2.0])


def test_stage_split_measures_each_marked_stage_of_a_real_profile():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(2):
            with mark("step"):
                with mark("data"):
                    time.sleep(0.03)
                with mark("backward"):
                    time.sleep(0.01)
                time.sleep(0.005)  # outside every stage
    split = stage_split(prof.events())
    assert split["steps"] == 2 and set(split["stages_ms"]) == set(STAGES)
    data, backward = split["stages_ms"]["data"], split["stages_ms"]["backward"]
    assert 29 <= data <= 45 and 9 <= backward <= 20  # sleeps overshoot on a busy machine, never undershoot
    assert split["stages_ms"]["vision"] == 0
    assert split["step_ms"] >= data + backward + 4.5  # the 5 ms outside every stage
    assert split["other_ms"] == pytest.approx(split["step_ms"] - data - backward)
    assert split["communication_ms"] == 0 and split["collectives_per_step"] == 0


def test_stage_split_refuses_a_profile_without_steps_or_with_unknown_stages():
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with mark("data"):
            pass
    with pytest.raises(ValueError, match="no 'ppcr/step'"):
        stage_split(prof.events())
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        with mark("step"), mark("dat"):
            pass
    with pytest.raises(ValueError, match="unknown stage range 'ppcr/dat'"):
        stage_split(prof.events())


def test_step_profiler_records_only_its_steps_after_a_warm_up_step(tmp_path):
    profiler = StepProfiler(start=3, steps=2, out=tmp_path, rank=1)
    for step in range(1, 6):
        profiler.begin(step)
        with mark("step"), mark("data"):
            time.sleep(0.01 * step)  # steps 3 and 4 are the recorded ones: 30 and 40 ms of data
        profiler.end(step)
    split = json.loads((tmp_path / "rank1.stages.json").read_text())
    assert split["steps"] == 2
    assert 34 <= split["stages_ms"]["data"] <= 45
    assert json.loads((tmp_path / "rank1.trace.json").read_text())["traceEvents"]


def test_the_random_access_baseline_delivers_what_the_shard_reader_does(tiny_refer, tiny_shards):
    """Both loaders of the data benchmark do the same work: same refs, masks, boxes, images and fields (collate
    takes both)."""
    cfg = make_config(tiny_shards)
    baseline = ReferRandomAccess(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"], "train", cfg.model)
    by_ref = {ref["ref_id"]: i for i, ref in enumerate(baseline.refs)}
    pre = Preprocessor.from_config(cfg.model)
    mean, std = (
        torch.tensor(cfg.model.sam_pixel_mean).view(3, 1, 1),
        torch.tensor(cfg.model.sam_pixel_std).view(3, 1, 1),
    )
    shard = load_manifest(tiny_shards)["splits"]["train"]["shards"][0]
    checked, batches = 0, {"ours": [], "theirs": []}
    for raw in iter_tar_samples(tiny_shards / shard["name"]):
        sample = decode_sample(raw)
        ours = prepare(sample, 0, False, pre)
        theirs = baseline[by_ref[sample["meta"]["ref_id"]]]
        assert set(ours) == set(theirs)
        meta = sample["meta"]
        assert theirs["group"] == meta["groups"][meta["sentences"].index(theirs["expression"])]
        batches["ours"].append(ours)
        batches["theirs"].append(theirs)
        assert torch.equal(ours["mask"], theirs["mask"]) and torch.equal(ours["box"], theirs["box"])
        assert ours["input_size"] == theirs["input_size"] and ours["original_size"] == theirs["original_size"]
        assert theirs["expression"] in sample["meta"]["sentences"] and ours["category"] == theirs["category"]
        h, w = ours["input_size"]
        normalised = (ours["sam_image"].float() - mean) / std  # what the model does on the device
        assert (normalised[:, :h, :w] - theirs["sam_image"][:, :h, :w]).abs().max() <= 1.01 / 57.12  # one level
        assert (ours["mllm_image"].int() - theirs["mllm_image"].int()).abs().max() <= 1
        agree = (ours["sam_mask"] == theirs["sam_mask"]).float().mean()
        assert agree > 0.99
        checked += 1
    assert checked == shard["samples"]
    ours, theirs = collate(batches["ours"]), collate(batches["theirs"])
    assert set(ours) == set(theirs) and ours["ref_ids"] == theirs["ref_ids"]

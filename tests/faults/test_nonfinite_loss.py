"""NaN and Inf losses: skipped and counted on every rank alike; after train.max_nonfinite_steps in a
row the run stops, names the loss term and step, and leaves only finite checkpoints."""

import json
import math
import os
from pathlib import Path

import torch
from launching import deepspeed_cmd, overrides, run

from ppcr.train.nonfinite import NAMES, NonfiniteGuard, NonfiniteLossError

INJECT = Path(__file__).parent / "inject.py"


def terms(**bad):
    out = {name: torch.tensor(1.0) for name in NAMES}
    out.update({k: torch.tensor(v) for k, v in bad.items()})
    return out


def test_guard_counts_skips_and_stops_after_k_in_a_row():
    guard = NonfiniteGuard(max_in_a_row=2)
    assert guard.finite(terms())
    guard.end_step(1, 1, 1)
    assert not guard.finite(terms(giou=math.nan, loss=math.nan))
    guard.end_step(2, 0, 1)
    assert guard.skipped_steps == 1 and guard.in_streak
    assert guard.finite(terms())
    guard.end_step(3, 1, 1)  # a finite step ends the streak
    assert not guard.in_streak
    assert not guard.finite(terms(bce=math.inf, loss=math.inf))
    guard.end_step(4, 0, 1)
    assert not guard.finite(terms(bce=math.nan, loss=math.nan))
    try:
        guard.end_step(5, 0, 1)
    except NonfiniteLossError as e:
        assert "bce" in str(e) and "step 5" in str(e) and "4-5" in str(e)
    else:
        raise AssertionError("two non-finite steps in a row did not stop the run")
    assert guard.skipped_steps == 3 and guard.skipped_micro_batches == 3


def test_nan_on_one_rank_skips_the_step_on_both_then_stops_the_run(tiny_shards, tiny_models, tmp_path):
    # Rank 1 only: its giou is NaN in forward calls 6 (step 3, second micro-batch), 9-10 (all of step 5)
    # and from 15 on (steps 8, 9, 10); rank 0's losses stay finite throughout.
    fault = {"nan": "giou", "calls": [6, 9, 10, *range(15, 40)], "rank": 1}
    args = overrides(
        tiny_shards,
        tiny_models,
        tmp_path,
        "train.max_steps=20",
        "train.grad_accum=2",
        "train.save_every=2",
        "train.max_nonfinite_steps=3",
        "train.run_name=nan",
    )
    done = run(deepspeed_cmd(args, INJECT), env=dict(os.environ, PPCR_FAULT=json.dumps(fault)))
    assert done.returncode != 0
    assert "error: loss term(s) giou not finite at step 10" in done.stderr and "steps 8-10" in done.stderr
    lines = [json.loads(line) for line in (tmp_path / "nan/metrics.jsonl").read_text().splitlines()]
    train = {d["step"]: d for d in lines if d["kind"] == "train"}
    assert sorted(train) == list(range(1, 10))  # step 10 stopped the run before it was logged
    # Logged by rank 0, whose own loss was finite: the ranks agreed.
    assert (train[3]["nonfinite_micro_batches"], train[3]["nonfinite_steps"]) == (1, 0)  # update from the other
    assert train[5]["nonfinite_steps"] == 1 and "loss" not in train[5]  # no finite micro-batch: no update
    assert train[9]["nonfinite_steps"] == 3 and train[9]["nonfinite_micro_batches"] == 7
    for step in (1, 2, 3, 4, 6, 7):
        assert math.isfinite(train[step]["loss"]) and math.isfinite(train[step]["giou"]), step
    # Training went on after the transient NaNs (steps 6 and 7 learn from finite losses), and nothing
    # was saved while the loss was NaN: checkpoints 4 and 6 (keep_last 2), none at 8 or 10.
    ckpts = tmp_path / "nan/checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert sorted(p.name for p in ckpts.iterdir() if p.is_dir()) == ["step_00000004", "step_00000006"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpts), tag="step_00000006")
    assert state and all(torch.isfinite(v).all() for v in state.values())

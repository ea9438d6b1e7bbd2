"""Corrupt shards: a truncated shard, an undecodable JPEG, malformed JSON, a missing mask and an
unexpected member are skipped, counted and logged with shard and key; training goes on and reports
the count; `ppcr-shards verify` finds every one."""

import itertools
import json
import logging

from conftest import make_config, train_set

from ppcr.data.cli import main as shards_cli
from ppcr.data.shards import verify_shards
from ppcr.data.stream import EvalStream, ShardSet, build_train_loader
from ppcr.data.transforms import Preprocessor


def take(loader, n):
    return list(itertools.islice(iter(loader), n))


def test_corrupt_data_is_skipped_counted_and_logged(corrupted, caplog):
    out, shards, keys = corrupted
    cfg = make_config(out)
    with caplog.at_level(logging.WARNING, logger="ppcr.data.stream"):
        loader = build_train_loader(cfg, 0, 1)
        batches = take(loader, 40)  # more than one epoch of the 24 train refs
    assert len(batches) == 40
    assert loader.state_dict()["skipped_samples"] >= 5  # truncated shard + four broken samples
    text = caplog.text
    for k in keys.values():
        assert k in text
    assert str(shards[0].name) in text
    seen = {k for b in batches for k in b["keys"]}
    assert not seen & set(keys.values())

    # The eval stream skips them too, and evaluation goes on.
    spec = train_set(out, "train")
    n = sum(
        len(b["keys"])
        for b in EvalStream(ShardSet.open(out.parent, spec), Preprocessor.from_config(cfg.model), 4, 0, 1)
    )
    assert n > 0


def test_verify_finds_every_corruption(corrupted, capsys):
    out, shards, keys = corrupted
    problems, _ = verify_shards(out)
    text = "\n".join(problems)
    assert f"{shards[0]}: sha256" in text and f"{shards[0]}: unreadable tar" in text
    assert f"sample {keys['jpg']}: jpg does not decode" in text
    assert f"sample {keys['json']}: json does not parse" in text
    assert f"sample {keys['mask']}: missing field(s) mask.png" in text
    assert f"sample {keys['pyd']}: unexpected member(s) pyd" in text
    assert not (out.parent / "pwned").exists()  # the pickle member was never unpickled
    assert shards_cli(["verify", str(out)]) == 1
    assert "FAILED" in capsys.readouterr().err
    assert shards_cli(["verify", str(out), "--quick"]) == 1


def test_training_on_corrupt_shards_goes_on_and_reports_the_count(corrupted, tiny_models, tmp_path):
    from launching import deepspeed_cmd, overrides, run
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, shards, keys = corrupted
    # 40 steps x 2 ranks x 2 samples: more than one epoch of the 72 train refs, so every fault is met.
    args = overrides(
        out,
        tiny_models,
        tmp_path,
        "train.max_steps=40",
        "train.save_every=100",
        "train.log_every=5",
        "train.run_name=corrupt",
    )
    done = run(deepspeed_cmd(args))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    logged = done.stdout + done.stderr
    for k in keys.values():  # each bad sample named with its shard
        assert any(k in line and ".tar" in line for line in logged.splitlines()), k
    assert "skipping broken shard data" in logged and shards[0].name in logged
    summary = next(line for line in done.stdout.splitlines() if line.startswith("done at step 40"))
    count = int(summary.split("skipped samples: ")[1].split(";")[0])
    assert count >= 5  # the truncated shard and four broken samples, over both ranks
    final = tmp_path / "corrupt/checkpoints/step_00000040"
    per_rank = [json.loads((final / f"ppcr_rank{r}.json").read_text())["loader"]["skipped_samples"] for r in (0, 1)]
    assert sum(per_rank) == count and min(per_rank) > 0  # both ranks met some
    acc = EventAccumulator(str(tmp_path / "corrupt/tensorboard"))
    acc.Reload()
    assert acc.Scalars("train/skipped_samples")[-1].value == count  # summed over ranks, as in the summary

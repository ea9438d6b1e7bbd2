"""Corrupt shards: a truncated shard, an undecodable JPEG, malformed JSON, a missing mask and an
unexpected member are skipped, counted and logged with shard and key; training goes on and reports
the count; `ppcr-shards verify` finds every one."""

import itertools
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
    n = sum(len(b["keys"]) for b in EvalStream(ShardSet.open(out.parent, spec), Preprocessor.from_config(cfg.model), 4, 0, 1))
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

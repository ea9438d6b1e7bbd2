"""Data pipeline throughput per loader worker: ppcr's shard reader against a random-access REFER
loader of the kind peers use, on the same refs; and what a resume costs at an early and a late step.

Both run in this process with one thread, which is what one DataLoader worker gets, and time
read + decode + preprocess + collate of whole batches. Repetitions alternate between the two
loaders, so the ratio of each pair is measured under the same machine conditions.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from ppcr.bench.refer_loader import ReferRandomAccess, build_refer_loader
from ppcr.bench.report import Figure, paired_ratio
from ppcr.config import Config
from ppcr.data import synthetic
from ppcr.data.stream import ShardSet, TrainStream, build_train_loader
from ppcr.data.transforms import Preprocessor


@contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def shard_batches(cfg: Config) -> Iterator[dict]:
    """The training stream of one worker (rank 0 of 1, loader worker 0 of 1), as the trainer reads it."""
    sets = [ShardSet.open(cfg.paths.shards_root, s) for s in cfg.data.train_sets]
    stream = TrainStream(
        sets,
        Preprocessor.from_config(cfg.model),
        cfg.train.micro_batch_size,
        cfg.train.seed,
        0,
        1,
        cfg.data.shuffle_buffer,
        cfg.data.flip_prob,
    )
    return iter(stream)


def refer_batches(cfg: Config) -> Iterator[dict]:
    """The random-access baseline over the REFER files the shards were built from."""
    dataset = ReferRandomAccess(
        cfg.paths.refer_root,
        synthetic.DATASET,
        "unc",
        Path(cfg.paths.images_root) / synthetic.DATASET,
        "train",
        cfg.model,
        cfg.train.seed,
    )
    return iter(build_refer_loader(dataset, cfg.train.micro_batch_size, num_workers=0, seed=cfg.train.seed))


def _rate(batches: Iterator[dict], n: int) -> float:
    t0, samples = time.perf_counter(), 0
    for _ in range(n):
        samples += len(next(batches)["keys"])
    return samples / (time.perf_counter() - t0)


def run(cfg: Config, reps: int = 5, batches: int = 100, warmup: int = 20) -> dict:
    """Samples/s per worker of both loaders and their paired ratio."""
    with threads(1):
        shards, refer = shard_batches(cfg), refer_batches(cfg)
        _rate(shards, warmup)  # fills the shuffle buffer, opens the first shards
        _rate(refer, warmup)
        a, b = [], []
        for _ in range(reps):
            a.append(_rate(shards, batches))
            b.append(_rate(refer, batches))
    return {
        "shard_reader": Figure.of(a, "samples/s"),
        "refer_loader": Figure.of(b, "samples/s"),
        "speedup": paired_ratio(a, b),
        "batch_size": cfg.train.micro_batch_size,
        "batches_per_rep": batches,
    }


def _first_batch_seconds(cfg: Config, state: dict, rank: int, world_size: int) -> float:
    loader = build_train_loader(cfg, rank, world_size)
    loader.load_state_dict(json.loads(json.dumps(state)))  # as a checkpoint stores it
    t0 = time.perf_counter()
    next(iter(loader))
    return time.perf_counter() - t0


def resume_cost(cfg: Config, *, steps: tuple[int, int], reps: int = 3, world_size: int = 2) -> dict:
    """Time from building a resumed training loader (rank 0 of ``world_size``, the recipe's loader
    workers) to its first batch, at an early and a late step. Repetitions alternate between the two."""
    states = {}
    for step in steps:
        loader = build_train_loader(cfg, 0, world_size)
        batches = iter(loader)
        for _ in range(step):
            next(batches)
        del batches
        states[step] = loader.state_dict()
    early, late = steps
    times: dict[str, list[float]] = {"early": [], "late": []}
    with threads(1):
        for _ in range(reps):
            times["early"].append(_first_batch_seconds(cfg, states[early], 0, world_size))
            times["late"].append(_first_batch_seconds(cfg, states[late], 0, world_size))
    return {
        "steps": list(steps),
        "world_size": world_size,
        "num_workers": cfg.data.num_workers,
        "epochs_at_late": max(s["epoch"] for p in states[late]["worker_positions"] if p for s in p["sets"]),
        **{k: Figure.of(v, "s") for k, v in times.items()},
        "late_vs_early": paired_ratio(times["late"], times["early"]),
    }

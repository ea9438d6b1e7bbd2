"""Data pipeline throughput per loader worker: ppcr's shard reader against a random-access REFER
loader of the kind peers use, on the same refs.

Both run in this process with one thread, which is what one DataLoader worker gets, and time
read + decode + preprocess + collate of whole batches. Repetitions alternate between the two
loaders, so the ratio of each pair is measured under the same machine conditions.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from ppcr.bench.refer_loader import ReferRandomAccess, build_refer_loader
from ppcr.bench.report import Figure, paired_ratio
from ppcr.config import Config
from ppcr.data import synthetic
from ppcr.data.stream import ShardSet, TrainStream
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
    stream = TrainStream(sets, Preprocessor.from_config(cfg.model), cfg.train.micro_batch_size, cfg.train.seed,
                         0, 1, cfg.data.shuffle_buffer, cfg.data.flip_prob)
    return iter(stream)


def refer_batches(cfg: Config) -> Iterator[dict]:
    """The random-access baseline over the REFER files the shards were built from."""
    dataset = ReferRandomAccess(cfg.paths.refer_root, synthetic.DATASET, "unc",
                                Path(cfg.paths.images_root) / synthetic.DATASET, "train", cfg.model, cfg.train.seed)
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
    return {"shard_reader": Figure.of(a, "samples/s"), "refer_loader": Figure.of(b, "samples/s"),
            "speedup": paired_ratio(a, b), "batch_size": cfg.train.micro_batch_size, "batches_per_rep": batches}

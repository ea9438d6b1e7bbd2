"""Evaluation throughput: expressions per second by generation, one process, batch 1 against the
recipe's eval.batch_size, paired per repetition; answers must match between the two."""

from __future__ import annotations

import time

import torch

from ppcr.bench.report import Figure, paired_ratio
from ppcr.common.distributed import DistInfo, device
from ppcr.config import Config
from ppcr.eval.evaluate import evaluate_batches, groups_of, split_batches
from ppcr.model.model import PPCRModel
from ppcr.model.predict import predict_items

ONE = DistInfo(rank=0, world_size=1, local_rank=0, node_rank=0)


def run(cfg: Config, reps: int, expressions: int = 48) -> dict:
    """The recipe's model (its base weights, heads untrained) on the first ``expressions`` of the first
    eval split, held in memory so that only the model is timed."""
    torch.manual_seed(cfg.train.seed)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval().to(device())
    spec = cfg.eval.sets[0]
    items = [x for b in split_batches(cfg, spec, ONE, batch_size=expressions, limit=expressions) for x in b]
    groups = groups_of(cfg, spec)
    sizes = (1, cfg.eval.batch_size)
    rates: dict[int, list[float]] = {s: [] for s in sizes}
    forwards: dict[int, float] = {}
    for _ in range(reps):
        for size in sizes:
            batches = [items[i : i + size] for i in range(0, len(items), size)]
            start = time.perf_counter()
            result = evaluate_batches(model, batches, filler=items[0], dist=ONE, synced=False, groups=groups)
            rates[size].append(len(items) / (time.perf_counter() - start))
            forwards[size] = result.forwards / result.expressions
    same = all(
        a.spatial_answer == b.spatial_answer and torch.equal(a.mask, b.mask)
        for a, b in zip(
            predict_items(model, items[:8], [x["expression"] for x in items[:8]])[0][0],
            [predict_items(model, [x], [x["expression"]])[0][0][0] for x in items[:8]],
        )
    )
    return {
        "expressions": len(items),
        "split": f"{spec.name}/{spec.split}",
        "batch_size": cfg.eval.batch_size,
        "device": str(device()),
        "batch_1": Figure.of(rates[1], "expr/s"),
        "batched": Figure.of(rates[cfg.eval.batch_size], "expr/s"),
        "speedup": paired_ratio(rates[cfg.eval.batch_size], rates[1]),
        "forwards_batch_1": forwards[1],
        "forwards_batched": forwards[cfg.eval.batch_size],
        "same_answers_and_masks": same,
    }

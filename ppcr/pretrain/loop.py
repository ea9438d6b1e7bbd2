"""The pretraining loop: one process, AdamW with warmup and cosine decay, a learning curve on disk.

The tiny backbones have about a million parameters each and train in one process; DeepSpeed's
partitioning would only add collectives. Everything is seeded: the same config gives the same
scenes, batches and losses.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from ppcr.config import PretrainStageConfig, TrainConfig
from ppcr.train.optim import lr_factor


def fit(
    name: str,
    params: list[nn.Parameter],
    step_loss: Callable[[dict], tuple[torch.Tensor, dict]],
    batches: Iterator[dict],
    stage: PretrainStageConfig,
    *,
    evaluate: Callable[[], dict],
    log_every: int,
    eval_every: int,
    curve: Path,
) -> list[dict]:
    """Train ``params`` for ``stage.steps`` steps of ``step_loss`` over ``batches``; every ``log_every``
    steps the mean of the step figures, every ``eval_every`` steps (and at the end) ``evaluate()``,
    both appended to ``curve`` (JSON lines) and returned."""
    schedule = TrainConfig(
        max_steps=max(stage.steps, 1), warmup_steps=min(stage.warmup_steps, max(stage.steps - 1, 0)), min_lr_ratio=0.1
    )
    optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, schedule))
    rows: list[dict] = []
    sums: dict[str, float] = {}
    count = 0
    start = time.perf_counter()
    bar = tqdm(range(1, stage.steps + 1), desc=f"pretrain {name}", unit="step", dynamic_ncols=True)
    for step in bar:
        loss, figures = step_loss(next(batches))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        for k, v in {"loss": loss.detach(), **figures}.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
        row = None
        if step % log_every == 0 or step == stage.steps:
            row = {
                "stage": name,
                "step": step,
                "seconds": round(time.perf_counter() - start, 1),
                **{k: round(v / count, 4) for k, v in sums.items()},
            }
            bar.set_postfix(loss=f"{row['loss']:.3f}")
            sums, count = {}, 0
        if step % eval_every == 0 or step == stage.steps:
            row = row or {"stage": name, "step": step, "seconds": round(time.perf_counter() - start, 1)}
            row.update({f"val_{k}": round(float(v), 4) for k, v in evaluate().items()})
            tqdm.write(json.dumps(row))
        if row is not None:
            rows.append(row)
            with open(curve, "a") as f:
                f.write(json.dumps(row) + "\n")
    return rows

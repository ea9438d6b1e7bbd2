"""Validation during training: generation-based prediction (never teacher-forced) on a fixed slice of
the first eval set, with the paper's metrics, and a grid of predicted masks for TensorBoard."""

from __future__ import annotations

import numpy as np

from ppcr.config import Config
from ppcr.eval.evaluate import evaluate_items, filler_item, split_items
from ppcr.eval.visualize import grid
from ppcr.train.distributed import DistInfo


class Validator:
    """A fixed slice of the first eval set, evaluated by generation every train.val_every steps."""

    def __init__(self, cfg: Config, dist: DistInfo, synced: bool) -> None:
        spec = cfg.eval.sets[0]
        self.name = f"{spec.name}/{spec.split}"
        self.items = split_items(cfg, spec, dist, limit=cfg.train.val_samples)
        self.filler = filler_item(cfg, spec)
        self.dist, self.synced = dist, synced

    def run(self, model) -> tuple[dict[str, float], np.ndarray | None]:
        result, shown = evaluate_items(model, self.items, self.filler, self.dist, self.synced, keep=4)
        return result, grid(shown) if shown else None

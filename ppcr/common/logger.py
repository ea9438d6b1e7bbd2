"""Run logging on global rank 0: TensorBoard scalars and images, and ``metrics.jsonl`` (one line per
logged step), which scripts and tests read back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from ppcr.common.distributed import DistInfo


class RunLogger:
    def __init__(self, run_dir: Path, dist: DistInfo) -> None:
        self.enabled = dist.is_main
        self.writer = SummaryWriter(str(run_dir / "tensorboard")) if self.enabled else None
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if self.enabled else None

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if not self.enabled:
            return
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)
        self.jsonl.write(json.dumps({"step": step, "kind": prefix, **values}) + "\n")
        self.jsonl.flush()

    def flush(self) -> None:
        """On disk now (TensorBoard's writer otherwise flushes every two minutes): what a later failure must not
        take with it."""
        if self.enabled:
            self.writer.flush()

    def message(self, text: str) -> None:
        """A line for the user (global rank 0 only)."""
        if self.enabled:
            print(text, flush=True)

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """(H, W, 3) uint8."""
        if self.enabled:
            self.writer.add_image(tag, image, step, dataformats="HWC")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()

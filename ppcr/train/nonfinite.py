"""NaN and Inf losses: a micro-batch whose loss is not finite on any rank gets no backward on any
rank, and a step left without a finite micro-batch makes no update. The ranks decide together (an
all-reduce of per-term flags), because under ZeRO a backward on some ranks only would deadlock its
collectives or mix poisoned gradients into the others. A run that keeps producing them stops: after
``train.max_nonfinite_steps`` such steps in a row it raises, naming the loss terms and steps, and
the loop saves no checkpoint while the loss is not finite."""

from __future__ import annotations

import logging

import torch

from ppcr.common.distributed import all_reduce_sum
from ppcr.model.losses import TERMS

log = logging.getLogger(__name__)
NAMES = ("loss",) + TERMS


class NonfiniteLossError(RuntimeError):
    """The loss stayed NaN or Inf for ``train.max_nonfinite_steps`` steps in a row."""


class NonfiniteGuard:
    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.skipped_steps = 0  # steps without an update
        self.skipped_micro_batches = 0
        self.streak: list[int] = []  # the steps in a row with a non-finite micro-batch
        self.terms: set[str] = set()  # the terms that were not finite during the streak

    def finite(self, out: dict[str, torch.Tensor]) -> bool:
        """Collective: whether this micro-batch's loss terms are finite on every rank. Reads one small
        tensor back from the device: each rank must know before it starts the backward."""
        values = torch.stack([out[name].detach().float() for name in NAMES])
        flags = all_reduce_sum((~torch.isfinite(values)).float()).tolist()
        bad = {name for name, f in zip(NAMES, flags) if f > 0}
        if bad:
            self.skipped_micro_batches += 1
            self.terms |= bad - {"loss"} or bad
        return not bad

    def end_step(self, step: int, finite_micro: int, micro: int) -> None:
        """Account for a finished step with ``finite_micro`` of ``micro`` micro-batches finite."""
        if finite_micro == micro:
            self.streak, self.terms = [], set()
            return
        if finite_micro == 0:
            self.skipped_steps += 1
        self.streak.append(step)
        what = f"{', '.join(sorted(self.terms))} not finite"
        log.warning(
            "step %d: %s; %s",
            step,
            what,
            "no update" if finite_micro == 0 else f"update from {finite_micro} of {micro} micro-batches",
        )
        if len(self.streak) >= self.max_in_a_row:
            raise NonfiniteLossError(
                f"loss term(s) {', '.join(sorted(self.terms))} not finite at step {step}, and in each of the "
                f"{len(self.streak)} steps {self.streak[0]}-{step} (train.max_nonfinite_steps "
                f"{self.max_in_a_row}); stopped without saving: the last checkpoint is from before"
            )

    @property
    def in_streak(self) -> bool:
        """Whether the last step had a non-finite loss (no checkpoint is written then)."""
        return bool(self.streak)

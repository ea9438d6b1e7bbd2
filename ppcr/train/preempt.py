"""Preemption: SIGTERM or SIGUSR1 asks for a checkpoint at the next step boundary and a clean exit.

A signal may reach only some ranks (SLURM signals every task, a user may signal one), so the ranks
agree with an all-reduce at each step boundary: if any rank was asked, all of them save and stop.
"""

from __future__ import annotations

import signal

import torch

from ppcr.train.distributed import all_reduce_sum, device

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self) -> None:
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective: every rank must call it at the same step."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0], device=device())
        return bool(all_reduce_sum(flag)[0] > 0)

"""Preemption: SIGTERM or SIGUSR1 asks for a checkpoint at a step boundary and a clean exit.

A signal may reach only some ranks (SLURM signals every task, a user may signal one), so the ranks
agree through an all-reduce of the flag. It is started at one step boundary and read at the next,
on a CPU (gloo) group, so that checking never waits for the device: all ranks stop at the same
step, one step after the signal.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

from ppcr.common.distributed import cpu_group

SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preemption:
    def __init__(self) -> None:
        self.received: int | None = None
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        self.group = cpu_group()  # collective: every rank constructs its Preemption at the same point
        self.pending: tuple[dist.Work, torch.Tensor] | None = None

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def requested(self) -> bool:
        """Collective: every rank calls it at every step boundary and gets the same answer."""
        decided = False
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            decided = bool(flag[0] > 0)
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        self.pending = (dist.all_reduce(flag, group=self.group, async_op=True), flag)
        return decided

    def agreed_now(self) -> bool:
        """Collective, synchronous: whether any rank has received a signal by now. For points inside a
        step (between validation batches), where waiting one step for the answer would be too late."""
        if self.pending is not None:
            work, flag = self.pending
            work.wait()
            self.pending = None
            if flag[0] > 0:
                return True
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        dist.all_reduce(flag, group=self.group)
        return bool(flag[0] > 0)

    def close(self) -> None:
        """Complete the last started all-reduce (every rank started the same number)."""
        if self.pending is not None:
            self.pending[0].wait()
            self.pending = None

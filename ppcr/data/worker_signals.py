"""Loader workers leave preemption signals to the rank that owns them.

On preemption or `scancel` SLURM signals every process of the job step (SIGTERM, or SIGUSR1 where
the job asks for it), loader workers included. PyTorch's worker handler turns a SIGTERM that does
not come from the worker's parent into death by SIGTERM, and SIGUSR1's default action ends a process
(a forked worker inherits its rank's preemption handler instead, a spawned or forkserver one does
not). The rank then fails on "DataLoader worker (pid ...) is killed by signal" instead of
checkpointing and exiting 0 (ppcr.train.preempt). So in a worker
(:func:`ignore_stop_signals`, a DataLoader ``worker_init_fn``) both are ignored, except a SIGTERM
from the worker's parent: that one still ends the worker at once, as PyTorch's handler does.

Why not plain SIG_IGN: the parent's SIGTERM is how a worker is stopped when its iterator was not
shut down, e.g. at exit after an error whose traceback keeps the iterator alive (multiprocessing
then terminates its daemon children and joins them without a timeout). A worker that ignored it
would hang that exit forever. A signal handler cannot see who sent a signal, so both signals are
blocked and a thread takes them with sigwaitinfo, which can; their disposition is SIG_IGN as well,
for any thread that does not block them. That is only safe where the worker's main thread is its only
thread when the function runs, so that every later thread inherits the block: a forked worker (the
loaders here ask for fork where the platform has it). A spawned or forkserver worker may already have a
second native thread at that point, which could take the parent's SIGTERM under SIG_IGN and hang the
exit; there the function changes nothing and PyTorch's own handling stays.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
# The loaders' start method: fork where the platform has it (see the module docstring).
WORKER_CONTEXT = "fork" if "fork" in multiprocessing.get_all_start_methods() else None


def _take_stop_signals() -> None:
    """Forever: a SIGTERM from the parent exits the worker (status 0, as PyTorch's handler); any other
    stop signal is dropped."""
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == os.getppid():
            os._exit(0)


def ignore_stop_signals(worker_id: int | None = None) -> bool:
    """DataLoader ``worker_init_fn``: SIGTERM and SIGUSR1 from anyone but the parent no longer end this
    worker. Runs in the worker's main thread (it installs dispositions). Returns whether it did: not in a
    process with another native thread already, nor where that cannot be seen (no /proc)."""
    tasks = "/proc/self/task"
    if not os.path.isdir(tasks) or len(os.listdir(tasks)) != 1:
        return False
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    threading.Thread(target=_take_stop_signals, name="ppcr-stop-signals", daemon=True).start()
    return True

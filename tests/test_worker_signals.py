"""Loader workers (ppcr.data.worker_signals) survive SIGTERM and SIGUSR1 from other processes, as SLURM
sends them to every process of a job, and still end when their parent stops them."""

import subprocess
import sys

from launching import ROOT

from ppcr.data.worker_signals import WORKER_CONTEXT

# A spawned or forkserver worker may already run a second native thread when its init function runs
# (measured: sometimes 2 threads at init under spawn, always 1 under fork); a thread that existed before
# the block could take the parent's SIGTERM while it is ignored and hang the exit, so then the function
# must leave the signals alone.
OTHER_THREAD = """
import signal, threading, time

from ppcr.data.worker_signals import ignore_stop_signals

threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
before = [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)]
assert ignore_stop_signals(0) is False
assert [signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)] == before
assert not signal.pthread_sigmask(signal.SIG_BLOCK, [])
print("untouched", flush=True)
"""


def test_a_worker_with_another_thread_keeps_pytorchs_signal_handling(tmp_path):
    script = tmp_path / "threaded.py"
    script.write_text(OTHER_THREAD)
    done = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "untouched" in done.stdout, done.stderr[-3000:]


# A loader with two workers; a stranger (kill, not the parent) sends both signals to each worker; the
# loader goes on; then an error leaves the loader alive into interpreter exit, where multiprocessing
# SIGTERMs its daemon children and joins them without a timeout: a worker that ignored its parent's
# SIGTERM too would hang that exit.
SCRIPT = """
import subprocess, sys, time

import psutil
from torch.utils.data import DataLoader, IterableDataset

from ppcr.data.worker_signals import ignore_stop_signals


class Counting(IterableDataset):
    def __iter__(self):
        i = 0
        while True:
            time.sleep(0.01)
            i += 1
            yield i


if __name__ == "__main__":
    batches = iter(DataLoader(Counting(), batch_size=None, num_workers=2, multiprocessing_context=sys.argv[1],
                              worker_init_fn=ignore_stop_signals))
    for _ in range(4):  # batches of both workers (round robin): both have run their worker_init_fn
        next(batches)
    workers = [p for p in psutil.Process().children() if p.name() == "pt_data_worker"]  # not spawn's tracker
    assert len(workers) == 2, workers
    for w in workers:
        for sig in ("TERM", "USR1"):
            subprocess.run(["kill", f"-{sig}", str(w.pid)], check=True)
    time.sleep(1)
    for _ in range(20):
        next(batches)
    print("workers alive after the signals", flush=True)
    raise RuntimeError("an error while the loader is alive")
"""


def test_workers_ignore_stop_signals_from_others_and_still_end_with_their_parent(tmp_path):
    """Forked workers, as ppcr's loaders start them (WORKER_CONTEXT)."""
    assert WORKER_CONTEXT == "fork"  # Linux
    script = tmp_path / "loader.py"
    script.write_text(SCRIPT)
    done = subprocess.run(
        [sys.executable, str(script), "fork"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )  # a hang at exit fails here (it exits in seconds)
    assert "workers alive after the signals" in done.stdout, done.stderr[-3000:]
    assert "killed by signal" not in done.stderr
    assert done.returncode == 1 and "an error while the loader is alive" in done.stderr, done.stderr[-3000:]

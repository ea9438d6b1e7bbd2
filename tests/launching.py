"""Running the real launcher from tests: `deepspeed` on 2 CPU ranks, and reading a run's metrics."""

import json
import subprocess
import sys
from pathlib import Path

from ppcr.common.distributed import free_port

ROOT = Path(__file__).parent.parent
VENV_BIN = Path(sys.executable).parent


def overrides(tiny_shards, tiny_models, runs, *extra):
    return [
        f"paths.shards_root={tiny_shards.parent}",
        f"data.train_sets=[{{name: {tiny_shards.name}, split: train}}]",
        f"eval.sets=[{{name: {tiny_shards.name}, split: val}}]",
        f"paths.runs_root={runs}",
        f"model.mllm_path={tiny_models['qwen2_5_vl']}",
        "model.tiny_family=qwen2_5_vl",
        f"model.sam_checkpoint={tiny_models['sam']}",
        "model.sam_image_size=256",
        "data.num_workers=2",
        "train.micro_batch_size=2",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.val_samples=0",
        *extra,
    ]


def deepspeed_cmd(args, script=ROOT / "launch/train.py", ranks=2):
    return [
        str(VENV_BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(free_port()),
        str(script),
        "--config",
        str(ROOT / "launch/configs/default.yaml"),
        *args,
    ]


def rank_processes(launcher_pid: int) -> list:
    """The training ranks under a deepspeed launcher (not their data-loader workers), by local rank."""
    import psutil

    ours = {}
    for p in psutil.Process(launcher_pid).children(recursive=True):
        try:  # a process may end (or be a zombie) while it is being looked at, e.g. a compiler or a worker
            args, parent = p.cmdline(), p.ppid()
        except psutil.Error:
            continue
        rank = next((a for a in args if a.startswith("--local_rank=")), None)
        if rank is not None:
            ours[p.pid] = (rank, parent, p)
    ranks = [(rank, p) for rank, parent, p in ours.values() if parent not in ours]  # not their loader workers
    return [p for _, p in sorted(ranks, key=lambda rp: rp[0])]


def run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kw)


def losses(run_dir):
    return {
        d["step"]: d
        for d in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if d["kind"] == "train"
    }

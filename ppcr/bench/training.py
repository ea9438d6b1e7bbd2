"""Training-step throughput: the real launcher under ZeRO-3 / ZeRO-2 on 1 or more ranks, and the
baseline, the same model, data and optimizer in a plain single-process PyTorch loop.

Launcher runs are ``launch/train.py`` as users run it, with logging every ``steps_per_rep`` steps:
each logged window after the first (warm-up) is one repetition of samples/s and MFU, reduced over ranks
by the trainer itself, which also counts the FLOPs a sample (:mod:`ppcr.model.flops`); the last steps are
profiled (``train.profile_at_step``, after one unrecorded warm-up step), after the timed windows.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from ppcr.bench.report import Figure
from ppcr.common.distributed import free_port
from ppcr.config import Config
from ppcr.data.stream import build_train_loader
from ppcr.model.model import PPCRModel
from ppcr.profiling import mark, stage_split
from ppcr.train.optim import build_optimizer, build_scheduler

ROOT = Path(__file__).resolve().parents[2]


def run_launcher(
    recipe: str, args: list[str], nproc: int, run_dir: Path, capture: bool = True
) -> subprocess.CompletedProcess:
    """``deepspeed --num_gpus nproc launch/train.py`` on a free port, from an empty ``run_dir`` (the run
    directory ``args`` name): a left-over run would be resumed, not measured."""
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [
        str(Path(sys.executable).parent / "deepspeed"),
        "--num_gpus",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(ROOT / "launch/train.py"),
        "--config",
        recipe,
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, capture_output=capture, text=True)


def launcher_run(
    name: str,
    recipe: str,
    overrides: list[str],
    cfg: Config,
    nproc: int,
    ds_config: str,
    runs_root: Path,
    reps: int,
    steps_per_rep: int,
    profile_steps: int,
) -> dict:
    """One ``deepspeed --num_gpus nproc launch/train.py`` run; its timed windows, data wait and profile."""
    k = steps_per_rep
    timed_end = (reps + 1) * k
    max_steps = timed_end + 1 + profile_steps  # the profiler's warm-up step, then the profiled ones
    args = [
        *overrides,
        f"paths.runs_root={runs_root}",
        f"train.run_name={name}",
        f"train.ds_config={ds_config}",
        f"train.max_steps={max_steps}",
        f"train.warmup_steps={k}",
        f"train.log_every={k}",
        f"train.save_every={max_steps}",
        "train.val_samples=0",
        f"train.profile_at_step={timed_end + 2}",
        f"train.profile_steps={profile_steps}",
    ]
    run_dir = runs_root / name
    t0 = time.perf_counter()
    done = run_launcher(recipe, args, nproc, run_dir)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(
            f"benchmark run '{name}' failed (exit {done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}"
        )
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [d for d in lines if d["kind"] == "train" and k < d["step"] <= timed_end]
    if len(windows) != reps:
        raise RuntimeError(
            f"benchmark run '{name}': expected {reps} timed windows in {run_dir}/metrics.jsonl, found {len(windows)}"
        )
    rates = [d["samples_per_s"] for d in windows]
    samples_per_step = nproc * cfg.train.micro_batch_size * cfg.train.grad_accum
    return {
        "ranks": nproc,
        "ds_config": ds_config,
        "samples_per_s": Figure.of(rates, "samples/s"),
        "mfu": Figure.of([d["mfu"] for d in windows], "share"),
        "flops_per_sample": next(d["sample"] for d in lines if d["kind"] == "flops"),
        "step_ms": Figure.of([1e3 * samples_per_step / r for r in rates], "ms"),
        "data_wait_share": Figure.of([d["data_wait_share"] for d in windows], "share"),
        "profile": json.loads((run_dir / "profile" / "rank0.stages.json").read_text()),
        "memory": [d for d in lines if d["kind"] == "memory"],
        "wall_s": wall,
        "run_dir": str(run_dir),
    }


def plain_loop(cfg: Config, reps: int, steps_per_rep: int, profile_steps: int) -> dict:
    """The same model, loader, AdamW groups, schedule and clipping, without DeepSpeed, in this process."""
    torch.manual_seed(cfg.train.seed)
    model = PPCRModel.from_config(cfg.model, cfg.train.loss)
    optimizer = build_optimizer(model, cfg.train)
    scheduler = build_scheduler(optimizer, cfg.train)
    params = [p for p in model.parameters() if p.requires_grad]
    batches = iter(build_train_loader(cfg, 0, 1))

    def step() -> tuple[int, float]:
        t0, n = time.perf_counter(), 0
        with mark("step"):
            for _ in range(cfg.train.grad_accum):
                with mark("data"):
                    batch = next(batches)
                out = model(batch)
                with mark("backward"):
                    (out["loss"] / cfg.train.grad_accum).backward()
                n += len(batch["keys"])
            with mark("optimizer"):
                if cfg.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        return n, time.perf_counter() - t0

    for _ in range(steps_per_rep):  # warm-up, as the launcher runs' first window
        step()
    rates, step_ms = [], []
    for _ in range(reps):
        n = secs = 0.0
        for _ in range(steps_per_rep):
            k, dt = step()
            n, secs = n + k, secs + dt
        rates.append(n / secs)
        step_ms.append(1e3 * secs / steps_per_rep)
    step()  # the launcher runs' profiler warm-up step, unrecorded
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(profile_steps):
            step()
    return {
        "ranks": 1,
        "samples_per_s": Figure.of(rates, "samples/s"),
        "step_ms": Figure.of(step_ms, "ms"),
        "profile": stage_split(prof.events()),
        "trainable_params": sum(p.numel() for p in params),
        "frozen_params": sum(p.numel() for p in model.parameters() if not p.requires_grad),
    }

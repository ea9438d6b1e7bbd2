"""Checkpoints in DeepSpeed's own format, with what DeepSpeed does not keep: data position and RNG.

    <run>/checkpoints/step_00000500/   DeepSpeed's files (model, optimizer shards, scheduler, client
                                       state) plus ppcr_rank<R>.json and ppcr_rank<R>_rng.pt per rank
    <run>/checkpoints/latest           the tag of the newest *complete* checkpoint

Every rank writes its own shard files; only global rank 0 writes ``latest``, after a barrier that
every rank reaches only once its files are written, and by an atomic rename; so ``latest`` never
names a checkpoint that a crash left half written. Older checkpoints beyond ``keep_last`` go. A
resume removes what a crash left behind: checkpoint directories newer than ``latest``.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch

from ppcr.common.checkpoint_paths import LATEST, latest_tag, tag_of
from ppcr.common.distributed import DistInfo, barrier

def save(engine, ckpt_dir: Path, step: int, loader, dist: DistInfo, keep_last: int) -> Path:
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False)
    out = ckpt_dir / tag
    state = {"step": step, "loader": loader.state_dict(), "python_random": _py_state()}
    (out / f"ppcr_rank{dist.rank}.json").write_text(json.dumps(state))
    torch.save({"torch": torch.get_rng_state()}, out / f"ppcr_rank{dist.rank}_rng.pt")
    barrier()  # every rank's files are on disk
    if dist.is_main:
        tmp = ckpt_dir / f".{LATEST}.tmp"
        with open(tmp, "w") as f:
            f.write(tag)
            f.flush()
            os.fsync(f.fileno())  # on disk before the rename makes it the checkpoint to resume from
        os.replace(tmp, ckpt_dir / LATEST)
        tags = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_"))
        for old in tags[:-keep_last]:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
    barrier()
    return out


def resume(engine, ckpt_dir: Path, loader, dist: DistInfo) -> int:
    """Load the latest complete checkpoint if there is one; returns the step to continue from."""
    tag = latest_tag(ckpt_dir)
    if dist.is_main:
        remove_incomplete(ckpt_dir, tag)
    barrier()
    if tag is None:
        return 0
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_strict=True,
                                          load_optimizer_states=True, load_lr_scheduler_states=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    mine = ckpt_dir / tag / f"ppcr_rank{dist.rank}.json"
    if not mine.is_file():
        raise FileNotFoundError(f"{mine} missing: checkpoint {tag} was written by a different world size")
    state = json.loads(mine.read_text())
    loader.load_state_dict(state["loader"])
    random.setstate(_py_unstate(state["python_random"]))
    rng = torch.load(ckpt_dir / tag / f"ppcr_rank{dist.rank}_rng.pt", weights_only=True)
    torch.set_rng_state(rng["torch"])
    if client["step"] != state["step"]:
        raise RuntimeError(f"checkpoint {tag}: DeepSpeed state at step {client['step']}, ppcr state at {state['step']}")
    return int(state["step"])


def remove_incomplete(ckpt_dir: Path, tag: str | None) -> list[str]:
    """Delete checkpoint directories newer than ``tag`` (all of them when there is none): saves that
    a crash interrupted before they became ``latest``. Returns their names."""
    if not ckpt_dir.is_dir():
        return []
    gone = sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step_")
                  and (tag is None or p.name > tag))
    for name in gone:
        print(f"removing {ckpt_dir / name}: a save that did not complete (latest is {tag})", flush=True)
        shutil.rmtree(ckpt_dir / name)
    return gone


def _py_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _py_unstate(s: list) -> tuple:
    return (s[0], tuple(s[1]), s[2])

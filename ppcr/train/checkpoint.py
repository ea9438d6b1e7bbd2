"""Checkpoints in DeepSpeed's own format, with what DeepSpeed does not keep: data position and RNG.

    <run>/checkpoints/step_00000500/   DeepSpeed's files (model, optimizer shards, scheduler, client
                                       state) plus ppcr_rank<R>.json and ppcr_rank<R>_rng.pt per rank
                                       (the CPU generator's state, and the GPU's where the rank has one)
    <run>/checkpoints/latest           the tag of the newest *complete* checkpoint

Every rank writes its own shard files; only global rank 0 writes ``latest``, after a barrier that
every rank reaches only once its files are written, and by an atomic rename; so ``latest`` never
names a checkpoint that a crash left half written. Older checkpoints beyond ``keep_last`` go. A
resume removes what a crash left behind: checkpoint directories newer than ``latest``.

A checkpoint holds the trainable parameters only (DeepSpeed's exclude_frozen_parameters): the frozen
MLLM base, vision tower and SAM image encoder are those of model.mllm_path and model.sam_checkpoint,
which a resume and an evaluation build the model from anyway. At 7B that keeps the frozen 16-bit
weights (15-18 GB) out of every checkpoint. Resume checks that every trainable parameter is in it.
What those base files were is recorded beside them (``ppcr_base.json``, with the resolved config in
``ppcr_config.yaml``: :mod:`ppcr.model.fingerprint`), and every loader compares.
"""

from __future__ import annotations

import json
import os
import shutil
from functools import partial
from pathlib import Path

import torch

from ppcr.common.checkpoint_paths import LATEST, latest_tag, tag_of
from ppcr.common.distributed import DistInfo, barrier
from ppcr.common.random_state import dump_random, load_random
from ppcr.model.saving import check_trainable_state
from ppcr.train.rng import rng_state, set_rng_state


def save(engine, ckpt_dir: Path, step: int, *, loader, dist: DistInfo, keep_last: int,
         identity: dict[str, str]) -> Path:
    """Write checkpoint ``step`` (every rank its shard; rank 0 also ``identity``: file name -> text, the base
    fingerprint and resolved config of :class:`ppcr.train.preflight.RunIdentity`) and make it ``latest``."""
    tag = tag_of(step)
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False,
                           exclude_frozen_parameters=True)
    out = ckpt_dir / tag
    state = {"step": step, "loader": loader.state_dict(), "python_random": dump_random()}
    (out / f"ppcr_rank{dist.rank}.json").write_text(json.dumps(state))
    torch.save(rng_state(), out / f"ppcr_rank{dist.rank}_rng.pt")
    if dist.is_main:
        for name, text in identity.items():
            (out / name).write_text(text)
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
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag, load_optimizer_states=True,
                                          load_lr_scheduler_states=True,
                                          custom_load_fn=partial(load_module, where=ckpt_dir / tag))
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    mine = ckpt_dir / tag / f"ppcr_rank{dist.rank}.json"
    if not mine.is_file():
        raise FileNotFoundError(f"{mine} missing: checkpoint {tag} was written by a different world size")
    state = json.loads(mine.read_text())
    loader.load_state_dict(state["loader"])
    load_random(state["python_random"])
    set_rng_state(torch.load(ckpt_dir / tag / f"ppcr_rank{dist.rank}_rng.pt", weights_only=True))
    if client["step"] != state["step"]:
        raise RuntimeError(f"checkpoint {tag}: DeepSpeed state at step {client['step']}, ppcr state at {state['step']}")
    return int(state["step"])


def load_module(src: dict, dst: torch.nn.Module, where: Path) -> None:
    """DeepSpeed's module load (``custom_load_fn`` of engine.load_checkpoint) for a checkpoint without
    frozen parameters: DeepSpeed's load_module_strict would call their absence an error, and
    load_module_strict=False would not notice a trainable parameter missing. The frozen ones keep
    the base weights the model was built from; every trainable one must be in ``src`` and every key
    of ``src`` in the model, else RuntimeError naming the first ones. (Under ZeRO-3 ``src`` holds
    size-0 placeholders; the trained weights come from the optimizer's fp32 partitions, loaded next.)"""
    result = dst.load_state_dict(src, strict=False)
    check_trainable_state(dst, src.keys(), result.unexpected_keys, where)


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


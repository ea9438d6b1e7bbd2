"""Checkpoints in DeepSpeed's own format, with what DeepSpeed does not keep: data position and RNG.

    <run>/checkpoints/step_00000500/   DeepSpeed's files (model, optimizer shards, scheduler, client
                                       state) plus ppcr_rank<R>.json and ppcr_rank<R>_rng.pt per rank
                                       (the CPU generator's state, and the GPU's where the rank has one)
    <run>/checkpoints/latest           the tag of the newest *complete* checkpoint

``ppcr_rank<R>.json`` holds a ``format_version`` (:data:`STATE_VERSION`): a resume reads the state as this
version writes it, and refuses a checkpoint of another (:func:`rank_states`).

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

import argparse
import json
import os
import random
import shutil
from functools import partial
from pathlib import Path

import torch

from ppcr.common.checkpoint_paths import LATEST, latest_tag, tag_of
from ppcr.common.distributed import DistInfo, barrier
from ppcr.common.random_state import dump_random, load_random
from ppcr.model.saving import check_trainable_state
from ppcr.train.rng import rank_seed, rng_state, seed_rank, set_rng_state

UNIVERSAL = "universal"  # inside a checkpoint: its DeepSpeed state as a universal checkpoint (elastic resume)
STATE_VERSION = 1  # of ppcr_rank<R>.json: step, loader (ppcr.data.stream.ResumableLoader), RNG, optimizer groups


def save(
    engine, ckpt_dir: Path, step: int, *, loader, dist: DistInfo, keep_last: int, identity: dict[str, str]
) -> Path:
    """Write checkpoint ``step`` (every rank its shard; rank 0 also ``identity``: file name -> text, the base
    fingerprint and resolved config of :class:`ppcr.train.preflight.RunIdentity`) and make it ``latest``."""
    tag = tag_of(step)
    engine.save_checkpoint(
        str(ckpt_dir), tag=tag, client_state={"step": step}, save_latest=False, exclude_frozen_parameters=True
    )
    out = ckpt_dir / tag
    groups = [{"name": g.get("name"), "lr": g["lr"]} for g in engine.optimizer.param_groups]
    state = {
        "format_version": STATE_VERSION,
        "step": step,
        "loader": loader.state_dict(),
        "python_random": dump_random(),
        "param_groups": groups,
    }
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


def rank_states(ckpt: Path) -> list[dict]:
    """The ppcr state every rank of a checkpoint wrote (``ppcr_rank<R>.json``), in rank order; ValueError naming
    the file for a state of another :data:`STATE_VERSION`."""
    files = {int(f.name[len("ppcr_rank") : -len(".json")]): f for f in ckpt.glob("ppcr_rank*.json")}
    if sorted(files) != list(range(len(files))) or not files:
        raise FileNotFoundError(
            f"checkpoint {ckpt}: the ranks' ppcr_rank<R>.json files are incomplete (ranks {sorted(files)})"
        )
    states = [json.loads(files[r].read_text()) for r in range(len(files))]
    for r, state in enumerate(states):
        if state.get("format_version") != STATE_VERSION:
            raise ValueError(
                f"{files[r]}: format_version {state.get('format_version')} is not {STATE_VERSION}, a "
                f"checkpoint from another ppcr, which cannot resume: start a new run "
                f"(train.run_name=...), from scratch or from its weights with model.init_from={ckpt}"
            )
    return states


def prepare_elastic(ckpt_dir: Path, dist: DistInfo) -> bool:
    """Whether the resume ahead is elastic: the latest checkpoint was written by another number of ranks. Then
    its DeepSpeed state is converted, once, by global rank 0, into DeepSpeed's universal checkpoint
    (``<tag>/universal``: every trained parameter and its Adam moments whole, by DeepSpeed's own
    ``ds_to_universal``), which any number of ranks loads; the DeepSpeed config then needs
    ``checkpoint.load_universal``. Collective."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return False
    saved = len(rank_states(ckpt_dir / tag))
    if saved == dist.world_size:
        return False
    target = ckpt_dir / tag / UNIVERSAL
    if dist.is_main and not target.is_dir():
        from deepspeed.checkpoint.ds_to_universal import main as to_universal

        print(
            f"resuming checkpoint {tag} of {saved} ranks on {dist.world_size}: converting it to DeepSpeed's "
            f"universal checkpoint in {target}",
            flush=True,
        )
        partial_dir = target.with_name(UNIVERSAL + ".partial")
        shutil.rmtree(partial_dir, ignore_errors=True)
        to_universal(
            argparse.Namespace(
                input_folder=str(ckpt_dir / tag),
                output_folder=str(partial_dir),
                num_extract_workers=1,
                num_merge_workers=1,
                keep_temp_folder=False,
                strict=True,
                inject_missing_state=False,
            )
        )
        os.replace(partial_dir, target)  # complete, or not there
    barrier()
    return True


def resume(engine, ckpt_dir: Path, loader, dist: DistInfo, *, seed: int) -> int:
    """Load the latest complete checkpoint if there is one; returns the step to continue from.

    On the world size it was written by, everything continues exactly (model, optimizer, scheduler, RNG
    states, data position). On another (elastic, after :func:`prepare_elastic`): the trained parameters, Adam's
    moments and the schedule come from the universal checkpoint and are re-sharded over the ranks there are
    now; the data stream continues with what no rank had used yet (:meth:`ResumableLoader.load_elastic`: no
    sample of an epoch twice, none left out); each rank's RNG is seeded anew from ``seed``, the step and the
    rank, since the old ranks' streams of random numbers do not map onto the new ones."""
    tag = latest_tag(ckpt_dir)
    if dist.is_main:
        remove_incomplete(ckpt_dir, tag)
    barrier()
    if tag is None:
        return 0
    ckpt = ckpt_dir / tag
    states = rank_states(ckpt)
    elastic = len(states) != dist.world_size
    if elastic:
        groups = [{k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups]
        path, client = engine.load_checkpoint(
            str(ckpt),
            tag=UNIVERSAL,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=partial(load_module, where=ckpt / UNIVERSAL),
        )
        restore_group_settings(engine, groups, states[0]["param_groups"], where=ckpt)
    else:
        path, client = engine.load_checkpoint(
            str(ckpt_dir),
            tag=tag,
            load_optimizer_states=True,
            load_lr_scheduler_states=True,
            custom_load_fn=partial(load_module, where=ckpt),
        )
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt}")
    step = int(states[0]["step"])
    if client["step"] != step:
        raise RuntimeError(f"checkpoint {tag}: DeepSpeed state at step {client['step']}, ppcr state at {step}")
    mine = states[dist.rank] if not elastic else None
    if mine is not None and mine["loader"]["identity"]["num_workers"] == loader.num_workers:
        loader.load_state_dict(mine["loader"])
    else:
        loader.load_elastic([s["loader"] for s in states])
    if mine is not None:
        load_random(mine["python_random"])
        set_rng_state(torch.load(ckpt / f"ppcr_rank{dist.rank}_rng.pt", weights_only=True))
    else:
        random.seed(rank_seed(seed + step, dist.rank))
        seed_rank(seed + step, dist.rank)
    return step


def restore_group_settings(engine, fresh: list[dict], saved: list[dict], *, where: Path) -> None:
    """After a universal load: DeepSpeed's ZeRO-3 loader gives every optimizer group the first group's settings
    (its ``load_hp_checkpoint_state_from_checkpoint_dir_stage3``), but ppcr's groups differ (learning rate,
    weight decay, name). Each group gets back its own: the learning rate the checkpoint's optimizer had (ppcr
    records it per group), the rest as the optimizer was just built from the config."""
    groups = engine.optimizer.param_groups
    if len(groups) != len(fresh) or len(saved) != len(groups):
        raise RuntimeError(f"checkpoint {where}: {len(saved)} optimizer groups saved, {len(groups)} now")
    for i, group in enumerate(groups):
        group.update(fresh[i], lr=saved[i]["lr"])


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
    gone = sorted(
        p.name
        for p in ckpt_dir.iterdir()
        if p.is_dir() and p.name.startswith("step_") and (tag is None or p.name > tag)
    )
    for name in gone:
        print(f"removing {ckpt_dir / name}: a save that did not complete (latest is {tag})", flush=True)
        shutil.rmtree(ckpt_dir / name)
    return gone

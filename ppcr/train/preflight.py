"""What a training run checks before any heavy work (model, engine, loader workers): the batch
fits the world size, the DeepSpeed JSON agrees with the recipe, and every file it will read is
there. Each problem is a :class:`ConfigError` with a one-line message that names it."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

from ppcr.common.checkpoint_paths import latest_tag
from ppcr.common.distributed import gather_objects
from ppcr.config import Config, ConfigError, dump_config, load_config
from ppcr.data.overlap import RECORD_FILE, check_eval_splits_present, exclusion_record
from ppcr.data.shards import split_shards
from ppcr.model.fingerprint import (
    CONFIG_FILE,
    FINGERPRINT_FILE,
    BaseMismatch,
    base_fingerprint,
    check_base,
    check_model_settings,
    pin_revision,
    read_fingerprint,
)
from ppcr.model.mllm import check_attn_implementation, check_mllm_path
from ppcr.model.sam import check_sam_checkpoint
from ppcr.train.checkpoint import rank_states
from ppcr.train.ds_config import build_ds_config


def resolve_batch(cfg: Config, world_size: int) -> None:
    """Derive train.grad_accum from train.global_batch_size and the world size, when it is set."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(
            f"config key 'train.global_batch_size': {t.global_batch_size} is not divisible by "
            f"train.micro_batch_size {t.micro_batch_size} x world size {world_size} = {per_step}"
        )
    accum = t.global_batch_size // per_step
    if t.grad_accum not in (1, accum):
        raise ConfigError(
            f"config key 'train.grad_accum': {t.grad_accum}, but train.global_batch_size "
            f"{t.global_batch_size} on {world_size} ranks needs {accum}; set only one of them"
        )
    t.grad_accum = accum


def check_run_inputs(cfg: Config, world_size: int, run_dir: Path) -> dict:
    """Resolve the batch, build the DeepSpeed config and check the inputs; returns the DeepSpeed config."""
    resolve_batch(cfg, world_size)
    ds = build_ds_config(cfg, world_size)
    try:
        check_attn_implementation(cfg.model.attn_implementation, cfg.model.dtype)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    try:
        check_mllm_path(cfg.model.mllm_path)
        check_sam_checkpoint(cfg.model)
        sets = [("data.train_sets", s) for s in cfg.data.train_sets]
        if cfg.train.val_samples:
            sets += [("eval.sets", s) for s in cfg.eval.sets[:1]]  # validation reads the first
        for key, spec in sets:
            try:
                split_shards(Path(cfg.paths.shards_root) / spec.name, spec.split)
            except (FileNotFoundError, ValueError) as e:
                raise FileNotFoundError(f"{key} '{spec.name}/{spec.split}' under paths.shards_root: {e}") from e
        tag = latest_tag(run_dir / "checkpoints")  # a 'latest' that names a missing checkpoint
        if tag is not None:
            rank_states(run_dir / "checkpoints" / tag)  # complete and of this ppcr's format, else it cannot resume
    except (FileNotFoundError, ValueError) as e:
        raise ConfigError(str(e)) from e
    if cfg.data.exclude_eval_images:
        try:
            check_eval_splits_present(
                cfg.paths.shards_root, cfg.data.train_sets, cfg.eval.sets, cfg.data.eval_splits_missing_ok
            )
        except ValueError as e:
            raise ConfigError(f"config key 'eval.sets': {e}") from e
    return ds


@dataclass(frozen=True)
class RunIdentity:
    """What every checkpoint of this launch records beside DeepSpeed's files: the base fingerprint, the
    resolved config (:mod:`ppcr.model.fingerprint`) and the eval splits training left out."""

    fingerprint: dict
    config: Config

    def files(self) -> dict[str, str]:
        """File name -> text, as :func:`ppcr.train.checkpoint.save` writes them into a checkpoint: also which eval
        splits training left out (:func:`ppcr.data.overlap.exclusion_record`), which make eval reports."""
        c = self.config
        excluded = exclusion_record(c.paths.shards_root, c.data.train_sets, c.eval.sets, c.data.exclude_eval_images)
        return {
            FINGERPRINT_FILE: json.dumps(self.fingerprint, indent=1) + "\n",
            CONFIG_FILE: dump_config(c),
            RECORD_FILE: json.dumps(excluded, indent=1) + "\n",
        }


def _identity_on_this_rank(cfg: Config, run_dir: Path, *, allow_base: bool, allow_model: bool) -> RunIdentity:
    ckpt_dir = run_dir / "checkpoints"
    tag = latest_tag(ckpt_dir)
    m = cfg.model
    if tag is None:
        fingerprint = base_fingerprint(m)
    else:
        ckpt = ckpt_dir / tag
        saved = read_fingerprint(ckpt)
        m = pin_revision(m, saved)
        if (ckpt / CONFIG_FILE).is_file():
            check_model_settings(
                load_config(ckpt / CONFIG_FILE), replace(cfg, model=m), what=f"checkpoint {ckpt}", allow=allow_model
            )
        fingerprint = check_base(saved, m, what=f"checkpoint {ckpt}", allow=allow_base) or base_fingerprint(m)
    if fingerprint["mllm"]["revision"]:  # a hub id: every later load of this run asks for this commit
        m = replace(m, mllm_revision=fingerprint["mllm"]["revision"])
    return RunIdentity(fingerprint, replace(cfg, model=m))


def run_identity(cfg: Config, run_dir: Path, *, allow_base: bool = False, allow_model: bool = False) -> RunIdentity:
    """The fingerprint of the base weights ``cfg`` names and ``cfg`` with the hub commit pinned, checked
    against the run's latest checkpoint when it resumes (:func:`ppcr.model.fingerprint.check_base`,
    :func:`~ppcr.model.fingerprint.check_model_settings`; ``allow_*`` turn a refusal into a warning).
    Collective: every rank computes its own and they must agree, so that ranks on nodes with different
    copies of the base are refused too; any rank's refusal is every rank's :class:`BaseMismatch`."""
    try:
        mine: RunIdentity | str = _identity_on_this_rank(cfg, run_dir, allow_base=allow_base, allow_model=allow_model)
    except (BaseMismatch, FileNotFoundError) as e:
        mine = str(e)
    everyone = gather_objects(mine)
    errors = [(rank, e) for rank, e in enumerate(everyone) if isinstance(e, str)]
    if errors:
        rank, error = errors[0]
        raise BaseMismatch(error if len(everyone) == 1 else f"rank {rank}: {error}")
    assert isinstance(mine, RunIdentity)
    for rank, other in enumerate(everyone):
        if other.fingerprint != mine.fingerprint:
            raise BaseMismatch(
                f"ranks see different base weights: rank {rank} {json.dumps(other.fingerprint)}, "
                f"this rank {json.dumps(mine.fingerprint)}; every node needs the same copy of "
                "model.mllm_path and model.sam_checkpoint"
            )
    return mine

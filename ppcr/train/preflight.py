"""What a training run checks before any heavy work (model, engine, loader workers): the batch
fits the world size, the DeepSpeed JSON agrees with the recipe, and every file it will read is
there. Each problem is a :class:`ConfigError` with a one-line message that names it."""

from __future__ import annotations

from pathlib import Path

from ppcr.config import Config, ConfigError
from ppcr.data.shards import split_shards
from ppcr.model.mllm import check_attn_implementation, check_mllm_path
from ppcr.model.sam import check_sam_checkpoint
from ppcr.common.checkpoint_paths import latest_tag
from ppcr.train.ds_config import build_ds_config


def resolve_batch(cfg: Config, world_size: int) -> None:
    """Derive train.grad_accum from train.global_batch_size and the world size, when it is set."""
    t = cfg.train
    if t.global_batch_size is None:
        return
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise ConfigError(f"config key 'train.global_batch_size': {t.global_batch_size} is not divisible by "
                          f"train.micro_batch_size {t.micro_batch_size} x world size {world_size} = {per_step}")
    accum = t.global_batch_size // per_step
    if t.grad_accum not in (1, accum):
        raise ConfigError(f"config key 'train.grad_accum': {t.grad_accum}, but train.global_batch_size "
                          f"{t.global_batch_size} on {world_size} ranks needs {accum}; set only one of them")
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
        latest_tag(run_dir / "checkpoints")  # a 'latest' that names a missing checkpoint
    except FileNotFoundError as e:
        raise ConfigError(str(e)) from e
    return ds

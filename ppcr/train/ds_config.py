"""DeepSpeed configuration: ZeRO settings from ``ds_configs/*.json``, everything the recipe owns from
the recipe. A JSON that sets a recipe-owned value differently is an error, not a silent override."""

from __future__ import annotations

import json
from pathlib import Path

from ppcr.config import Config, ConfigError


def _owned(cfg: Config, world_size: int) -> dict:
    t = cfg.train
    return {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum,
        "train_batch_size": t.micro_batch_size * t.grad_accum * world_size,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": t.precision == "bf16"},
        # dynamic loss scaling (loss_scale 0); DeepSpeed skips the update of a step whose gradients overflow
        "fp16": (
            {"enabled": True, "loss_scale": 0, "initial_scale_power": t.loss_scale_power}
            if t.precision == "fp16"
            else {"enabled": False}
        ),
    }


def build_ds_config(cfg: Config, world_size: int) -> dict:
    path = Path(cfg.train.ds_config)
    if not path.is_file():
        raise ConfigError(f"config key 'train.ds_config': no DeepSpeed config at {path}")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.ds_config {path} is not valid JSON: {e}") from e
    if "zero_optimization" not in ds or "stage" not in ds["zero_optimization"]:
        raise ConfigError(f"train.ds_config {path}: needs zero_optimization.stage")
    for key, value in _owned(cfg, world_size).items():
        if key in ds and ds[key] != value:
            where = {
                "train_micro_batch_size_per_gpu": "train.micro_batch_size",
                "gradient_accumulation_steps": "train.grad_accum",
                "gradient_clipping": "train.grad_clip",
                "train_batch_size": "train.micro_batch_size x train.grad_accum x world size",
                "bf16": "train.precision",
                "fp16": "train.precision",
            }[key]
            raise ConfigError(
                f"{path} sets {key} = {ds[key]!r} but the recipe gives {value!r} ({where}); "
                f"remove it from the JSON: the recipe owns it"
            )
        ds[key] = value
    if ds.get("optimizer") or ds.get("scheduler"):
        raise ConfigError(f"{path}: optimizer and scheduler come from the recipe (train.lr, ...), not the JSON")
    ds.setdefault("steps_per_print", 10**9)
    return ds


def zero_stage(ds: dict) -> int:
    return int(ds["zero_optimization"]["stage"])

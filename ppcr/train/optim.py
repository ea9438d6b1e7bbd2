"""AdamW with parameter groups and a warmup-then-cosine schedule. AdamW is torch's, or DeepSpeed's
DeepSpeedCPUAdam (the same AdamW update, in C++ on the CPU) when the DeepSpeed config offloads the
optimizer to CPU: DeepSpeed refuses ZeRO-Offload with any other client optimizer."""

from __future__ import annotations

import math

import torch
from torch import nn

from ppcr.config import TrainConfig
from ppcr.model.params import component
from ppcr.train.offload import offloads_optimizer

# Which learning rate each trained component uses.
# Which learning rate each trained component uses: new parts (LoRA, heads, new token rows) their own,
# pretrained weights that train whole base_lr (train.lr where unset), SAM's parts sam_lr.
_LR_OF = {
    "lora_semantic": "lr",
    "lora_spatial": "lr",
    "vision_tower": "base_lr",
    "llm_base": "base_lr",
    "embeddings": "base_lr",
    "lm_head": "base_lr",
    "new_token_rows": "head_lr",
    "projectors": "head_lr",
    "box_head": "head_lr",
    "sam_mask_decoder": "sam_lr",
    "sam_prompt_encoder": "sam_lr",
    "sam_image_encoder": "sam_lr",
}


def group_lr(which: str, t: TrainConfig) -> float:
    """The learning rate of one :data:`_LR_OF` name; base_lr falls back to lr."""
    lr = getattr(t, which)
    return t.lr if lr is None else lr


def param_groups(model: nn.Module, t: TrainConfig) -> list[dict]:
    """One group per (learning rate, decay) pair; norms, biases and other 1-D tensors never decay."""
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        which = _LR_OF[component(name)]
        decay = p.ndim > 1 and t.weight_decay > 0
        key = (which, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": group_lr(which, t),
                "weight_decay": t.weight_decay if decay else 0.0,
                "name": f"{which}{'' if decay else '_no_decay'}",
            }
        groups[key]["params"].append(p)
    return list(groups.values())


BETAS, EPS = (0.9, 0.95), 1e-8


def build_optimizer(model: nn.Module, t: TrainConfig, *, ds: dict | None = None) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; DeepSpeedCPUAdam in AdamW mode, with the same groups (names,
    learning rates, weight decay), betas and eps, when the DeepSpeed config ``ds`` offloads the
    optimizer (its cpu_adam op is built on first use: ppcr.train.offload)."""
    if ds is not None and offloads_optimizer(ds):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups(model, t), betas=BETAS, eps=EPS, adamw_mode=True)
    return torch.optim.AdamW(param_groups(model, t), betas=BETAS, eps=EPS)


def lr_factor(step: int, t: TrainConfig) -> float:
    """Linear warmup to 1, then cosine down to min_lr_ratio at max_steps."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.max_steps - t.warmup_steps))
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, t: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, t))

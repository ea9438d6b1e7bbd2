"""The two LoRA branches of the language model: "semantic" (branch A) and "spatial" (branch B).

Both adapters stay trainable for the whole run; a forward picks its branch with :func:`use_branch`,
which changes which adapter computes and nothing else. peft's own ``set_adapter`` also flips
``requires_grad``, and a changing set of trainable parameters breaks ZeRO-3's bookkeeping.
"""

from __future__ import annotations

import re

from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ppcr.config import LoraSettings

BRANCHES = ("semantic", "spatial")


def lora_config(s: LoraSettings) -> LoraConfig:
    # Only the language model: vision towers use some of the same module names (q_proj in CLIP).
    target = rf".*language_model\..*\.({'|'.join(re.escape(m) for m in s.target_modules)})"
    return LoraConfig(r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=target, bias="none")


def add_branches(model: nn.Module, s: LoraSettings) -> PeftModel:
    cfg = lora_config(s)
    # Adapters in the base model's dtype: peft would upcast them to fp32 beside a bf16 model, and ZeRO-3
    # partitions parameters in flat buffers of one dtype (DeepSpeed's bf16 keeps fp32 master weights).
    peft_model = get_peft_model(model, cfg, adapter_name=BRANCHES[0], autocast_adapter_dtype=False)
    for name in BRANCHES[1:]:
        peft_model.add_adapter(name, cfg, autocast_adapter_dtype=False)
    n_layers = sum(isinstance(m, BaseTunerLayer) for m in peft_model.modules())
    if n_layers == 0:
        raise ValueError(f"model.lora.target_modules {s.target_modules} match no module of the language model")
    for name, p in peft_model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)
    use_branch(peft_model, BRANCHES[0])
    return peft_model


def use_branch(peft_model: PeftModel, branch: str) -> None:
    if branch not in BRANCHES:
        raise ValueError(f"unknown LoRA branch '{branch}' (branches: {', '.join(BRANCHES)})")
    for m in peft_model.modules():
        if isinstance(m, BaseTunerLayer):
            m._active_adapter = [branch]
    peft_model.base_model.active_adapter = branch

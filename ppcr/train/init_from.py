"""``model.init_from``: a new run that starts from a trained PPCR model's weights (fine-tuning a released model
on new data) instead of the base's, with a fresh optimizer, schedule and data stream.

The weights come from :func:`ppcr.model.saving.trained_state` (an export's every weight, or a checkpoint's
trained ones) and go into the model as built, before DeepSpeed wraps it: under ZeRO-3 the MLLM is already
partitioned by ``zero.Init``, so each of its parameters is gathered, written on rank 0 and partitioned again
(DeepSpeed's ``GatheredParameters``); the other modules are still whole. DeepSpeed's optimizer then takes its
fp32 master weights from these.
"""

from __future__ import annotations

import torch
from torch import nn


def init_trained(model: nn.Module, state: dict[str, torch.Tensor], *, complete: bool, where: str) -> list[str]:
    """Write ``state`` into every trainable parameter of ``model``. ``complete``: the state holds every weight
    (an export); otherwise only the source's trained ones (and buffers), and every key must be one of ``model``
    (else the settings differ: RuntimeError naming them). A trainable parameter the state lacks (this run trains
    more than the source did) keeps the base's value; their names are returned. A shape that differs is a
    RuntimeError naming the parameter."""
    import deepspeed

    params = dict(model.named_parameters())
    known = set(model.state_dict())  # parameters and buffers (a checkpoint keeps buffers, from the base anyway)
    unexpected = [] if complete else sorted(k for k in state if k not in known)
    if unexpected:
        raise RuntimeError(
            f"model.init_from {where}: {len(unexpected)} trained parameter(s) are not in this run's "
            f"model, first {unexpected[:3]} (do model.trainable and model.lora match its settings?)"
        )
    trainable = [(n, p) for n, p in params.items() if p.requires_grad]
    missing = [n for n, _ in trainable if n not in state]
    for name, p in trainable:
        if name not in state:
            continue
        value = state[name]
        shape = tuple(p.ds_shape) if hasattr(p, "ds_id") else tuple(p.shape)
        if tuple(value.shape) != shape:
            raise RuntimeError(
                f"model.init_from {where}: {name} has shape {tuple(value.shape)} there and {shape} "
                "in this run's model (do the model settings match?)"
            )
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
            with torch.no_grad():
                p.data.copy_(value.to(p.dtype))
    return missing

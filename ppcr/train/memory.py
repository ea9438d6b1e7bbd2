"""Memory a rank uses. Model states: the bytes of parameters, gradients and optimizer states this
rank holds in a live DeepSpeed ZeRO engine, read from the ZeRO optimizer's own buffers, each storage
counted once; the trainer logs them after the first step (Adam's states are created lazily), so
that measured memory can be put beside DeepSpeed's estimators. Logged every log step: the peak memory
of each rank, and host memory: the resident size of the rank and of its data-loader workers (a leak
shows as growth).
"""

from __future__ import annotations

import resource
from collections.abc import Iterable

import psutil
import torch

from ppcr.common.distributed import device


def _tensors(value: object) -> Iterable[torch.Tensor]:
    """Every tensor inside a tensor, list / tuple or dict (ZeRO keeps gradients in all three)."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


class _StorageCounter:
    """Sums the bytes of storages not seen before: views of one flat buffer count once, in the first
    category that names them (params, then gradients, then optimizer)."""

    def __init__(self, seen: set[tuple[str, int]] | None = None) -> None:
        self.seen: set[tuple[str, int]] = set(seen or ())
        self.cpu = 0

    def add(self, value: object) -> int:
        total = 0
        for t in _tensors(value):
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in self.seen:
                continue
            self.seen.add(key)
            total += storage.nbytes()
            if t.device.type == "cpu":
                self.cpu += storage.nbytes()
        return total


def model_state_bytes(engine) -> dict[str, int]:
    """Bytes of model states this rank holds: ``params`` (ZeRO-3: the partitions ``ds_tensor``;
    ZeRO-1/2: the whole 16-bit or fp32 parameters), ``gradients`` (the ZeRO optimizer's gradient
    partitions), ``optimizer`` (fp32 master partitions not shared with ``params``, plus the torch
    optimizer's state tensors, e.g. AdamW's exp_avg, exp_avg_sq and step), ``total`` (their sum),
    ``cpu`` (the share of ``total`` in host memory: offload) and ``gathered`` (ZeRO-3 only, not in
    ``total``: full copies of parameters materialised right now, e.g. persistent small ones).

    A master partition that shares storage with the parameters (ZeRO-3's intended fp32 shortcut,
    which this DeepSpeed never takes: it compares a torch.device with a str) counts under ``params``
    only. ZeRO-1/2 hold gradient partitions only between backward and step, so they read 0 outside.
    Communication buckets (reduce, prefetch) are working buffers, not model states: left out."""
    stage = engine.zero_optimization_stage()
    zero = engine.optimizer
    if zero is None:
        raise ValueError("model_state_bytes needs an engine built with an optimizer")
    count = _StorageCounter()
    params = list(engine.module.parameters())
    if stage == 3:
        out = {"params": count.add([p.ds_tensor for p in params])}
        fp32 = list(zero.fp32_partitioned_groups_flat)
        grads: list[object] = [zero.grad_partitions_flat_buffer, [f.grad for f in fp32 if f.grad is not None]]
    elif stage in (1, 2):
        out = {"params": count.add([p.data for p in params])}
        fp32 = list(zero.single_partition_of_fp32_groups)
        grads = [
            getattr(zero, "grads_in_partition", None),
            getattr(zero, "averaged_gradients", None),
            [f.grad for f in fp32 if f.grad is not None],
        ]
    else:
        raise ValueError(f"model_state_bytes needs a ZeRO engine (stage 1, 2 or 3), got stage {stage}")
    out["gradients"] = count.add(grads)
    out["optimizer"] = count.add(fp32) + count.add(list(zero.optimizer.state.values()))
    out["total"] = out["params"] + out["gradients"] + out["optimizer"]
    out["cpu"] = count.cpu
    # ZeRO-3: full data outside the partitions (gathered now, or persistent) is extra, reported apart.
    out["gathered"] = _StorageCounter(count.seen).add([p.data for p in params]) if stage == 3 else 0
    return out


def peak_memory_gib() -> float:
    """This rank's peak memory so far, GiB: the most its GPU's allocator handed out
    (``torch.cuda.max_memory_allocated``), or on CPU the process's largest resident size (``ru_maxrss``, KiB
    on Linux; the rank alone, not its loader workers)."""
    if device().type == "cuda":
        return torch.cuda.max_memory_allocated(device()) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def host_memory_gb() -> dict[str, float]:
    """GiB: the process's resident size now, and the summed resident size of its child processes
    (data-loader workers)."""
    me = psutil.Process()
    rss = me.memory_info().rss
    workers = 0
    for child in me.children(recursive=True):
        try:
            workers += child.memory_info().rss
        except psutil.NoSuchProcess:  # a worker that ended between listing and reading
            pass
    return {"host_rss_gb": rss / 2**30, "loader_rss_gb": workers / 2**30}

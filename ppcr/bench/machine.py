"""What machine a benchmark ran on, and how fast it multiplies matrices: the peak that utilisation
figures are measured against (measured here, not taken from a data sheet)."""

from __future__ import annotations

import os
import platform
import time
from importlib import metadata

import psutil
import torch

from ppcr.bench.report import Figure
from ppcr.common.distributed import usable_cores


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe() -> dict:
    """CPU, cores, memory, accelerators and the versions of the libraries that set the speed."""
    out = {
        "cpu": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": {p: _version(p) for p in ("torch", "torchvision", "deepspeed", "transformers", "peft",
                                              "webdataset", "segment-anything")},
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    return out


def matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5,
                 min_seconds: float = 0.5) -> Figure:
    """FLOP/s of an n x n x n matmul on ``device`` with the process's threads, per repetition."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for _ in range(3):
        a @ b
    sync()
    t0 = time.perf_counter()
    a @ b
    sync()
    per_rep = max(1, round(min_seconds / (time.perf_counter() - t0)))  # one repetition lasts about min_seconds
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(per_rep):
            a @ b
        sync()
        rates.append(2 * n**3 * per_rep / (time.perf_counter() - t0))
    return Figure.of(rates, "FLOP/s")

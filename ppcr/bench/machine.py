"""What machine a benchmark ran on, and how fast it multiplies matrices: the peak that the plain loop's
utilisation is measured against (measured, as training measures a CPU's: :func:`ppcr.model.flops.matmul_rate`)."""

from __future__ import annotations

import os
import platform
from importlib import metadata

import psutil
import torch

from ppcr.bench.report import Figure
from ppcr.common.distributed import usable_cores
from ppcr.model.flops import matmul_rate


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
        "versions": {
            p: _version(p)
            for p in ("torch", "torchvision", "deepspeed", "transformers", "peft", "webdataset", "segment-anything")
        },
        "gpus": [],
    }
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out["gpus"].append({"name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    return out


def matmul_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, reps: int = 5) -> Figure:
    """FLOP/s of 1024 x 1024 x 1024 matmuls on ``device`` with the process's threads, ``reps`` repetitions
    of about 0.5 s."""
    return Figure.of([matmul_rate(device, dtype, seconds=0.5) for _ in range(reps)], "FLOP/s")

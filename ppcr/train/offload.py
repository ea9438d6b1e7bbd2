"""ZeRO-Offload of the optimizer: whether a DeepSpeed config asks for it, and DeepSpeed's cpu_adam op
that it then needs.

DeepSpeed refuses ZeRO-Offload with a client optimizer other than its DeepSpeedCPUAdam (a
ZeRORuntimeException in deepspeed.initialize), and DeepSpeedCPUAdam runs a C++ op, cpu_adam, that
`make install` does not build (DS_BUILD_OPS=0): DeepSpeed compiles it with ninja and the C++
compiler on its first use, into torch's extension cache ($TORCH_EXTENSIONS_DIR, by default under
~/.cache/torch_extensions): 36-75 s on 2 shared CPU cores; later runs load it from there in about
2 s. It is built at first use rather than at install because only offload runs need it and
because it is compiled with -march=native, for the CPU of the machine that compiles it: the one
that trains. The trainer loads it before the model is built, so that a machine that cannot build
it stops within seconds, with a message that says what is missing.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

# DeepSpeed runs the optimizer on the CPU for both (engine.zero_use_cpu_optimizer).
CPU_OPTIMIZER_DEVICES = ("cpu", "nvme")


class CpuAdamUnavailable(RuntimeError):
    """The cpu_adam op that ZeRO-Offload needs did not build or load on this machine."""


def offloads_optimizer(ds: dict) -> bool:
    """Whether the DeepSpeed config ``ds`` puts the optimizer step on the CPU
    (zero_optimization.offload_optimizer.device "cpu" or "nvme")."""
    offload = ds.get("zero_optimization", {}).get("offload_optimizer") or {}
    return str(offload.get("device", "none")).lower() in CPU_OPTIMIZER_DEVICES


def extensions_dir() -> Path:
    """Where torch's JIT-built extensions (cpu_adam among them) are cached."""
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def one_line(e: Exception, limit: int = 600) -> str:
    """An exception whose message may be a whole build log, on one line: its start and its end (where
    the compiler's error is)."""
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip()).rstrip(".") or type(e).__name__
    return text if len(text) <= limit else f"{text[:250]} ... {text[-(limit - 255) :]}"


def load_cpu_adam(*, ds_config: str, announce: bool) -> float:
    """Build (first use) or load DeepSpeed's cpu_adam op; returns the seconds it took. ``announce``
    (rank 0) prints what happens, since a first build takes a minute or more. Raises
    :class:`CpuAdamUnavailable` naming ``ds_config`` (train.ds_config) and what the build needs."""
    from deepspeed.ops.op_builder import CPUAdamBuilder

    if announce:
        print(
            f"ZeRO-Offload ({ds_config}): loading DeepSpeed's cpu_adam op; its first use on a machine "
            f"compiles it (a minute or so) under {extensions_dir()}",
            flush=True,
        )
    start = time.perf_counter()
    try:
        CPUAdamBuilder().load()
    except Exception as e:  # torch's and DeepSpeed's build errors are RuntimeError, OSError, ImportError...
        raise CpuAdamUnavailable(
            f"train.ds_config {ds_config} offloads the optimizer to CPU, which needs DeepSpeed's cpu_adam op, "
            f"and it did not build or load here: {one_line(e)}. The build needs ninja (pip install ninja) and a C++ "
            f"compiler (g++, or $CXX) with the Python headers; its build folder is the cpu_adam directory "
            f"under {extensions_dir()}. Or train without offload: train.ds_config=ds_configs/zero3.json"
        ) from e
    took = time.perf_counter() - start
    if announce:
        print(f"cpu_adam op ready in {took:.1f} s", flush=True)
    return took

"""Process-group setup for `deepspeed`, `torchrun` and `srun` launches, and the rank facts after it.

World size and ranks always come from the process group, never from device counts (wrong on
multi-node). Under SLURM without a launcher (`srun python launch/train.py`), the SLURM task
variables are turned into the env:// variables torch expects.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int

    @property
    def is_main(self) -> bool:
        """Global rank 0: the only process that writes shared files."""
        return self.rank == 0


def _slurm_env() -> None:
    """Map SLURM task variables to RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        try:
            first = subprocess.run(
                ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True
            ).stdout.split()[0]
        except (OSError, subprocess.CalledProcessError, IndexError):
            first = nodes.split(",")[0]
        os.environ["MASTER_ADDR"] = first
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def init_distributed() -> DistInfo:
    """Join (or create) the process group; a single process without a launcher is a world of one."""
    _slurm_env()
    if "RANK" not in os.environ:  # plain `python launch/train.py`
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))  # a world of one: any free port; never a clash
    import deepspeed  # only here: evaluation, export and inference run without DeepSpeed loaded
    from deepspeed.accelerator import get_accelerator

    backend = get_accelerator().communication_backend_name()
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend=backend)
        _unlink_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() == "cuda":
        torch.cuda.set_device(local_rank)
    rank, world = dist.get_rank(), dist.get_world_size()
    # torchrun / deepspeed / srun each name the number of processes on this node differently.
    local_world = int(
        os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "0")))
        or 0
    )
    if get_accelerator().device_name() == "cpu":
        # Denormal floats are slow on CPUs: Adam's second moments of parameters whose gradient stays
        # zero (token rows never seen) decay into that range and stay there for thousands of steps
        # (1.6x slower optimizer steps at the end of a 4,000-step soak). Flushed to zero instead.
        torch.set_flush_denormal(True)
        if "OMP_NUM_THREADS" not in os.environ:
            # CPU ranks share the node's cores instead of each starting a thread per core.
            torch.set_num_threads(max(1, usable_cores() // max(local_world, 1)))
    node_rank = int(
        os.environ.get("SLURM_NODEID", os.environ.get("GROUP_RANK", rank // local_world if local_world else 0))
    )
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, node_rank=node_rank)


def _unlink_shm_buffer() -> None:
    """On CPU, DeepSpeed's shared-memory all-reduce gives each rank of a one-node job a 66 MB file in
    /dev/shm and never removes it: every run, and every killed one, left its files behind (13 GB of
    RAM after a day of runs here). Once every rank has mapped every buffer (they do so during
    init_distributed; the barrier waits for all), each rank unlinks its own: the mappings stay valid
    and the memory is freed when the job ends, however it ends."""
    if device().type != "cpu":
        return
    barrier()
    name = (
        f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
        f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}"
    )
    if os.path.exists(name):
        os.unlink(name)


def free_port() -> int:
    """A TCP port nobody listens on now, for a rendezvous (launches of tests and benchmarks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one, e.g. under SLURM)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def device() -> torch.device:
    """This rank's device: its local GPU where CUDA is usable (DeepSpeed's accelerator choice on the
    machines ppcr supports), else the CPU."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    out = values.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out)
    return out


def all_ranks_done(done: bool) -> bool:
    """Whether ``done`` holds on every rank (collective: every rank calls it at the same point)."""
    return int(all_reduce_sum(torch.tensor([0 if done else 1], device=device()))) == 0


def cpu_group() -> dist.ProcessGroup:
    """A gloo group over all ranks for small host-side agreements: the default group on CPU, a new
    one beside NCCL on GPUs. Collective: every rank must call it at the same point."""
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def gather_objects(obj: object) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` without a process group.
    Collective: every rank must call it at the same point."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=cpu_group())
    return out


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()

"""Random state of a training rank: its seed, and the states a checkpoint keeps.

The model is built under train.seed on every rank (the same initial weights; ZeRO-3's zero.Init
broadcasts rank 0's anyway). Training then reseeds each rank with train.seed + rank, so that the
model's randomness, LoRA dropout above all, differs between ranks: with one seed every rank drew
the same dropout masks for its different samples. The data order does not come from these RNGs:
the stream seeds itself from (train.seed, set, epoch, slot) and the loader from a generator of its
own (ppcr.data.stream), so it is the same as before.

A checkpoint keeps, per rank, the CPU generator's state and, where the rank trains on a GPU, that
device's (CUDA dropout draws from it); resume restores both, so that a resumed run continues with
the random numbers an uninterrupted one would have drawn.
"""

from __future__ import annotations

import torch

from ppcr.common.distributed import device


def rank_seed(seed: int, rank: int) -> int:
    return seed + rank


def seed_rank(seed: int, rank: int) -> None:
    """Seed torch's CPU and accelerator generators for ``rank``'s share of the training randomness."""
    torch.manual_seed(rank_seed(seed, rank))  # seeds every CUDA device too


def rng_state() -> dict[str, torch.Tensor]:
    """``torch``: the CPU generator's state; ``cuda``: this rank's GPU's, only where it trains on one."""
    state = {"torch": torch.get_rng_state()}
    dev = device()
    if dev.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(dev)
    return state


def set_rng_state(state: dict[str, torch.Tensor]) -> None:
    """Restore what :func:`rng_state` returned. A ``cuda`` state is restored where this rank trains on a
    GPU; a checkpoint written without one (on CPU, or before it was kept) leaves the GPU's as seeded."""
    torch.set_rng_state(state["torch"])
    dev = device()
    if dev.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], dev)

"""Per-rank random state (ppcr.train.rng): ranks draw different dropout masks, and a checkpoint keeps
each rank's CPU generator and, where the rank trains on a GPU, that device's."""

import torch
from torch import nn

from ppcr.common.distributed import device
from ppcr.train.rng import rng_state, seed_rank, set_rng_state


def dropout_mask_now() -> torch.Tensor:
    return nn.Dropout(0.5).train()(torch.ones(4096, device=device())) == 0  # LoRA's dropout is an nn.Dropout


def dropout_mask(seed: int, rank: int) -> torch.Tensor:
    seed_rank(seed, rank)
    return dropout_mask_now()


def test_ranks_draw_different_dropout_masks_and_each_rank_the_same_every_run():
    rank0, rank1 = dropout_mask(0, 0), dropout_mask(0, 1)
    assert not torch.equal(rank0, rank1)
    assert torch.equal(dropout_mask(0, 0), rank0) and torch.equal(dropout_mask(0, 1), rank1)
    assert not torch.equal(dropout_mask(1, 0), rank0)  # train.seed still matters


def test_the_rng_state_holds_the_accelerator_state_where_there_is_one_and_restores_the_draws():
    seed_rank(0, 1)
    state = rng_state()
    assert ("cuda" in state) == (device().type == "cuda")  # on CPU ranks: the CPU generator only
    first = dropout_mask_now()
    seed_rank(5, 0)  # anything else in between
    set_rng_state(state)
    assert torch.equal(dropout_mask_now(), first)


def test_a_run_seeds_each_rank_with_the_seed_plus_its_rank_and_checkpoints_its_states(trained_run):
    """The 2-rank run of conftest (train.seed 0): each rank's RNG file has the keys this machine gives,
    and its CPU generator is the one seeded train.seed + rank (a generator keeps its initial seed)."""
    ckpt = trained_run / "checkpoints/step_00000003"
    for rank in (0, 1):
        state = torch.load(ckpt / f"ppcr_rank{rank}_rng.pt", weights_only=True)
        assert set(state) == set(rng_state())
        gen = torch.Generator()
        gen.set_state(state["torch"])
        assert gen.initial_seed() == 0 + rank

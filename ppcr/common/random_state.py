"""Python ``random`` generator states as JSON: checkpoints keep them in the per-rank JSON file
(the global generator, the data stream's shuffle and mixing generators)."""

from __future__ import annotations

import random
from typing import Any

Generator = Any  # a random.Random, or the random module itself (its global generator)


def dump_random(rng: Generator = random) -> list:
    """``rng.getstate()`` as a JSON-able list."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def load_random(state: list, rng: Generator = random) -> None:
    """Undo :func:`dump_random` into ``rng``."""
    rng.setstate((state[0], tuple(state[1]), state[2]))

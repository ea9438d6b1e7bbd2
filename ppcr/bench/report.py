"""Benchmark figures: the median of repetitions with their min and max, paired ratios, and the
Markdown table `make bench` prints and writes beside its JSON."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Figure:
    """One measured quantity over ``n`` repetitions."""

    median: float
    min: float
    max: float
    n: int
    unit: str = ""

    @classmethod
    def of(cls, values: list[float], unit: str = "") -> Figure:
        if not values:
            raise ValueError("a figure needs at least one repetition")
        return cls(statistics.median(values), min(values), max(values), len(values), unit)

    def fmt(self, digits: int = 1, scale: float = 1.0) -> str:
        """'12.3 (11.9-12.8)': median, then min-max over the repetitions."""
        m, lo, hi = (v * scale for v in (self.median, self.min, self.max))
        return f"{m:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"

    def to_dict(self) -> dict:
        return asdict(self)


def paired_ratio(a: list[float], b: list[float], unit: str = "x") -> Figure:
    """a_i / b_i per repetition: both sides were measured in the same repetition, so drift of the
    machine between repetitions cancels."""
    if len(a) != len(b):
        raise ValueError(f"paired ratio needs as many repetitions on both sides ({len(a)} vs {len(b)})")
    return Figure.of([x / y for x, y in zip(a, b)], unit)


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)

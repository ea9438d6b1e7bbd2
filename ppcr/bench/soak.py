"""`make soak`: a long run of a recipe with periodic checkpoints and validation, and the check that
it stays healthy: host memory (the rank and its loader workers) flat, step time not growing.

Both are read from the run's own ``metrics.jsonl`` (global rank 0 and its loader workers; the ranks
run the same code). After a warm-up share of the run, the first and last tenths are compared by their
medians: the run passes when memory grows by less than ``max_memory_growth`` and step time by less
than ``max_time_growth``. A least-squares slope of memory per 1,000 steps is reported beside it.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

from ppcr.bench.report import table


@dataclass(frozen=True)
class Limits:
    warmup_share: float = 0.1  # of the logged steps, left out (allocator and caches filling up)
    max_memory_growth: float = 0.05  # last tenth over first tenth, medians
    max_time_growth: float = 0.10


def read_run(run_dir: Path) -> dict:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {
        "train": [d for d in lines if d["kind"] == "train"],
        "val": [d for d in lines if d["kind"].startswith("val/")],
        "checkpoints": sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")),
    }


def slope_per_1000(steps: list[float], values: list[float]) -> float:
    mean_s, mean_v = statistics.fmean(steps), statistics.fmean(values)
    var = sum((s - mean_s) ** 2 for s in steps)
    return 1000 * sum((s - mean_s) * (v - mean_v) for s, v in zip(steps, values)) / var if var else 0.0


def analyse(run: dict, samples_per_step: int, limits: Limits = Limits()) -> dict:
    """Memory and step-time trends of a run's logged windows; ``ok`` says whether both stay flat."""
    rows = [d for d in run["train"] if "samples_per_s" in d and d["samples_per_s"] > 0]
    rows = rows[int(len(rows) * limits.warmup_share) :]
    if len(rows) < 20:
        raise ValueError(f"a soak needs at least 20 logged windows after the warm-up, the run has {len(rows)}")
    tenth = max(len(rows) // 10, 1)
    first, last = rows[:tenth], rows[-tenth:]
    steps = [d["step"] for d in rows]
    series = {
        "rank RSS (GiB)": lambda d: d["host_rss_gb"],
        "loader workers RSS (GiB)": lambda d: d["loader_rss_gb"],
        "rank + workers RSS (GiB)": lambda d: d["host_rss_gb"] + d["loader_rss_gb"],
        "step time (ms)": lambda d: 1000 * samples_per_step / d["samples_per_s"],
    }
    out = {"steps": [steps[0], steps[-1]], "windows": len(rows), "series": {}}
    for name, get in series.items():
        a, b = statistics.median(map(get, first)), statistics.median(map(get, last))
        out["series"][name] = {
            "first": a,
            "last": b,
            "growth": b / a - 1 if a else 0.0,
            "min": min(map(get, rows)),
            "max": max(map(get, rows)),
            "slope_per_1000_steps": slope_per_1000(steps, [get(d) for d in rows]),
        }
    out["memory_ok"] = out["series"]["rank + workers RSS (GiB)"]["growth"] < limits.max_memory_growth
    out["time_ok"] = out["series"]["step time (ms)"]["growth"] < limits.max_time_growth
    out["ok"] = out["memory_ok"] and out["time_ok"]
    out["validations"] = [d["step"] for d in run["val"]]
    out["checkpoints"] = run["checkpoints"]
    out["limits"] = limits.__dict__
    return out


def report(result: dict) -> str:
    rows = [
        [
            name,
            f"{s['first']:.3f}",
            f"{s['last']:.3f}",
            f"{100 * s['growth']:+.1f} %",
            f"{s['min']:.3f}-{s['max']:.3f}",
            f"{s['slope_per_1000_steps']:+.4f}",
        ]
        for name, s in result["series"].items()
    ]
    lim = result["limits"]
    verdict = "PASSED" if result["ok"] else "FAILED"
    return "\n".join(
        [
            f"# Soak: steps {result['steps'][0]}-{result['steps'][1]} after the warm-up "
            f"({result['windows']} logged windows)",
            "",
            table(
                [
                    "series (global rank 0)",
                    "first tenth, median",
                    "last tenth, median",
                    "growth",
                    "min-max",
                    "slope per 1000 steps",
                ],
                rows,
            ),
            "",
            f"Validations at steps {result['validations']}; checkpoints kept: {result['checkpoints']}.",
            f"{verdict}: memory growth must stay under {100 * lim['max_memory_growth']:.0f} % "
            f"({'met' if result['memory_ok'] else 'NOT met'}), step-time growth under "
            f"{100 * lim['max_time_growth']:.0f} % ({'met' if result['time_ok'] else 'NOT met'}).",
        ]
    )

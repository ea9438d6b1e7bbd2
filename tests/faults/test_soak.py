"""The soak check (`make soak`): a run whose memory or step time grows fails; a flat one, with noise
and a warm-up, passes. The long run itself is `make soak`, not a test."""

import random

import pytest

from ppcr.bench.soak import analyse, slope_per_1000


def run(leak_gb_per_1000=0.0, slowdown_per_1000=0.0, steps=4000, every=25, seed=0):
    rng = random.Random(seed)
    train = []
    for step in range(every, steps + 1, every):
        warm = 0.3 if step < 200 else 0.0  # caches and allocator filling during the warm-up
        rss = 1.0 + warm + leak_gb_per_1000 * step / 1000 + rng.uniform(-0.01, 0.01)
        ms = 300 * (1 + slowdown_per_1000 * step / 1000) * rng.uniform(0.95, 1.05) * (1.5 if step < 100 else 1)
        train.append(
            {
                "step": step,
                "host_rss_gb": rss,
                "loader_rss_gb": 1.1 + rng.uniform(-0.01, 0.01),
                "samples_per_s": 8 / (ms / 1000),
            }
        )
    return {"train": train, "val": [{"step": s} for s in range(500, steps + 1, 500)], "checkpoints": []}


def test_a_flat_run_passes_with_noise_and_warm_up():
    result = analyse(run(), samples_per_step=8)
    assert result["ok"], result["series"]
    assert abs(result["series"]["step time (ms)"]["first"] - 300) < 15


@pytest.mark.parametrize("leak", [0.05, 0.2])
def test_a_memory_leak_fails(leak):
    result = analyse(run(leak_gb_per_1000=leak), samples_per_step=8)
    assert not result["memory_ok"] and result["time_ok"]
    assert result["series"]["rank RSS (GiB)"]["slope_per_1000_steps"] == pytest.approx(leak, rel=0.2)


def test_growing_step_time_fails():
    result = analyse(run(slowdown_per_1000=0.05), samples_per_step=8)
    assert result["memory_ok"] and not result["time_ok"]


def test_slope_of_a_line():
    assert slope_per_1000([0, 1000, 2000], [1.0, 1.5, 2.0]) == pytest.approx(0.5)

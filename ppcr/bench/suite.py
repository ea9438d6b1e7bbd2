"""`make bench`: every benchmark of the framework beside its baseline, in one run, and the page of
tables it writes (results.md) with the same figures and the machine description in results.json."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from ppcr.bench import data, evaluation, machine, memory, training
from ppcr.bench.report import Figure, table
from ppcr.config import load_config
from ppcr.profiling import STAGES


@dataclass(frozen=True)
class Plan:
    reps: int = 5  # repetitions of every timed figure
    steps_per_rep: int = 10  # training steps per repetition (one logged window)
    profile_steps: int = 2
    data_batches: int = 100  # batches per repetition of the data benchmark (a quarter of it at real sizes)


# The input sizes of the 7B recipes, for the data benchmark on the same synthetic images.
REAL_SIZES = ["model.sam_image_size=1024", "model.mllm_image_size=448"]


def run(recipe: str, overrides: list[str], out: Path, plan: Plan = Plan()) -> dict:
    cfg = load_config(recipe, overrides)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results: dict = {"recipe": recipe, "overrides": overrides, "plan": plan.__dict__, "machine": machine.describe()}
    results["matmul_fp32"] = machine.matmul_flops()
    results["data"] = data.run(cfg, plan.reps, plan.data_batches)
    results["data_real_sizes"] = data.run(
        load_config(recipe, overrides + REAL_SIZES), plan.reps, plan.data_batches // 4, warmup=5
    )
    results["resume"] = data.resume_cost(cfg, steps=(10, cfg.train.max_steps), reps=plan.reps)
    results["plain"] = training.plain_loop(cfg, plan.reps, plan.steps_per_rep, plan.profile_steps)
    runs = {
        "zero3_2": (2, "ds_configs/zero3.json"),
        "zero2_2": (2, "ds_configs/zero2.json"),
        "zero3_1": (1, "ds_configs/zero3.json"),
    }
    for name, (nproc, ds) in runs.items():
        results[name] = training.launcher_run(
            name, recipe, overrides, cfg, nproc, ds, out / "runs", plan.reps, plan.steps_per_rep, plan.profile_steps
        )
    models = [memory.build_meta_model(name) for name in memory.RECIPES]
    results["memory_models"] = [
        {k: v for k, v in memory.model_summary(m).items() if k not in ("counts", "table")} for m in models
    ]
    results["memory_paper"] = memory.memory_table(models)
    measured = {results[name]["ranks"]: results[name]["memory"][0] for name in ("zero3_1", "zero3_2")}
    results["memory_small"] = memory.zero3_scaling_rows(
        measured, results["plain"]["trainable_params"], results["plain"]["frozen_params"], cfg.train.precision
    )
    results["eval"] = evaluation.run(cfg, plan.reps)
    results["seconds"] = time.perf_counter() - t0
    return results


def _jsonable(x):
    if isinstance(x, Figure):
        return x.to_dict()
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def write(results: dict, out: Path) -> str:
    page = render(results)
    (out / "results.md").write_text(page + "\n")
    (out / "results.json").write_text(json.dumps(_jsonable(results), indent=1))
    return page


def _utilisation(flops_per_sample: float, run: dict, peak: Figure) -> str:
    """Model FLOP/s of a run and its MFU: training's for a launcher run, against ``peak`` for the plain loop."""
    achieved = flops_per_sample * run["samples_per_s"].median / run["ranks"]
    mfu = run["mfu"].median if "mfu" in run else achieved / peak.median
    return f"{achieved / 1e9:.2f} GFLOP/s, {100 * mfu:.1f} %"


def render(r: dict) -> str:
    m, peak, d, dr, plain = r["machine"], r["matmul_fp32"], r["data"], r["data_real_sizes"], r["plain"]
    z3, z2, z31 = r["zero3_2"], r["zero2_2"], r["zero3_1"]
    v = m["versions"]
    out = [
        f"# ppcr benchmark\n\nrecipe `{r['recipe']}` {' '.join(r['overrides'])}; every figure is the median of "
        f"{r['plan']['reps']} repetitions, (min-max) beside it; the suite took {r['seconds'] / 60:.1f} min.\n",
        "## Machine\n",
        table(
            ["cpu", "cores (usable)", "memory", "GPUs", "fp32 matmul, measured", "versions"],
            [
                [
                    m["cpu"],
                    f"{m['logical_cores']} ({m['usable_cores']})",
                    f"{m['memory_gb']} GB",
                    ", ".join(g["name"] for g in m["gpus"]) or "none",
                    f"{peak.fmt(1, 1e-9)} GFLOP/s ({m['torch_threads']} threads)",
                    f"torch {v['torch']}, deepspeed {v['deepspeed']}, transformers {v['transformers']}",
                ]
            ],
        ),
    ]

    out += [
        f"\n## 1. Data pipeline, per loader worker (one thread, batches of {d['batch_size']}; read, decode, "
        f"preprocess, collate)\n",
        table(
            ["loader", "default sizes (SAM 256, MLLM 112)", "7B recipes' sizes (SAM 1024, MLLM 448)"],
            [
                ["ppcr shard reader (tar stream)", d["shard_reader"].fmt(), dr["shard_reader"].fmt()],
                [
                    "random-access REFER loader, peer style (image file + pycocotools mask per sample)",
                    d["refer_loader"].fmt(),
                    dr["refer_loader"].fmt(),
                ],
                ["**speed-up** (paired per repetition)", d["speedup"].fmt(2) + " x", dr["speedup"].fmt(2) + " x"],
            ],
        ),
        f"\nData wait, share of step time in the default run (ZeRO-3, 2 ranks): {z3['data_wait_share'].fmt(2, 100)} %.",
    ]
    rc = r["resume"]
    early, late = rc["steps"]
    out += [
        f"\n### Resume: seconds from a resumed training loader to its first batch (rank 0 of "
        f"{rc['world_size']}, {rc['num_workers']} loader workers)\n",
        table(
            ["resumed at", "seconds"],
            [
                [f"step {early}", rc["early"].fmt(3)],
                [f"step {late} (epoch {rc['epochs_at_late']} of the slots)", rc["late"].fmt(3)],
                ["late / early (paired)", rc["late_vs_early"].fmt(2) + " x"],
            ],
        ),
    ]

    fps = z3["flops_per_sample"]  # training's formula (ppcr.model.flops); the plain loop runs the same model and data
    rows = []
    for name, x in (
        ("plain PyTorch loop, 1 process", plain),
        ("ZeRO-3, 2 ranks", z3),
        ("ZeRO-2, 2 ranks", z2),
        ("ZeRO-3, 1 rank", z31),
    ):
        per_sample = plain["samples_per_s"].median / x["samples_per_s"].median
        rows.append(
            [name, x["samples_per_s"].fmt(), x["step_ms"].fmt(0), f"{per_sample:.2f}", _utilisation(fps, x, peak)]
        )
    out += [
        f"\n## 2. Training step (tiny default; model FLOPs per sample {fps / 1e9:.3f} GFLOP, "
        f"forward + backward, as training settles them: ppcr.model.flops)\n",
        table(["run", "samples/s", "step ms", "time per sample / plain loop", "model FLOP/s per rank, MFU"], rows),
        "\nMFU of the launcher runs as training logs it (against each rank's matmul, measured with its share of "
        "the threads); the plain loop's against the machine's matmul above.",
    ]

    cols = [("plain", plain), ("ZeRO-2 x2", z2), ("ZeRO-3 x2", z3)]
    prow = [[s] + [f"{c['profile']['stages_ms'][s]:.1f}" for _, c in cols] for s in STAGES]
    prow.append(["other (Python between stages)"] + [f"{c['profile']['other_ms']:.1f}" for _, c in cols])
    prow.append(["**step**"] + [f"**{c['profile']['step_ms']:.1f}**" for _, c in cols])
    prow.append(
        ["communication (collectives executing; overlaps the stages above)"]
        + [f"{c['profile']['communication_ms']:.1f} ({c['profile']['collectives_per_step']:.0f} ops)" for _, c in cols]
    )
    out += [
        f"\n## 3. Where time goes: ms per step on rank 0, mean of {r['plan']['profile_steps']} profiled steps\n",
        table(["stage"] + [n for n, _ in cols], prow),
    ]

    counts = "; ".join(
        f"{m['recipe']}: {m['total'] / 1e9:.2f} B parameters, {m['trainable'] / 1e6:.1f} M trained"
        for m in r["memory_models"]
    )
    small = [
        [
            str(x["world_size"]),
            x["state"],
            f"{x['measured'] / 2**20:.2f}",
            f"{x['expected'] / 2**20:.2f}",
            f"{x['measured_vs_1_rank']:.3f}",
            f"{x['expected_vs_1_rank']:.3f}",
        ]
        for x in r["memory_small"]
    ]
    out += [
        "\n## 4. Memory\n",
        "### At real scale, on paper: GiB per GPU (DeepSpeed's estimators for the trained "
        "parameters, 16-bit frozen weights, activations of one micro batch, 1.5 GiB allowance)\n",
        f"{counts}.\n",
        memory.render_markdown(r["memory_paper"]),
        "\n### Checked in small: ZeRO-3 model states per rank of the tiny default, after the first step (MiB)\n",
        table(["ranks", "state", "measured", "expected (estimator)", "measured / 1 rank", "expected / 1 rank"], small),
    ]

    speedup = z3["samples_per_s"].median / z31["samples_per_s"].median
    out += [
        "\n## 5. Scaling (ZeRO-3)\n",
        table(
            ["ranks", "step ms", "samples/s", "speed-up over 1 rank"],
            [
                ["1", z31["step_ms"].fmt(0), z31["samples_per_s"].fmt(), "1.00"],
                ["2", z3["step_ms"].fmt(0), z3["samples_per_s"].fmt(), f"{speedup:.2f}"],
            ],
        ),
    ]
    ev = r["eval"]
    out += [
        f"\n## 6. Evaluation by generation, 1 process on {ev['device']} ({ev['expressions']} expressions of "
        f"{ev['split']}; the recipe's base weights, PPCR heads untrained)\n",
        table(
            ["batch", "expressions/s", "LM forwards per expression", "speed-up (paired)"],
            [
                ["1", ev["batch_1"].fmt(2), f"{ev['forwards_batch_1']:.1f}", "1.00"],
                [str(ev["batch_size"]), ev["batched"].fmt(2), f"{ev['forwards_batched']:.2f}", ev["speedup"].fmt(2)],
            ],
        ),
        f"\nSame answers and masks at batch 1 and batch {ev['batch_size']} (8 expressions checked): "
        f"{'yes' if ev['same_answers_and_masks'] else '**no**'}.",
    ]
    if not m["gpus"]:
        out.append("\n## 7. GPU\n\nNo GPU on this machine: the bf16 GPU runs were not made.")
    return "\n".join(out)

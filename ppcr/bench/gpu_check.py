"""The GPU check (`make gpu-check`, ``launch/gpu_check.py``): a 7B recipe's real architecture, trained
for a few ZeRO-3 bf16 steps through the real launcher, measured against the memory estimator.

1. The recipe's MLLM (Qwen2.5-VL-7B-Instruct or LLaVA-1.5-7B) is built from its published config.json
   (:mod:`ppcr.bench.memory`) with random weights and written with ``save_pretrained``; SAM (ViT-H in
   both recipes) from segment_anything's registry, its state dict written as Meta's checkpoints are.
   Nothing is downloaded. The tokenizer is ppcr's tiny byte-level BPE inside the family's real
   processor (the real tokenizer is not on disk); the embeddings and LM head keep the published
   rows (152,064 for Qwen2.5-VL), and the config's special-token ids are the tokenizer's.
   ``layers`` shrinks the depth only, every width kept: the language model's layers, the vision
   tower's blocks and SAM's image-encoder blocks (SAM then loads as ``model.sam_type: tiny`` at the
   released model's widths, ``model.sam_arch``, since the registry fixes the depth).
2. A synthetic RefCOCO-shaped set (``ppcr.data.synthetic``, COCO-like 480-640 px images) is sharded
   with the builder a real dataset uses; the recipe's input sizes (448 / 336 px MLLM, 1024 px SAM)
   and micro batch stay.
3. ``deepspeed --num_gpus N launch/train.py --config <the 7B recipe>`` trains ``warmup + steps``
   steps (no validation), logging every step.
4. The report: step time and samples/s over the steps after the warm-up, the losses, the peak
   accelerator memory (``torch.cuda.max_memory_allocated``, the largest rank's; n/a on CPU, where rank
   0's resident size is given instead) beside the estimator's per-GPU figure for the same config
   (:func:`predicted_memory`), ZeRO-3's measured model states beside what the estimator expects,
   and model FLOP utilisation as training logs it (:mod:`ppcr.model.flops`: the formula, since the
   recipes train with gradient checkpointing).

Written to ``<out>/gpu_check.md`` and ``<out>/gpu_check.json``; the models and data stay under
``<out>`` and are reused by the next run with the same recipe and depth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from transformers import LlavaForConditionalGeneration, Qwen2_5_VLForConditionalGeneration

from ppcr.bench import machine, memory
from ppcr.bench.report import Figure, table
from ppcr.bench.training import run_launcher
from ppcr.config import SyntheticConfig, load_config
from ppcr.data import synthetic
from ppcr.data.shards import build_shards
from ppcr.model.sam import SAM_ARCHS, build_sam, sam_arch, save_sam_state
from ppcr.model.tiny import LLAVA_SPECIAL, QWEN_SPECIAL, build_processor, build_tokenizer

GIB = 2**30
RUN_NAME = "gpu_check"
SHARD_SET = "synthetic_unc"


@dataclass
class Plan:
    """What one check runs; ``overrides`` (key.sub=value) apply to the run and to the estimator alike."""

    recipe: str = "qwen2.5-vl-7b"  # a name of ppcr.bench.memory.RECIPES
    out: Path = Path("runs/gpu_check")
    layers: int | None = None  # None: the published depth
    steps: int = 5  # timed steps
    warmup_steps: int = 2  # steps before them, not timed
    nproc: int = 1  # ranks (GPUs, or CPU processes without one)
    train_images: int = 64  # synthetic training images (3 refs each)
    peak_flops: float | None = None  # per device; None: training's (ppcr.model.flops.device_peak)
    overrides: list[str] = field(default_factory=list)
    seed: int = 0

    def check(self) -> None:
        if self.recipe not in memory.RECIPES:
            raise ValueError(f"unknown recipe '{self.recipe}' (choose from {', '.join(memory.RECIPES)})")
        for name in ("steps", "nproc", "train_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.layers is not None and self.layers < 1:
            raise ValueError(f"layers must be >= 1 (or unset for the published depth), got {self.layers}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"the peak FLOP/s must be > 0, got {self.peak_flops}")
        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if not gpus and self.layers is None:
            raise ValueError(
                "no GPU: at the published depth (8.9 B parameters) the check would take hours on a "
                "CPU; --layers N (e.g. 1) shrinks the depth to try it there"
            )
        if gpus and self.nproc > gpus:
            raise ValueError(f"{self.nproc} ranks asked, {gpus} GPU(s) here")


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    """Modules built inside take ``dtype`` (random bf16 weights without an fp32 copy first)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _device() -> str:
    """Where the backbones are initialised: the GPU if there is one."""
    return "cuda" if torch.cuda.is_available() else "cpu"


# ---------------------------------------------------------------------------------------------- backbones


def write_mllm(family: str, out: Path, *, layers: int | None, image_size: int, seed: int) -> Path:
    """The family's published architecture (depth ``layers`` if given) with random bf16 weights, and its
    processor around the tiny tokenizer, written with ``save_pretrained`` to ``out``. Initialised on
    the GPU when there is one (seconds instead of minutes for 8B parameters)."""
    config = memory.published_config(family, layers)
    if family == "qwen2_5_vl":
        tokenizer = build_tokenizer(QWEN_SPECIAL, family)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL}
        config.update(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        config.pop("vision_token_id")  # <|vision_pad|>, not in the tiny tokenizer and unused for images
        v = config["vision_config"]
        processor = build_processor(
            family, image_size, tokenizer, v["patch_size"], v["spatial_merge_size"], v["temporal_patch_size"]
        )
        cls = Qwen2_5_VLForConditionalGeneration
    else:
        tokenizer = build_tokenizer(LLAVA_SPECIAL, family)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in LLAVA_SPECIAL}
        config.update(image_token_index=ids["<image>"], pad_token_id=ids["<pad>"])
        config["text_config"].update(bos_token_id=ids["<s>"], eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"])
        processor = build_processor(family, image_size, tokenizer, config["vision_config"]["patch_size"])
        cls = LlavaForConditionalGeneration
    torch.manual_seed(seed)
    with torch.device(_device()), _default_dtype(torch.bfloat16):
        model = cls(memory.mllm_config(family, config))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def sam_overrides(sam_type: str, layers: int | None) -> list[str]:
    """Config overrides for SAM ``sam_type`` at depth ``layers``: none at the released depth (the
    registry builds it); otherwise ``model.sam_type: tiny`` with the released widths, heads, window,
    prompt and decoder sizes (segment_anything's ``_build_sam``) and the global-attention blocks
    below ``layers`` (the last block when none is)."""
    if layers is None:
        return []
    if sam_type not in SAM_ARCHS:
        raise ValueError(f"model.sam_type '{sam_type}': the check builds a released SAM ({', '.join(SAM_ARCHS)})")
    released = SAM_ARCHS[sam_type]
    arch = dataclasses.replace(
        released,
        encoder_depth=layers,
        global_attn_indexes=[i for i in released.global_attn_indexes if i < layers] or [layers - 1],
    )
    arch_yaml = yaml.safe_dump(vars(arch), default_flow_style=True, width=10**6).strip()
    return ["model.sam_type=tiny", f"model.sam_arch={arch_yaml}"]


def write_sam(cfg, path: Path, *, seed: int) -> Path:
    """A randomly initialised SAM of ``cfg.model`` (registry or ``tiny`` at ``sam_arch``), saved as a plain
    fp32 state dict like Meta's checkpoints (safetensors)."""
    torch.manual_seed(seed)
    with torch.device(_device()):
        m = cfg.model
        sam = build_sam(sam_arch(m), m.sam_image_size)
    save_sam_state({k: v.cpu() for k, v in sam.state_dict().items()}, path)
    return path


# ---------------------------------------------------------------------------------------------- data


def write_shards(root: Path, *, train_images: int, slots: int, seed: int) -> Path:
    """The synthetic set at COCO-like image sizes (480-640 px), sharded with at least two training shards
    per loader slot (rank x worker), as the loader wants; returns the shard set's directory."""
    cfg = SyntheticConfig(
        seed=seed, num_images={"train": train_images, "val": 4}, min_image_size=480, max_image_size=640
    )
    counts = synthetic.generate(cfg, root / "refer", root / "images", workers=1)
    out = root / "shards" / SHARD_SET
    build_shards(
        root / "refer",
        "synthetic",
        "unc",
        root / "images" / "synthetic",
        out,
        splits=["train", "val"],
        workers=1,
        max_samples=max(1, counts["train"]["refs"] // (2 * slots)),
    )
    return out


def _data_spec(plan: Plan, slots: int) -> dict:
    """What the shards written for ``plan`` depend on (a change rewrites them)."""
    return {"train_images": plan.train_images, "slots": slots, "seed": plan.seed, "sizes": [480, 640]}


def prepare(plan: Plan, cfg, slots: int) -> dict[str, Path]:
    """Backbones and shards under ``plan.out``, written unless a previous check left the same ones (a
    ``spec.json`` beside each, written last, says what they are)."""
    m = cfg.model
    depth = "published" if plan.layers is None else f"{plan.layers}-layers"
    family = memory.RECIPES[plan.recipe][1]
    paths = {
        "mllm": plan.out / "models" / f"{plan.recipe}_{depth}",
        "sam": plan.out / "models" / f"sam_{m.sam_type}_{depth}.safetensors",
        "data": plan.out / "data",
    }
    spec = {"family": family, "layers": plan.layers, "image_size": m.mllm_image_size, "seed": plan.seed}
    marker = paths["mllm"] / "spec.json"
    if not marker.is_file() or json.loads(marker.read_text()) != spec:
        t0 = time.perf_counter()
        write_mllm(family, paths["mllm"], layers=plan.layers, image_size=m.mllm_image_size, seed=plan.seed)
        marker.write_text(json.dumps(spec))
        print(
            f"wrote {plan.recipe} ({depth}, random weights) to {paths['mllm']} in {time.perf_counter() - t0:.0f} s",
            flush=True,
        )
    sam_marker = paths["sam"].with_suffix(".spec.json")
    sam_spec = {"sam_type": m.sam_type, "arch": vars(m.sam_arch), "size": m.sam_image_size, "seed": plan.seed}
    if not paths["sam"].is_file() or not sam_marker.is_file() or json.loads(sam_marker.read_text()) != sam_spec:
        write_sam(cfg, paths["sam"], seed=plan.seed)
        sam_marker.write_text(json.dumps(sam_spec))
        print(f"wrote SAM ({m.sam_type}, {depth}, random weights) to {paths['sam']}", flush=True)
    data_marker = paths["data"] / "spec.json"
    if not data_marker.is_file() or json.loads(data_marker.read_text()) != _data_spec(plan, slots):
        write_shards(paths["data"], train_images=plan.train_images, slots=slots, seed=plan.seed)
        data_marker.write_text(json.dumps(_data_spec(plan, slots)))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the backbones' memory back to the GPU before the run starts
    return paths


# ---------------------------------------------------------------------------------------------- memory


def predicted_memory(rm: memory.RecipeModel, world: int) -> dict[str, float]:
    """The estimator's per-GPU figure for ``rm`` under ZeRO-3 on ``world`` GPUs of one node, in bytes, as
    the memory table computes it (:func:`ppcr.bench.memory.memory_table`): model states (DeepSpeed's
    estimator for the trained parameters, the frozen ones' 16-bit partitions), activations of one
    micro batch, and the allowance for the CUDA context, communication buffers and fragmentation (``per_gpu``;
    ``allocated`` leaves the allowance out: what ``torch.cuda.max_memory_allocated`` can be compared with);
    and the model states alone mapped to bf16 (:func:`ppcr.bench.memory.expected_zero3_bytes_per_rank`),
    which is what training's first-step ``memory`` record measures."""
    states = memory.model_state_memory(rm.trainable, rm.frozen, rm.largest_layer, num_gpus_per_node=world)["zero3"]
    acts = memory.activation_memory(rm)["peak"]
    allowance = memory.ALLOWANCE_GIB * GIB
    expected = memory.expected_zero3_bytes_per_rank(rm.trainable, rm.frozen, world, precision="bf16")
    return {
        "model_states": states["gpu"],
        "activations": acts,
        "allowance": allowance,
        "allocated": states["gpu"] + acts,
        "per_gpu": states["gpu"] + acts + allowance,
        "model_states_bf16": expected["total"],
    }


# ---------------------------------------------------------------------------------------------- the check


def run_overrides(plan: Plan, paths: dict[str, Path], shard_dir: Path, *, user: list[str]) -> list[str]:
    """The run's overrides: the written backbones and shards, ``user`` (SAM's and the plan's), then the
    check's own: its steps, logging every step, no validation, ZeRO-3 in bf16."""
    sets = f"[{{name: {SHARD_SET}, split: %s}}]"
    return [
        f"model.mllm_path={paths['mllm']}",
        "model.tiny_family=null",
        f"model.sam_checkpoint={paths['sam']}",
        f"paths.shards_root={shard_dir.parent}",
        "data.train_sets=" + sets % "train",
        "eval.sets=" + sets % "val",
        f"paths.runs_root={plan.out / 'runs'}",
        *user,
        f"train.run_name={RUN_NAME}",
        f"train.max_steps={plan.warmup_steps + plan.steps}",
        "train.log_every=1",
        f"train.save_every={plan.warmup_steps + plan.steps}",
        "train.val_samples=0",
        "train.warmup_steps=1",
        "train.precision=bf16",
        "model.dtype=bfloat16",
        "train.ds_config=ds_configs/zero3.json",
    ]


def run(plan: Plan) -> dict:
    """Write the backbones and data, train, and gather every figure of the report."""
    plan.check()
    plan = dataclasses.replace(plan, out=plan.out.resolve())  # the launcher runs from the repository root
    t0 = time.perf_counter()
    recipe = memory.RECIPES[plan.recipe][0]
    base = load_config(recipe, plan.overrides)
    user = [*sam_overrides(base.model.sam_type, plan.layers), *plan.overrides]
    cfg = load_config(recipe, user)
    slots = plan.nproc * max(1, cfg.data.num_workers)
    paths = prepare(plan, cfg, slots)
    shard_dir = paths["data"] / "shards" / SHARD_SET
    overrides = run_overrides(plan, paths, shard_dir, user=user)
    cfg = load_config(recipe, overrides)

    rm = memory.build_meta_model(plan.recipe, overrides=overrides, layers=plan.layers)
    predicted = predicted_memory(rm, plan.nproc)

    print(
        f"training {plan.warmup_steps} + {plan.steps} steps: deepspeed --num_gpus {plan.nproc} launch/train.py "
        f"--config {recipe} {' '.join(overrides)}",
        flush=True,
    )
    t1 = time.perf_counter()
    done = run_launcher(str(recipe), overrides, plan.nproc, plan.out / "runs" / RUN_NAME, capture=False)
    train_wall = time.perf_counter() - t1
    if done.returncode != 0:
        raise RuntimeError(f"the training run failed (exit {done.returncode}); its output is above")
    records = [json.loads(line) for line in (plan.out / "runs" / RUN_NAME / "metrics.jsonl").read_text().splitlines()]
    return report(
        plan,
        cfg,
        rm,
        records=records,
        overrides=overrides,
        predicted=predicted,
        timing={"train_wall_s": train_wall, "total_s": time.perf_counter() - t0},
    )


def report(
    plan: Plan, cfg, rm: memory.RecipeModel, *, records: list[dict], overrides: list[str], predicted: dict, timing: dict
) -> dict:
    """The figures from the run's metrics.jsonl (one ``train`` record a step, the ``memory`` and ``flops``
    records of step 1) beside the estimator's; MFU is training's, against ``plan.peak_flops`` if given."""
    train = sorted((d for d in records if d["kind"] == "train"), key=lambda d: d["step"])
    timed = [d for d in train if d["step"] > plan.warmup_steps]
    if len(train) != plan.warmup_steps + plan.steps or len(timed) != plan.steps:
        raise RuntimeError(f"expected {plan.warmup_steps + plan.steps} logged steps, found {len(train)}")
    per_step = plan.nproc * cfg.train.micro_batch_size * cfg.train.grad_accum
    rates = [d["samples_per_s"] for d in timed]
    gpus = machine.describe()["gpus"]
    device = gpus[0]["name"] if gpus else None
    flops = next(d for d in records if d["kind"] == "flops")  # ppcr.model.flops, as training settled them
    peak = plan.peak_flops or flops["peak_per_device"]
    mfu = statistics.median(d["mfu"] for d in timed) * flops["peak_per_device"] / peak
    states = next((d for d in records if d["kind"] == "memory"), None)
    measured_peak = max(d["peak_mem_gib"] for d in train) * GIB if device else None
    return {
        "recipe": plan.recipe,
        "layers": plan.layers,
        "device": device or "cpu (no accelerator)",
        "ranks": plan.nproc,
        "micro_batch": cfg.train.micro_batch_size,
        "grad_accum": cfg.train.grad_accum,
        "samples_per_step": per_step,
        "warmup_steps": plan.warmup_steps,
        "timed_steps": plan.steps,
        "overrides": overrides,
        "params": {"total": rm.total, "trainable": rm.trainable, "frozen": rm.frozen},
        "losses": {d["step"]: d["loss"] for d in train},
        "losses_finite": all(math.isfinite(d["loss"]) for d in train),
        "step_s": Figure.of([per_step / r for r in rates], "s").to_dict(),
        "samples_per_s": Figure.of(rates, "samples/s").to_dict(),
        "data_wait_share": statistics.median(d["data_wait_share"] for d in timed),
        "memory": {
            "peak_accelerator_bytes": measured_peak,
            "host_rss_rank0_max_bytes": max(d["host_rss_gb"] for d in train) * GIB,
            "predicted": predicted,
            # like with like: max_memory_allocated counts what the caching allocator handed out, never the CUDA
            # context, NCCL's buffers or fragmentation, which the estimate's allowance covers
            "peak_vs_predicted": measured_peak / predicted["allocated"] if measured_peak else None,
            "model_states_measured": {k: states[k] for k in ("params", "gradients", "optimizer", "total")}
            if states
            else None,
        },
        "flops": {
            "per_sample": flops,
            "per_step_model": flops["sample"] * per_step,
            "achieved_per_device": mfu * peak,
            "peak_per_device": peak,
            "mfu": mfu,
            "hfu": mfu * flops["hardware"] / flops["sample"] if "hardware" in flops else None,
        },
        "timing": timing,
    }


def _gib(b: float | None) -> str:
    """Bytes as GiB, or n/a."""
    return "n/a" if b is None else f"{b / GIB:.2f} GiB"


def render(r: dict) -> str:
    """The report as Markdown: one table of the figures, the losses, and how they were measured."""
    m, f = r["memory"], r["flops"]
    p = m["predicted"]
    depth = "published depth" if r["layers"] is None else f"depth shrunk to {r['layers']} layers"
    states = m["model_states_measured"]
    cpu_note = (
        "" if m["peak_accelerator_bytes"] else f" (CPU: rank 0's resident size {_gib(m['host_rss_rank0_max_bytes'])})"
    )
    rows = [
        ["device", f"{r['device']}, {r['ranks']} rank(s)"],
        [
            "model",
            f"{r['recipe']} + SAM, {depth}; {r['params']['total'] / 1e9:.3f} B parameters, "
            f"{r['params']['trainable'] / 1e6:.1f} M trained",
        ],
        [
            "batch",
            f"{r['samples_per_step']} samples a step ({r['ranks']} x micro {r['micro_batch']} x accumulation "
            f"{r['grad_accum']}); {r['warmup_steps']} warm-up + {r['timed_steps']} timed steps",
        ],
        ["step time", f"{Figure(**r['step_s']).fmt(3)} s (median, min-max)"],
        ["samples/s", f"{Figure(**r['samples_per_s']).fmt(2)}; data wait {100 * r['data_wait_share']:.1f} %"],
        ["peak accelerator memory (largest rank)", _gib(m["peak_accelerator_bytes"]) + cpu_note],
        [
            "estimator, per GPU",
            f"{_gib(p['per_gpu'])} = model states {_gib(p['model_states'])} + activations "
            f"{_gib(p['activations'])} + allowance {_gib(p['allowance'])}"
            + (
                f"; measured / estimated allocations (model states + activations) {m['peak_vs_predicted']:.2f}"
                if m["peak_vs_predicted"]
                else ""
            ),
        ],
        [
            "model states, measured (step 1)",
            "n/a"
            if states is None
            else f"{_gib(states['total'])} (params {_gib(states['params'])}, gradients {_gib(states['gradients'])}, "
            f"optimizer {_gib(states['optimizer'])}); expected in bf16 {_gib(p['model_states_bf16'])}",
        ],
        [
            "model FLOPs",
            f"{f['per_sample']['sample'] / 1e12:.3f} TFLOP a sample, {f['per_step_model'] / 1e12:.2f} "
            f"TFLOP a step; achieved {f['achieved_per_device'] / 1e12:.3g} TFLOP/s per device",
        ],
        [
            "MFU (HFU)",
            f"{100 * f['mfu']:.1f} %"
            + ("" if f["hfu"] is None else f" ({100 * f['hfu']:.1f} %)")
            + f" of {f['peak_per_device'] / 1e12:.3g} TFLOP/s per device",
        ],
        ["losses", ", ".join(f"{k}: {v:.3f}" for k, v in r["losses"].items())],
        ["wall time", f"training run {r['timing']['train_wall_s']:.0f} s, whole check {r['timing']['total_s']:.0f} s"],
    ]
    tok = f["per_sample"]
    parts = ("lm_forward", "lm_backward", "lm_head", "vision_tower", "sam_image_encoder", "recompute")
    notes = (
        f"Tokens a sample (mean, training's first step): semantic {tok['tokens_semantic_image']:.0f} image + "
        f"{tok['tokens_semantic_text']:.1f} text, spatial {tok['tokens_spatial_image']:.0f} + "
        f"{tok['tokens_spatial_text']:.1f}. "
        + "FLOPs a sample by part (TFLOP, ppcr.model.flops.sample_flops): "
        + ", ".join(f"{k} {tok[k] / 1e12:.3f}" for k in parts)
        + ". "
        + "Step time = samples a step / samples/s, over the timed steps."
    )
    return "## GPU check\n\n" + table(["figure", "value"], rows) + "\n\n" + notes


def write(results: dict, out: Path) -> str:
    """``<out>/gpu_check.md`` (:func:`render`, also returned) and ``<out>/gpu_check.json``."""
    page = render(results)
    (out / "gpu_check.md").write_text(page + "\n")
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1))
    return page

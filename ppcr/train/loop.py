"""The training loop: micro-batches through the DeepSpeed engine, logging, checkpoints, validation,
preemption. Everything else (setup, saving, logging sinks) lives in its own module."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from tqdm import tqdm

from ppcr.common.distributed import DistInfo, all_reduce_sum, device
from ppcr.common.logger import RunLogger
from ppcr.config import Config
from ppcr.model import flops
from ppcr.model.losses import TERMS
from ppcr.profiling import StepProfiler, mark
from ppcr.train import checkpoint
from ppcr.train.memory import host_memory_gb, model_state_bytes, peak_memory_gib
from ppcr.train.nonfinite import NonfiniteGuard
from ppcr.train.preempt import Preemption


@dataclass
class Window:
    """Sums between two log lines, reduced over ranks when logged. The loss terms stay on the device
    until then: adding them never waits for the device. ``counts``: per stage, the token counts of the
    window's micro-batches (host integers, :meth:`ppcr.model.inputs.StageInputs.counts`)."""

    terms: torch.Tensor | None = None
    samples: int = 0
    data_s: float = 0.0
    step_s: float = 0.0
    micro: int = 0
    counts: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, out: dict, samples: int, data_s: float, step_s: float) -> None:
        vals = torch.stack([out["loss"].detach()] + [out[t].detach() for t in TERMS]).double()
        self.terms = vals if self.terms is None else self.terms + vals
        self.samples, self.data_s, self.step_s, self.micro = (
            self.samples + samples,
            self.data_s + data_s,
            self.step_s + step_s,
            self.micro + 1,
        )
        for stage, counts in out["tokens"].items():
            mine = self.counts.setdefault(stage, dict.fromkeys(counts, 0))
            for k, v in counts.items():
                mine[k] += v

    def report(
        self,
        dist: DistInfo,
        counters: dict[str, float],
        *,
        sample_flops: float | None,
        peak_flops: float,
        peak_mem_gib: float,
    ) -> dict[str, float]:
        """Means over ranks of the window's finite micro-batches (all ranks agree on which those were),
        throughput (samples/s, and tokens/s: the tokens both stages put through the language model), MFU
        (each rank's model FLOPs, ``sample_flops`` a sample, over its step time, summed, against the summed
        ``peak_flops``; none while ``sample_flops`` is unknown), data wait, each rank's ``peak_mem_gib`` and
        their largest, and ``counters`` summed over ranks. One all-reduce."""
        world = dist.world_size
        terms = self.terms if self.terms is not None else torch.zeros(len(TERMS) + 1, dtype=torch.float64)
        memory = [peak_mem_gib if r == dist.rank else 0.0 for r in range(world)]
        tokens = sum(c["tokens"] for c in self.counts.values())
        extra = torch.tensor(
            [
                self.samples,
                tokens,
                self.data_s,
                self.step_s,
                (sample_flops or 0.0) * self.samples,
                peak_flops,
                *memory,
                *counters.values(),
            ],
            dtype=torch.float64,
        )
        sums = all_reduce_sum(torch.cat([terms.to(device()), extra.to(device())])).cpu().tolist()
        n = self.micro * world
        out = {name: sums[i] / n for i, name in enumerate(("loss",) + TERMS)} if n else {}
        samples, tokens, data_s, step_s, model_flops, peak_flops, *rest = sums[len(TERMS) + 1 :]
        seconds = step_s / world  # a rank's time in the window, the mean over ranks
        out["samples_per_s"] = samples / seconds if step_s else 0.0
        out["tokens_per_s"] = tokens / seconds if step_s else 0.0
        if sample_flops and step_s:
            out["mfu"] = model_flops / seconds / peak_flops
        out["data_wait_share"] = data_s / step_s if step_s else 0.0
        out["peak_mem_gib"] = max(rest[:world])
        out.update({f"peak_mem_gib/rank{r}": m for r, m in enumerate(rest[:world])})
        out.update(zip(counters, rest[world:]))
        return out


class Utilisation:
    """This rank's terms of MFU (:mod:`ppcr.model.flops`): its device's peak FLOP/s, looked up or measured at
    start, and the model FLOPs of a training sample from the formula on the first step whose micro-batches all
    had a finite loss (its token counts). Not torch's FLOP counter around a step, though it counts exactly: its
    dispatch mode changes the step's floating-point results (gradients by up to 8e-6 on the tiny default), so
    a run would no longer give the same losses as the same run without it, nor resume exactly; the formula is
    checked against the counter in tests/test_flops.py (6 % below it on the tiny models, the small parts it
    leaves out)."""

    def __init__(self, cfg: Config) -> None:
        self.checkpointing = cfg.model.gradient_checkpointing
        self.peak, self.peak_source = flops.device_peak(device(), getattr(torch, cfg.model.dtype))
        self.sample_flops: float | None = None

    def settle(self, model, window: Window, *, all_finite: bool) -> dict[str, float] | None:
        """After a step: the FLOPs a sample on this rank (with the formula's parts) and its mean tokens by stage,
        the first time they can be settled, else None."""
        if self.sample_flops is not None or not all_finite:
            return None
        per_sample = flops.per_sample(window.counts)
        parts = flops.sample_flops(flops.flop_shapes(model), per_sample, self.checkpointing)
        self.sample_flops = parts["model"]
        tokens = {f"tokens_{stage}_{k}": v for stage, counts in per_sample.items() for k, v in counts.items()}
        return {"sample": parts.pop("model"), "peak_per_device": self.peak, **parts, **tokens}


class SampleRecord:
    """``train.record_samples``: every sample a rank trains on, one JSON line per micro-batch in
    ``<run>/samples/rank<R>.jsonl`` (step, then per sample its shard set's key and the epoch it was read in): an
    audit of the data order that owes nothing to the loader's own bookkeeping, e.g. across an elastic resume.
    A run killed between checkpoints repeats the steps after the last one when it resumes, and their lines;
    the later ones count."""

    def __init__(self, run_dir: Path, rank: int) -> None:
        (run_dir / "samples").mkdir(parents=True, exist_ok=True)
        self.file = open(run_dir / "samples" / f"rank{rank}.jsonl", "a")

    def add(self, step: int, batch: dict) -> None:
        self.file.write(json.dumps({"step": step, "keys": batch["keys"], "epochs": batch["epochs"]}) + "\n")

    def close(self) -> None:
        self.file.close()


def optimizer_step(
    engine,
    batches,
    guard: NonfiniteGuard,
    window: Window,
    grad_accum: int,
    sam_boxes: dict | None = None,
    *,
    record: Callable[[dict], None] | None = None,
) -> int:
    """One optimizer step over ``grad_accum`` micro-batches; returns how many had a finite loss.

    A micro-batch whose loss is not finite on some rank gets no backward on any rank. It still counts
    towards DeepSpeed's accumulation boundary: its ``engine.step()`` is made before the next backward,
    or at the end when an earlier one was finite, so that the boundary's step applies the update. A
    step with no finite micro-batch calls nothing: no update, and the engine's counters stay aligned.
    """
    finite = stepped = 0  # finite micro-batches; engine.step() calls made
    for micro in range(grad_accum):
        t0 = time.perf_counter()
        with mark("data"):
            batch = next(batches)
        if record is not None:
            record(batch)
        if sam_boxes:
            batch.update(sam_boxes)
        t1 = time.perf_counter()
        out = engine(batch)
        if not guard.finite(out):
            continue
        with mark("optimizer"):
            for _ in range(micro - stepped):  # skipped micro-batches before this one: counters only
                engine.step()
        with mark("backward"):
            engine.backward(out["loss"])
        with mark("optimizer"):
            engine.step()
        finite, stepped = finite + 1, micro + 1
        window.add(out, len(batch["keys"]), t1 - t0, time.perf_counter() - t0)
    if 0 < stepped < grad_accum:
        with mark("optimizer"):
            for _ in range(grad_accum - stepped):  # the last one is the boundary: the update
                engine.step()
    return finite


def train(
    cfg: Config,
    dist: DistInfo,
    engine,
    loader,
    *,
    run_dir: Path,
    start_step: int,
    log: RunLogger,
    identity: dict[str, str],
    validator=None,
) -> tuple[str, int, dict[str, int]]:
    """Run from ``start_step`` to train.max_steps; returns ("done" | "halted" | "preempted", last step,
    run totals for the summary: samples skipped over all ranks, steps without update). Raises
    :class:`NonfiniteLossError` when the loss stays NaN or Inf. ``identity`` goes into every checkpoint
    (:func:`ppcr.train.checkpoint.save`).

    ``validator`` (:class:`ppcr.eval.validate.Validator`, built by the entry point: training does not
    import evaluation) has ``name``, ``run(model, should_stop) -> (metrics, image) | None`` and
    ``summary(metrics) -> str`` (the console line); it asks
    ``should_stop`` between its batches, so that a preemption during validation checkpoints and exits
    within a batch."""
    t = cfg.train
    ckpt_dir = run_dir / "checkpoints"
    preempt = Preemption()
    guard = NonfiniteGuard(t.max_nonfinite_steps)
    profiler = StepProfiler(t.profile_at_step, t.profile_steps, run_dir / "profile", dist.rank)
    bar = tqdm(
        total=t.max_steps, initial=start_step, disable=not dist.is_main, desc="train", unit="step", dynamic_ncols=True
    )
    batches = iter(loader)
    window = Window()
    mfu = Utilisation(cfg)
    step = start_step
    status = "done"
    samples = SampleRecord(run_dir, dist.rank) if t.record_samples else None
    try:
        while step < t.max_steps:
            profiler.begin(step + 1)
            share = max(0.0, 1.0 - step / t.sam_gt_box_steps) if t.sam_gt_box_steps else 0.0
            share = max(share, t.sam_gt_box_floor)
            sam_boxes = {"gt_box_share": share, "gt_box_jitter": t.sam_box_jitter, "step": step + 1}
            with mark("step"):
                finite = optimizer_step(
                    engine,
                    batches,
                    guard,
                    window,
                    t.grad_accum,
                    sam_boxes,
                    record=None if samples is None else partial(samples.add, step + 1),
                )
            step += 1
            settled = mfu.settle(engine.module, window, all_finite=finite == t.grad_accum)
            if settled:
                log.scalars(step, settled, prefix="flops")
                log.message(
                    f"MFU: {settled['sample'] / 1e9:.4g} GFLOP a training sample (formula); "
                    f"peak {mfu.peak / 1e12:.4g} TFLOP/s a rank ({mfu.peak_source})"
                )
            bar.update(1)
            guard.end_step(step, finite, t.grad_accum)
            if step == start_step + 1:  # Adam's states exist from the first step on
                log.scalars(step, model_state_bytes(engine), prefix="memory")
            if step % t.log_every == 0 or step == t.max_steps:
                values = window.report(
                    dist,
                    {"skipped_samples": loader.skipped_samples},
                    sample_flops=mfu.sample_flops,
                    peak_flops=mfu.peak,
                    peak_mem_gib=peak_memory_gib(),
                )
                values.update(nonfinite_steps=guard.skipped_steps, nonfinite_micro_batches=guard.skipped_micro_batches)
                window = Window()
                for group in engine.optimizer.param_groups:
                    values[f"lr/{group.get('name', 'group')}"] = group["lr"]
                norm = engine.get_global_grad_norm()
                if norm is not None:
                    values["grad_norm"] = float(norm)
                if engine.fp16_enabled():  # dynamic loss scaling: the scale, and the updates overflow skipped
                    values["loss_scale"] = float(engine.optimizer.loss_scale)
                    values["overflow_steps"] = engine.skipped_steps
                values.update(host_memory_gb())
                log.scalars(step, values)
                if "loss" in values:
                    bar.set_postfix(
                        {
                            "loss": f"{values['loss']:.3f}",
                            "tok/s": f"{values['tokens_per_s']:.0f}",
                            "MFU": f"{100 * values.get('mfu', 0.0):.2f}%",
                            "mem": f"{values['peak_mem_gib']:.2f}GiB",
                        }
                    )
            profiler.end(step)
            stop = preempt.requested()
            if stop or step % t.save_every == 0 or step == t.max_steps or step == t.halt_at_step:
                if guard.in_streak:
                    log.message(f"step {step}: no checkpoint while the loss is not finite")
                else:
                    checkpoint.save(
                        engine, ckpt_dir, step, loader=loader, dist=dist, keep_last=t.keep_last, identity=identity
                    )
            if stop:
                status = "preempted"
                break
            if validator is not None and (step % t.val_every == 0 or step == t.max_steps):
                done = validator.run(engine.module, should_stop=preempt.agreed_now)
                if done is None:  # preempted during validation: this step's checkpoint, then out
                    if step % t.save_every and step != t.max_steps and not guard.in_streak:
                        checkpoint.save(
                            engine, ckpt_dir, step, loader=loader, dist=dist, keep_last=t.keep_last, identity=identity
                        )
                    status = "preempted"
                    break
                result, image = done
                log.scalars(step, result, prefix=f"val/{validator.name}")
                if dist.is_main:
                    tqdm.write(f"step {step} validation {validator.name}: {validator.summary(result)}")
                if image is not None and (step % t.image_every == 0 or step == t.max_steps):
                    log.image(step, f"val/{validator.name}/masks", image)
            if step == t.halt_at_step:
                status = "halted"
                break
    finally:
        preempt.close()
        bar.close()
        if samples is not None:
            samples.close()
    skipped = int(all_reduce_sum(torch.tensor([loader.skipped_samples], dtype=torch.float64, device=device())))
    return status, step, {"skipped samples": skipped, "steps without update (non-finite loss)": guard.skipped_steps}

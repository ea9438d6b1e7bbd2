"""16-bit precisions on the tiny model through the real launcher. bf16, the 7B recipes' precision, end
to end: a 2-rank ZeRO-3 run trains and validates by generation in bf16, then evaluates, exports and
infers with every part in bf16. fp16 (GPUs without bf16): loss scaling skips overflowing updates."""

import json
import sys

import numpy as np
import pytest
import torch
from launching import deepspeed_cmd, losses, overrides, run
from PIL import Image

from ppcr.eval.infer import main as infer_main
from ppcr.model.export import main as export_main
from ppcr.model.saving import load_checkpoint, load_pretrained

BF16 = ("model.dtype=bfloat16", "train.precision=bf16")
FP16 = ("model.dtype=float16", "train.precision=fp16")


def loads_and_evaluates_in(dtype: torch.dtype, run_dir, tiny_shards, tag: str) -> None:
    """The run's checkpoint loads with every parameter in ``dtype`` and launch/eval.py scores it."""
    model, _, _, _ = load_checkpoint(run_dir)
    assert {p.dtype for p in model.parameters()} == {dtype}
    sets = f"eval.sets=[{{name: {tiny_shards.name}, split: val}}]"
    evaluated = run([sys.executable, "launch/eval.py", "--checkpoint", str(run_dir), sets, "eval.max_expressions=6"])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = json.loads((run_dir / f"eval/{tag}/results.json").read_text())["rows"]
    assert rows[0]["count"] == 6 and np.isfinite(rows[0]["cIoU"])


def test_bf16_run_trains_validates_evaluates_exports_and_infers(tiny_shards, tiny_models, tmp_path):
    args = overrides(
        tiny_shards,
        tiny_models,
        tmp_path / "runs",
        *BF16,
        "train.max_steps=3",
        "train.run_name=bf16",
        "model.max_new_tokens=5",
        "train.val_every=3",
        "train.val_samples=4",
        "eval.batch_size=2",
    )
    done = run(deepspeed_cmd(args))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs/bf16"
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [d for d in logged if d["kind"].startswith("val")]
    assert val and np.isfinite(val[-1]["cIoU"]) and val[-1]["count"] == 4  # generation under ZeRO-3 in bf16

    loads_and_evaluates_in(torch.bfloat16, run_dir, tiny_shards, "step_00000003")

    assert export_main(["--checkpoint", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    exported, _ = load_pretrained(tmp_path / "export")
    assert {p.dtype for p in exported.parameters()} == {torch.bfloat16}

    image = np.zeros((70, 90, 3), np.uint8)
    image[10:50, 20:60] = (200, 40, 40)
    Image.fromarray(image).save(tmp_path / "photo.png")
    assert (
        infer_main(
            [
                "--checkpoint",
                str(tmp_path / "export"),
                "--image",
                str(tmp_path / "photo.png"),
                "--expression",
                "the red square",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    answer = json.loads((tmp_path / "out/photo.json").read_text())
    assert np.isfinite(answer["box_cxcywh"]).all()
    assert np.array(Image.open(tmp_path / "out/photo.mask.png")).shape == (70, 90)


def fp16_supported() -> bool:
    from deepspeed.accelerator import get_accelerator

    return bool(get_accelerator().is_fp16_supported())


@pytest.mark.skipif(not fp16_supported(), reason="DeepSpeed's accelerator here has no fp16 (on CPU: oneDNN fp16)")
def test_fp16_run_scales_its_loss_skips_overflowing_updates_and_evaluates(tiny_shards, tiny_models, tmp_path):
    """fp16, for GPUs without bf16: DeepSpeed's dynamic loss scaling. The default start, 2**16, overflows
    the tiny model's fp16 gradients, so the first updates are skipped and the scale halves until they
    fit; the run then updates every step, and the model evaluates in fp16."""
    args = overrides(
        tiny_shards,
        tiny_models,
        tmp_path / "runs",
        *FP16,
        "train.max_steps=8",
        "train.run_name=fp16",
        "model.max_new_tokens=5",
    )
    done = run(deepspeed_cmd(args))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_dir = tmp_path / "runs/fp16"
    steps = losses(run_dir)
    scales = [steps[s]["loss_scale"] for s in sorted(steps)]
    overflowed = [steps[s]["overflow_steps"] for s in sorted(steps)]
    assert scales[0] == 2**16 and scales[-1] < scales[0], scales  # halved on overflow
    assert 0 < overflowed[-1] < 8 and overflowed[-1] == overflowed[-2], overflowed  # then no more skips
    assert all(np.isfinite(steps[s]["loss"]) for s in steps)

    loads_and_evaluates_in(torch.float16, run_dir, tiny_shards, "step_00000008")

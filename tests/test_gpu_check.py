"""The GPU check (launch/gpu_check.py) on CPU: the Qwen2.5-VL-7B + SAM ViT-H recipe's real architecture,
shrunk to one layer / block in depth with every width kept, trains through the real launcher, and the
report holds its figures beside the memory estimator's, with MFU as training logs it."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ppcr.bench import gpu_check, memory
from ppcr.config import load_config
from ppcr.model import flops

ROOT = Path(__file__).parent.parent


def test_gpu_check_trains_the_7b_architecture_shrunk_in_depth(tmp_path):
    out = tmp_path / "check"
    cmd = [
        sys.executable,
        str(ROOT / "launch/gpu_check.py"),
        "--layers",
        "1",
        "--steps",
        "1",
        "--warmup-steps",
        "1",
        "--train-images",
        "8",
        "--out",
        str(out),
        "train.micro_batch_size=1",
        "train.grad_accum=1",
        "data.num_workers=1",
    ]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = json.loads((out / "gpu_check.json").read_text())
    assert "## GPU check" in (out / "gpu_check.md").read_text() and "## GPU check" in done.stdout

    # The published widths at depth 1, written like a downloaded checkpoint, and SAM ViT-H's widths.
    config = json.loads(next((out / "models").glob("qwen2.5-vl-7b_1-layers/config.json")).read_text())
    text, vision = config.get("text_config", config), config["vision_config"]
    assert (text["hidden_size"], text["intermediate_size"], text["num_hidden_layers"], text["vocab_size"]) == (
        3584,
        18944,
        1,
        152064,
    )
    assert (vision["hidden_size"], vision["depth"], vision["fullatt_block_indexes"]) == (1280, 1, [0])
    with safe_open(next((out / "models").glob("sam_tiny_1-layers.safetensors")), "pt") as f:
        keys = list(f.keys())
        assert f.get_slice("image_encoder.blocks.0.attn.qkv.weight").get_shape() == [3 * 1280, 1280]
        assert f.get_slice("mask_decoder.transformer.layers.0.mlp.lin1.weight").get_shape() == [2048, 256]
    assert not any(k.startswith("image_encoder.blocks.1.") for k in keys)

    # Every step trained and was logged; the first is left out of the timing.
    assert r["losses_finite"] and sorted(map(int, r["losses"])) == [1, 2]
    assert (r["warmup_steps"], r["timed_steps"], r["samples_per_step"], r["ranks"]) == (1, 1, 1, 1)
    assert r["step_s"]["n"] == 1 and r["step_s"]["median"] > 0 and r["samples_per_s"]["median"] > 0
    # The estimator counted the model the run trained: the run's parameter table has the same totals.
    total = re.search(r"^total\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)$", done.stdout, re.M)
    assert total, done.stdout[-3000:]
    counted = [r["params"][k] for k in ("trainable", "frozen", "total")]
    assert [int(v.replace(",", "")) for v in total.groups()] == counted
    # No accelerator: no peak accelerator memory, but the estimator's figures and host memory, and training's MFU
    # against the CPU's measured bf16 matmul, with the recomputation of gradient checkpointing in HFU.
    m = r["memory"]
    assert r["device"].startswith("cpu") and m["peak_accelerator_bytes"] is None
    assert 0 < r["flops"]["mfu"] < r["flops"]["hfu"] < 1
    p = m["predicted"]
    assert p["per_gpu"] == pytest.approx(p["model_states"] + p["activations"] + p["allowance"])
    assert p["model_states"] > 2 * 1.4e9 and p["activations"] > 0 and m["host_rss_rank0_max_bytes"] > 0
    # ZeRO-3's model states as measured after step 1 are what the estimator expects in bf16 (1 rank).
    assert m["model_states_measured"]["total"] == pytest.approx(p["model_states_bf16"], rel=0.01)
    f = r["flops"]
    assert f["per_sample"]["sample"] > 0.5e12 and f["per_step_model"] == pytest.approx(f["per_sample"]["sample"])
    assert f["achieved_per_device"] == pytest.approx(f["per_sample"]["sample"] * r["samples_per_s"]["median"])


def test_depth_shrinks_and_widths_stay():
    q = memory.published_config("qwen2_5_vl", 2)
    assert (q["num_hidden_layers"], q["hidden_size"], q["vision_config"]["depth"]) == (2, 3584, 2)
    assert q["vision_config"]["fullatt_block_indexes"] == [1]
    assert memory.published_config("qwen2_5_vl", 9)["vision_config"]["fullatt_block_indexes"] == [7]
    assert memory.published_config("qwen2_5_vl")["num_hidden_layers"] == 28  # a copy, not the shared dict
    llava = memory.published_config("llava", 2)
    assert llava["text_config"]["num_hidden_layers"] == 2 and llava["vision_config"]["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="layers must be >= 1"):
        memory.published_config("llava", 0)

    assert gpu_check.sam_overrides("vit_h", None) == []
    cfg = load_config(ROOT / "launch/configs/qwen2.5-vl-7b_sam-vit-h_refcoco.yaml", gpu_check.sam_overrides("vit_h", 9))
    a = cfg.model.sam_arch
    assert cfg.model.sam_type == "tiny" and cfg.model.sam_image_size == 1024
    assert (a.encoder_dim, a.encoder_depth, a.encoder_heads, a.global_attn_indexes, a.window_size) == (
        1280,
        9,
        16,
        [7],
        14,
    )
    assert (a.prompt_dim, a.decoder_heads, a.decoder_mlp_dim) == (256, 8, 2048)

    rm = memory.build_meta_model("llava-1.5-7b", overrides=gpu_check.sam_overrides("vit_h", 2), layers=2)
    x = flops.flop_shapes(rm.model)
    assert x.lm_layers == 2 and x.lm_attn_width == 4096 and x.vision_forward > 0 and x.sam_forward > 0
    assert len(rm.model.sam.sam.image_encoder.blocks) == 2


def test_bad_plans():
    for bad, match in (
        ({"recipe": "gpt"}, "unknown recipe"),
        ({"steps": 0}, "steps must be"),
        ({"layers": 0}, "layers must be"),
        ({"warmup_steps": -1}, "warmup_steps"),
    ):
        with pytest.raises(ValueError, match=match):
            gpu_check.Plan(**bad).check()
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no GPU: at the published depth"):
            gpu_check.Plan().check()
    done = subprocess.run(
        [sys.executable, str(ROOT / "launch/gpu_check.py"), "--layers", "0"], cwd=ROOT, capture_output=True, text=True
    )
    assert done.returncode == 2 and "layers must be >= 1" in done.stderr


def test_the_measured_peak_is_compared_with_the_estimated_allocations_not_the_allowance(monkeypatch):
    """torch.cuda.max_memory_allocated counts what the allocator handed out; the estimate's allowance (CUDA
    context, NCCL buffers, fragmentation) is not in it, so the ratio leaves it out: a peak equal to model states
    plus activations reads 1.0."""
    from types import SimpleNamespace

    gib = gpu_check.GIB
    monkeypatch.setattr(gpu_check.machine, "describe", lambda: {"gpus": [{"name": "NVIDIA H100 80GB HBM3"}]})
    predicted = {
        "model_states": 10 * gib,
        "activations": 2 * gib,
        "allowance": 1.5 * gib,
        "allocated": 12 * gib,
        "per_gpu": 13.5 * gib,
        "model_states_bf16": 9 * gib,
    }
    records = [
        {
            "kind": "train",
            "step": s,
            "loss": 1.0,
            "samples_per_s": 2.0,
            "data_wait_share": 0.0,
            "mfu": 0.4,
            "peak_mem_gib": 12.0,
            "host_rss_gb": 1.0,
        }
        for s in (1, 2, 3)
    ]
    records.append(
        {
            "kind": "flops",
            "step": 1,
            "peak_per_device": 1e15,
            **dict.fromkeys(
                (
                    "sample",
                    "tokens_semantic_image",
                    "tokens_semantic_text",
                    "tokens_spatial_image",
                    "tokens_spatial_text",
                    "lm_forward",
                    "lm_backward",
                    "lm_head",
                    "vision_tower",
                    "sam_image_encoder",
                    "recompute",
                ),
                1e12,
            ),
            "hardware": 1.5e12,
        }
    )
    r = gpu_check.report(
        gpu_check.Plan(steps=2, warmup_steps=1, peak_flops=0.8e15),
        load_config(None),
        SimpleNamespace(total=3, trainable=1, frozen=2),
        records=records,
        overrides=[],
        predicted=predicted,
        timing={"train_wall_s": 1.0, "total_s": 2.0},
    )
    assert r["memory"]["peak_vs_predicted"] == pytest.approx(1.0)
    assert "measured / estimated allocations (model states + activations) 1.00" in gpu_check.render(r)
    # MFU as training logged it, against the peak the plan names: 400 TFLOP/s of 800
    f = r["flops"]
    assert (f["mfu"], f["hfu"], f["achieved_per_device"]) == pytest.approx((0.5, 0.75, 0.4e15))

"""Model-state bytes measured in live DeepSpeed engines, and memory of the real recipes on paper."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from ppcr.bench.memory import (
    REAL_TOKENIZER_LEN,
    ActivationShapes,
    activation_bytes,
    activation_shapes,
    build_meta_model,
    expected_zero3_bytes_per_rank,
    image_tokens,
    memory_table,
    model_state_memory,
    render_markdown,
    stage_tokens,
    zero3_scaling_rows,
)
from ppcr.common.distributed import free_port

ROOT = Path(__file__).parent.parent

# A small net in a 1- or 2-rank gloo group: Linear(8, 16) and Linear(16, 5) train in two parameter
# groups, Linear(16, 16) is frozen. One step with torch's AdamW as the client optimizer.
ENGINES = r"""
import json, os, sys
rank, world, port = sys.argv[1:4]
os.environ.update(RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
import deepspeed, torch
from torch import nn
deepspeed.init_distributed(dist_backend="gloo")
from ppcr.train.memory import model_state_bytes
results = {}
for case in sys.argv[4:]:
    stage, precision = case.split("-")
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 5))
    net[2].requires_grad_(False)
    opt = torch.optim.AdamW([{"params": list(net[0].parameters()), "lr": 1e-3},
                             {"params": list(net[4].parameters()), "lr": 1e-2}])
    ds = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": precision == "bf16"},
          "zero_optimization": {"stage": int(stage[1]), "stage3_param_persistence_threshold": 0}}
    engine, *_ = deepspeed.initialize(model=net, optimizer=opt, config=ds)
    init = model_state_bytes(engine)
    x = torch.randn(1, 8, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    engine.backward(engine(x).float().pow(2).mean())
    engine.step()
    results[case] = {"init": init, "step": model_state_bytes(engine)}
print("RESULT " + json.dumps(results), flush=True)
"""
TRAINABLE = [8 * 16, 16, 16 * 5, 5]  # tensors of the two trained layers: 229 elements
FROZEN = [16 * 16, 16]  # 272 elements
T, F = sum(TRAINABLE), sum(FROZEN)
STEP = 4  # AdamW keeps one fp32 "step" scalar per parameter group (two groups here)


def start_engines(world: int, *cases: str) -> list[subprocess.Popen]:
    port = str(free_port())
    return [
        subprocess.Popen(
            [sys.executable, "-c", ENGINES, str(rank), str(world), port, *cases],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world)
    ]


def results(procs: list[subprocess.Popen]) -> list[dict]:
    """One result per rank."""
    out_by_rank = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
        out_by_rank.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    return out_by_rank


def states(params: int, gradients: int, optimizer: int) -> dict[str, int]:
    total = params + gradients + optimizer
    return {
        "params": params,
        "gradients": gradients,
        "optimizer": optimizer,
        "total": total,
        "cpu": total,
        "gathered": 0,
    }


def test_model_state_bytes_counts_what_zero_allocates_on_one_rank():
    (r,) = results(start_engines(1, "z3-fp32", "z3-bf16", "z2-fp32"))
    # ZeRO-3 fp32: every parameter's partition (4 bytes), the fp32 gradient partitions of the trained
    # ones, an fp32 master copy (made even in fp32), then Adam's two moments and two step scalars.
    assert r["z3-fp32"]["init"] == states(4 * (T + F), 4 * T, 4 * T)
    assert r["z3-fp32"]["step"] == states(4 * (T + F), 4 * T, 4 * T + 8 * T + 2 * STEP)
    # bf16: 16-bit partitions and gradient partitions, fp32 master and moments.
    assert r["z3-bf16"]["init"] == states(2 * (T + F), 2 * T, 4 * T)
    assert r["z3-bf16"]["step"] == states(2 * (T + F), 2 * T, 4 * T + 8 * T + 2 * STEP)
    # ZeRO-2: whole parameters; each group's flat buffer is aligned to 2 elements per rank, so
    # Linear(16, 5)'s 85 take 86. Gradient partitions exist only between backward and step.
    flat = 144 + 86
    assert r["z2-fp32"]["init"] == states(4 * (flat + F), 0, 4 * flat)
    assert r["z2-fp32"]["step"] == states(4 * (flat + F), 0, 4 * flat + 8 * flat + 2 * STEP)
    # The estimator, mapped to the precision, predicts ZeRO-3's bytes exactly but for the step scalars.
    for precision in ("fp32", "bf16"):
        expected = expected_zero3_bytes_per_rank(T, F, 1, precision)
        measured = r[f"z3-{precision}"]["step"]
        assert measured["total"] == expected["total"] + 2 * STEP
        assert measured["params"] == expected["params"] and measured["gradients"] == expected["gradients"]


def test_zero3_per_rank_states_halve_on_two_ranks():
    two_procs, one_procs = start_engines(2, "z3-fp32"), start_engines(1, "z3-fp32")  # side by side
    ranks, (one,) = results(two_procs), results(one_procs)

    def half(numels):  # partitions, padded per tensor
        return sum(math.ceil(n / 2) for n in numels)

    for r in ranks:
        step = r["z3-fp32"]["step"]
        assert step == states(4 * half(TRAINABLE + FROZEN), 4 * half(TRAINABLE), 12 * half(TRAINABLE) + 2 * STEP)
    measured = {1: one["z3-fp32"]["step"], 2: ranks[0]["z3-fp32"]["step"]}
    rows = zero3_scaling_rows(measured, T, F)
    padding = 4 * len(TRAINABLE + FROZEN)  # < 1 element of padding per tensor and rank, 4 bytes each
    for row in rows:
        assert row["expected_vs_1_rank"] == 1 / row["world_size"]
        assert abs(row["measured"] - row["expected"]) <= 3 * padding + 2 * STEP
        if row["world_size"] == 2:
            assert row["measured_vs_1_rank"] == pytest.approx(0.5, abs=0.01)


def test_expected_zero3_bytes_come_from_the_estimator_mapped_to_precision():
    t, f = 1_000_000, 8_000_000
    one = expected_zero3_bytes_per_rank(t, f, 1, "fp32")
    assert one["estimator"] == 18 * t  # DeepSpeed's 2 + 4 + 4 + 8 bytes per trained parameter
    assert one == {
        "params": 4 * (t + f),
        "gradients": 4 * t,
        "optimizer": 12 * t,
        "total": 20 * t + 4 * f,
        "estimator": 18 * t,
    }
    two = expected_zero3_bytes_per_rank(t, f, 2, "fp32")
    assert all(two[k] == one[k] / 2 for k in one)
    bf16 = expected_zero3_bytes_per_rank(t, f, 1, "bf16")
    assert bf16["total"] == 16 * t + 2 * f and bf16["gradients"] == 2 * t


def test_model_state_memory_wires_deepspeeds_estimators():
    t, f, largest = 1_000_000, 8_000_000, 500_000
    eight = model_state_memory(t, f, largest, num_gpus_per_node=8)
    assert eight["zero2"] == {
        "estimator_gpu": 2 * t + 18 * t // 8,
        "estimator_cpu": int(t * 4 * 8 * 1.5),
        "frozen_gpu": 2 * f,
        "frozen_cpu": 2 * f * 8,
        "gpu": 2 * t + 18 * t // 8 + 2 * f,
        "cpu": int(t * 4 * 8 * 1.5) + 16 * f,
    }
    assert eight["zero3"] == {
        "estimator_gpu": 4 * largest + 18 * t // 8,
        "estimator_cpu": int(largest * 4 * 8 * 1.5),
        "frozen_gpu": 2 * f // 8,
        "frozen_cpu": 0,
        "gpu": 4 * largest + 18 * t // 8 + 2 * f // 8,
        "cpu": int(largest * 4 * 8 * 1.5),
    }
    assert eight["zero3_offload"] == {
        "estimator_gpu": 4 * largest,
        "estimator_cpu": int(t * 18 * 1.5),
        "frozen_gpu": 0,
        "frozen_cpu": 2 * f,
        "gpu": 4 * largest,
        "cpu": int(t * 18 * 1.5) + 2 * f,
    }
    one = model_state_memory(t, f, largest, num_gpus_per_node=1)
    # ZeRO-3's partitioned states fall 8x from 1 to 8 GPUs; the gathered largest layer does not.
    assert (one["zero3"]["gpu"] - 4 * largest) == 8 * (eight["zero3"]["gpu"] - 4 * largest)
    assert one["zero2"]["frozen_gpu"] == eight["zero2"]["frozen_gpu"]


def test_activation_bytes_on_a_hand_computed_case():
    x = ActivationShapes(
        micro_batch=2,
        lengths=(10, 12),
        image_tokens=4,
        hidden=8,
        layers=3,
        heads=2,
        vocab=50,
        fused_attention=False,
        gradient_checkpointing=True,
        lora_in_features=32,
        lora_modules=4,
        lora_rank=2,
        vision_patches=16,
        vision_hidden=4,
        vision_intermediate=6,
        vision_heads=2,
        sam_tokens=16,
        sam_dim=8,
        sam_heads=2,
        sam_mlp=32,
        sam_out_chans=4,
        sam_image_size=32,
    )
    # One layer at s = 12: 34sbh 6528 + 5as^2b 2880 + LoRA 3sb*32 2304 + 2sbr*4 384; at s = 10: 9680.
    out = activation_bytes(x)
    assert out["held"] == {
        "lm_layer_inputs": 2 * 2 * 8 * 3 * 22,
        "logits_fp32_logprobs": 4 * 2 * 22 * 50,
        "image_features": 2 * 2 * 4 * 8,
        "sam_embeddings": 2 * 2 * 4 * 16,
        "sam_mask_decoder": 2 * (32 * 2 * 4 * 16 + 8 * 4 * 32 * 32),
    }
    assert out["transient"] == {
        "lm_layer_recompute": 12096,
        "logits_forward": 8 * 2 * 12 * 50,
        "vision_tower_block": 2 * 2 * 16 * (16 + 24) + 2 * 2 * 2 * 16 * 16,
        "sam_encoder_global_block": 2 * 2 * (3 * 2 * 256 + 16 * (40 + 64)),
    }
    assert out["peak"] == 2112 + 8800 + 128 + 256 + 73728 + 12800  # held + the SAM block, the largest transient
    plain = activation_bytes(ActivationShapes(**{**x.__dict__, "gradient_checkpointing": False}))
    assert plain["held"]["lm_layers"] == 3 * (9680 + 12096) and "lm_layer_recompute" not in plain["transient"]
    fused = activation_bytes(ActivationShapes(**{**x.__dict__, "fused_attention": True}))
    assert fused["transient"]["lm_layer_recompute"] == 12096 - 2880


@pytest.fixture(scope="module")
def real():
    return {name: build_meta_model(name) for name in ("qwen2.5-vl-7b", "llava-1.5-7b")}


def lora(layers: int, hidden: int, kv: int, rank: int) -> int:
    """q, k, v, o: rank x (in + out) each; k and v project to the KV width."""
    return layers * rank * (2 * (hidden + hidden) + 2 * (hidden + kv))


def lin(i: int, o: int) -> int:
    """Parameters of nn.Linear(i, o)."""
    return i * o + o


def heads_and_rows(hidden: int, box: int = 1024, sam: int = 256) -> dict[str, int]:
    return {
        "new_token_rows": 2 * 5 * hidden,  # input and output rows of the 5 PPCR tokens
        "projectors": 2 * lin(hidden, hidden) + lin(hidden, hidden) + lin(hidden, sam),
        # the pointer (ppcr.model.pointer): query and key (LayerNorm, Linear), the per-token regressor on
        # the feature and the cell centre, the refinement on SpaSP and the pooled state
        "box_head": 2 * (2 * hidden + lin(hidden, box))
        + lin(hidden + 2, box)
        + lin(box, 4)
        + lin(2 * hidden, box)
        + lin(box, 4),
    }


def sam_decoder_trained(c: int = 256, mlp: int = 2048, depth: int = 2) -> int:
    """SAM's mask decoder without the IoU head and hypernetwork MLPs 1-3 (one mask output)."""

    def attn(d):  # q, k, v to d, out back to c
        return 3 * lin(c, d) + lin(d, c)

    block = attn(c) + 2 * attn(c // 2) + lin(c, mlp) + lin(mlp, c) + 4 * 2 * c  # 4 LayerNorms
    transformer = depth * block + attn(c // 2) + 2 * c
    # ConvTranspose2d(c, c/4, 2, 2), LayerNorm2d(c/4), ConvTranspose2d(c/4, c/8, 2, 2)
    upscaling = (c * (c // 4) * 4 + c // 4) + 2 * (c // 4) + ((c // 4) * (c // 8) * 4 + c // 8)
    hypernetwork_0 = 2 * lin(c, c) + lin(c, c // 8)
    return transformer + 5 * c + upscaling + hypernetwork_0  # 5 tokens: IoU and 4 mask tokens


@pytest.mark.parametrize(
    "name, mllm_total, layers, hidden, kv, vocab",
    [
        ("qwen2.5-vl-7b", 8_292_166_656, 28, 3584, 4 * 128, 152064),  # HF: "8.29B params"
        ("llava-1.5-7b", 7_063_427_072, 32, 4096, 4096, 32064),  # HF: "7.06B params"
    ],
)
def test_real_recipes_count_exactly_on_meta(real, name, mllm_total, layers, hidden, kv, vocab):
    rm = real[name]
    c = rm.counts
    assert sum(sum(c[k]) for k in ("vision_tower", "embeddings", "lm_head", "llm_base")) == mllm_total
    assert sum(sum(v) for k, v in c.items() if k.startswith("sam_")) == 641_090_608  # SAM ViT-H
    expected = {
        "lora_semantic": lora(layers, hidden, kv, 8),
        "lora_spatial": lora(layers, hidden, kv, 8),
        **heads_and_rows(hidden),
        "sam_mask_decoder": sam_decoder_trained(),
    }
    assert {k: c[k][0] for k in expected} == expected
    assert rm.trainable == sum(expected.values())
    assert rm.total == mllm_total + 641_090_608 + sum(v for k, v in expected.items() if k != "sam_mask_decoder")
    assert rm.frozen == rm.total - rm.trainable
    assert c["embeddings"] == (0, vocab * hidden) and c["lm_head"] == (0, vocab * hidden)
    assert rm.largest_layer == vocab * hidden
    # No resize: the real tokenizer's next 5 ids fit the embedding rows as the tiny one's do.
    assert REAL_TOKENIZER_LEN[rm.family] + 5 <= vocab and max(rm.model.ids.new) < vocab


def test_stage_tokens_and_shapes_follow_the_processor_and_config(real):
    qwen, llava = real["qwen2.5-vl-7b"], real["llava-1.5-7b"]
    assert image_tokens(qwen) == 256 and image_tokens(llava) == 576
    for rm in (qwen, llava):
        tokens = stage_tokens(rm)
        for stage in tokens.values():
            assert stage["image"] == image_tokens(rm)  # the processor expanded as many as the formula says
            assert stage["length"] - stage["image"] == -(-stage["text"] // 32) * 32 and stage["text"] > 20
    x = activation_shapes(qwen)
    assert (x.hidden, x.layers, x.heads, x.vocab, x.lora_in_features, x.lora_modules) == (
        3584,
        28,
        28,
        152064,
        4 * 3584,
        4,
    )
    assert (x.vision_patches, x.sam_tokens, x.sam_dim, x.sam_heads, x.sam_mlp) == (1024, 4096, 1280, 16, 5120)
    assert x.fused_attention and x.gradient_checkpointing and x.micro_batch == 2
    assert activation_shapes(llava).vision_patches == 577


def test_memory_table_adds_up_and_renders(real):
    rows = memory_table(list(real.values()))
    assert len(rows) == 2 * 3 * 2
    for r in rows:
        parts = r["estimator_gpu_gib"] + r["frozen_gpu_gib"] + r["activations_gib"] + r["allowance_gib"]
        assert abs(r["per_gpu_gib"] - parts) <= 0.15
        assert r["fits"] == (r["per_gpu_gib"] <= r["capacity_gib"])
        if r["zero"] == "ZeRO-3 + offload":
            assert r["frozen_gpu_gib"] == 0 and r["frozen_cpu_gib"] > 10
    z2 = next(r for r in rows if r["recipe"] == "qwen2.5-vl-7b" and r["zero"] == "ZeRO-2" and r["gpus"] == "8x24GB")
    z3 = next(r for r in rows if r["recipe"] == "qwen2.5-vl-7b" and r["zero"] == "ZeRO-3" and r["gpus"] == "8x24GB")
    assert z2["frozen_gpu_gib"] == pytest.approx(8.93e9 * 2 / 2**30, abs=0.1)  # every GPU holds the 16-bit model
    assert z3["frozen_gpu_gib"] == pytest.approx(z2["frozen_gpu_gib"] / 8, abs=0.1)
    text = render_markdown(rows)
    assert len(text.splitlines()) == 2 + len(rows) and text.startswith("| recipe | ZeRO | GPUs |")

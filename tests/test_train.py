"""The real launcher on 2 CPU ranks with ZeRO-3 (integration), and the training parts on their own."""

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
from conftest import model_config
from launching import ROOT, free_port, overrides, run

from ppcr.config import load_config
from ppcr.train.optim import lr_factor, param_groups


def test_every_logged_step_carries_throughput_mfu_and_peak_memory_per_rank(trained_run):
    """The trained run (3 steps, 2 ZeRO-3 CPU ranks): tokens/s, MFU and each rank's peak memory in every train
    record of metrics.jsonl and in TensorBoard; the FLOPs a sample, counted once, in a record of their own."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    train = [d for d in records if d["kind"] == "train"]
    assert [d["step"] for d in train] == [1, 2, 3]
    for d in train:
        assert 0 < d["mfu"] < 1 and d["tokens_per_s"] > 100 * d["samples_per_s"] > 0
        per_rank = [d["peak_mem_gib/rank0"], d["peak_mem_gib/rank1"]]
        assert d["peak_mem_gib"] == max(per_rank) and min(per_rank) > 0.1
    assert [(d["step"], d["sample"] > 1e8, d["peak_per_device"] > 1e8) for d in records if d["kind"] == "flops"] == [
        (1, True, True)
    ]
    # every event file: make eval on this run (other tests) writes one of its own beside training's
    tags = {
        t
        for f in (trained_run / "tensorboard").glob("events.*")
        for t in EventAccumulator(str(f)).Reload().Tags()["scalars"]
    }
    assert {"train/mfu", "train/tokens_per_s", "train/peak_mem_gib", "flops/sample"} <= tags


def test_two_slurm_tasks_on_two_nodes_keep_their_ranks_and_one_writer(tiny_shards, tiny_models, tmp_path):
    port = free_port()
    procs = []
    for task in (0, 1):
        env = dict(
            os.environ,
            SLURM_PROCID=str(task),
            SLURM_NTASKS="2",
            SLURM_NODEID=str(task),
            SLURM_LOCALID="0",
            SLURM_NTASKS_PER_NODE="1",
            SLURM_JOB_NODELIST="127.0.0.1",
            SLURM_JOB_ID="4242",
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(k, None)
        args = overrides(
            tiny_shards,
            tiny_models,
            tmp_path,
            "train.max_steps=3",
            "train.save_every=2",
            "train.run_name=slurm",
            "data.num_workers=0",
            "train.val_every=2",
            "train.val_samples=3",
            "model.max_new_tokens=6",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "launch/train.py", "--config", "launch/configs/default.yaml", *args],
                cwd=ROOT,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    outs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "rank 0/2 node 0 local rank 0" in outs[0][0] and "rank 1/2 node 1 local rank 0" in outs[1][0]
    assert "run directory" in outs[0][0] and "run directory" not in outs[1][0]
    run_dir = tmp_path / "slurm"
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines if d["kind"] == "train"] == [1, 2, 3]  # one writer: every step logged once
    val = [d for d in lines if d["kind"].startswith("val/")]
    assert [d["step"] for d in val] == [2, 3] and all(d["count"] == 3 for d in val)  # 2 + 1: uneven ranks
    assert len(list((run_dir / "tensorboard").glob("events.*"))) == 1
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000003"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        "step_00000002",
        "step_00000003",
    ]


def test_zero3_builds_the_mllm_partitioned(tiny_models, tiny_shards, tmp_path):
    script = f"""
import os, deepspeed, torch
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
deepspeed.init_distributed(dist_backend="gloo")
from transformers.integrations import HfDeepSpeedConfig
from ppcr.config import load_config
from ppcr.model.model import PPCRModel
ds = {{"train_micro_batch_size_per_gpu": 1,
      "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0}}}}
keep = HfDeepSpeedConfig(ds)
cfg = load_config({str(ROOT / "launch/configs/default.yaml")!r}, {overrides(tiny_shards, tiny_models, tmp_path)!r})
model = PPCRModel.from_config(cfg.model, cfg.train.loss)
layer = model.mllm.base_model.model.model.language_model.layers[0].mlp.up_proj.weight
vision = next(model.family.vision_modules[0].parameters())
print("PARTITIONED", hasattr(layer, "ds_id"), layer.numel(), tuple(layer.ds_shape), hasattr(vision, "ds_id"))
"""
    out = run([sys.executable, "-c", script])
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("PARTITIONED"))
    assert line == "PARTITIONED True 0 (256, 128) True"


def test_help_lists_recipes_and_override_syntax():
    out = run([sys.executable, "launch/train.py", "--help"])
    assert out.returncode == 0
    assert "default.yaml" in out.stdout and "key.sub=value" in out.stdout


def test_schedule_warms_up_then_decays_and_groups_skip_decay_on_1d(tiny_shards, tiny_models):
    t = load_config(
        ROOT / "launch/configs/default.yaml", ["train.max_steps=100", "train.warmup_steps=10", "train.min_lr_ratio=0.1"]
    ).train
    assert lr_factor(0, t) == pytest.approx(0.1) and lr_factor(9, t) == pytest.approx(1.0)
    assert lr_factor(10, t) == pytest.approx(1.0) and lr_factor(100, t) == pytest.approx(0.1)
    assert lr_factor(55, t) == pytest.approx(0.55)
    from ppcr.model.model import PPCRModel

    cfg = model_config(tiny_shards, tiny_models, "llava", "train.weight_decay=0.1", "train.base_lr=3.0e-4")
    model = PPCRModel.from_config(cfg.model, cfg.train.loss)
    groups = {g["name"]: g for g in param_groups(model, cfg.train)}
    # LoRA is all 2-D; the recipe trains the pretrained embeddings and LM head whole, at base_lr
    assert {"lr", "base_lr", "head_lr", "head_lr_no_decay", "sam_lr", "sam_lr_no_decay"} == set(groups)
    assert all(p.ndim <= 1 for n, g in groups.items() if n.endswith("no_decay") for p in g["params"])
    assert groups["head_lr"]["lr"] == cfg.train.head_lr and groups["lr"]["weight_decay"] == 0.1
    assert groups["base_lr"]["lr"] == 3.0e-4 and groups["lr"]["lr"] == cfg.train.lr
    unset = {g["name"]: g["lr"] for g in param_groups(model, replace(cfg.train, base_lr=None))}
    assert unset["base_lr"] == cfg.train.lr  # base_lr unset: train.lr
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(p.numel() for g in groups.values() for p in g["params"]) == trained

"""Fixtures built in code: a tiny synthetic REFER dataset and its shard set, made once per session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import webdataset as wds

from ppcr.config import Config, ShardSetConfig, SyntheticConfig, load_config
from ppcr.data import synthetic
from ppcr.data.shards import build_shards, iter_tar_samples, load_manifest

TINY_SYNTH = dict(seed=7, num_images={"train": 24, "val": 6, "testA": 5, "testB": 5},
                  min_image_size=160, max_image_size=224)


@pytest.fixture(scope="session")
def tiny_refer(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("refer")
    cfg = SyntheticConfig(**TINY_SYNTH)
    counts = synthetic.generate(cfg, root / "refer", root / "images", workers=1)
    return {"refer_root": root / "refer", "images": root / "images" / "synthetic", "cfg": cfg, "counts": counts}


@pytest.fixture(scope="session")
def tiny_shards(tiny_refer, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "synthetic_unc"
    build_shards(tiny_refer["refer_root"], "synthetic", "unc", tiny_refer["images"], out, workers=1, max_samples=5)
    return out


def make_config(shards_dir: Path, *overrides: str) -> Config:
    """The default recipe pointed at a test shard set, with small batches and no loader workers."""
    return load_config(Path(__file__).parent.parent / "launch/configs/default.yaml", [
        f"paths.shards_root={shards_dir.parent}",
        f"data.train_sets=[{{name: {shards_dir.name}, split: train}}]",
        "data.num_workers=0", "data.shuffle_buffer=16", "train.micro_batch_size=3",
        "model.sam_image_size=64", "model.mllm_image_size=32", *overrides,
    ])


def train_set(shards_dir: Path, split: str = "train", ratio: float = 1.0) -> ShardSetConfig:
    return ShardSetConfig(name=shards_dir.name, split=split, ratio=ratio)


def rewrite_sample(path, index, change):
    """Rewrite one shard with sample ``index`` passed through ``change`` (a real broken-sample fixture)."""
    samples = list(iter_tar_samples(path))
    key = samples[index]["__key__"]
    samples[index] = change(samples[index])
    with open(path, "wb") as f, wds.TarWriter(f) as w:
        for s in samples:
            w.write(s)
    return key


@pytest.fixture
def corrupted(tiny_shards, tmp_path):
    """A copy of the set with a truncated shard, an undecodable JPEG, malformed JSON and a missing mask."""
    out = tmp_path / "corrupt_unc"
    shutil.copytree(tiny_shards, out)
    shards = [out / s["name"] for s in load_manifest(out)["splits"]["train"]["shards"]]
    data = shards[0].read_bytes()
    shards[0].write_bytes(data[: len(data) // 2])
    keys = {
        "jpg": rewrite_sample(shards[1], 1, lambda s: dict(s, jpg=b"\xff\xd8 not a jpeg")),
        "json": rewrite_sample(shards[2], 0, lambda s: dict(s, json=b"{broken")),
        "mask": rewrite_sample(shards[3], 2, lambda s: {k: v for k, v in s.items() if k != "mask.png"}),
    }
    return out, shards, keys


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict:
    """Tiny random-initialised MLLMs of both families and a tiny SAM, saved like real checkpoints."""
    from ppcr.model.tiny import build_tiny_mllm, save_tiny_sam

    root = tmp_path_factory.mktemp("models")
    cfg = load_config(None)
    paths = {fam: build_tiny_mllm(fam, root / fam) for fam in ("qwen2_5_vl", "llava")}
    paths["sam"] = save_tiny_sam(cfg.model.sam_arch, 256, root / "sam256.pth")
    return paths


def model_config(shards_dir: Path, models: dict, family: str, *overrides: str) -> Config:
    """The test data config plus a tiny model of ``family``; deterministic (no dropout, no flips)."""
    return make_config(shards_dir, f"model.mllm_path={models[family]}", f"model.tiny_family={family}",
                       f"model.sam_checkpoint={models['sam']}", "model.sam_image_size=256",
                       "model.mllm_image_size=112", "model.lora.dropout=0.0", "data.flip_prob=0.0",
                       "train.micro_batch_size=2", "model.trainable.vision_tower=false",
                       "model.trainable.llm_base=false", "model.trainable.sam_image_encoder=false", *overrides)


@pytest.fixture(scope="session")
def trained_run(tiny_shards, tiny_models, tmp_path_factory) -> Path:
    """A run of 3 steps on 2 ZeRO-3 CPU ranks with the real launcher: a sharded checkpoint to read."""
    from test_train import deepspeed_cmd, overrides, run

    runs = tmp_path_factory.mktemp("runs")
    args = overrides(tiny_shards, tiny_models, runs, "train.max_steps=3", "train.run_name=trained",
                     "model.max_new_tokens=6", "train.lr=1e-2", "train.head_lr=1e-2")
    done = run(deepspeed_cmd(args))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return runs / "trained"

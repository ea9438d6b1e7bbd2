"""ppcr-pretrain on a very small recipe: every stage learns in the direction the full run does, writes
weights the training code loads, and the same config gives the same weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ppcr.config import ConfigError, load_config
from ppcr.model.mllm import load_mllm
from ppcr.model.sam import load_sam
from ppcr.pretrain.cli import main

RECIPE = Path(__file__).parent.parent / "launch/configs/default.yaml"


def overrides(out: Path, *extra: str) -> list[str]:
    return [
        f"model.mllm_path={out / 'mllm'}",
        f"model.sam_checkpoint={out / 'sam.safetensors'}",
        "model.tiny_family=llava",
        "model.mllm_image_size=32",
        "model.sam_image_size=64",
        "model.tiny_mllm={hidden: 32, layers: 1, heads: 2, kv_heads: 1, vision_hidden: 32, vision_depth: 1, "
        "vision_heads: 2, vision_mlp_ratio: 2, patch_size: 8}",
        "data.synthetic.min_image_size=160",
        "data.synthetic.max_image_size=224",
        "pretrain.num_workers=0",
        "pretrain.log_every=10",
        "pretrain.eval_every=1000",
        "pretrain.eval_scenes=4",
        *extra,
    ]


def curve(out: Path, stage: str, evaluated: bool = False) -> list[dict]:
    """The stage's logged rows (or, with ``evaluated``, its held-out evaluations)."""
    rows = [json.loads(line) for line in (out / "mllm" / "pretrain_curve.jsonl").read_text().splitlines()]
    return [
        r for r in rows if r["stage"] == stage and (any(k.startswith("val_") for k in r) if evaluated else "loss" in r)
    ]


def test_every_stage_learns_and_writes_loadable_weights(tmp_path):
    steps = [
        "pretrain.vision={steps: 60, batch_size: 4, lr: 3.0e-3, warmup_steps: 5}",
        "pretrain.grounding={steps: 30, batch_size: 2, lr: 3.0e-3, warmup_steps: 5}",
        "pretrain.sam={steps: 40, batch_size: 2, lr: 3.0e-3, warmup_steps: 5}",
    ]
    assert main(["--config", str(RECIPE), *overrides(tmp_path, *steps)]) == 0
    vision = curve(tmp_path, "vision")
    # The tower learns colour first (the full run: 0.2 -> 0.8 accuracy in 200 steps).
    assert vision[-1]["ce_colour"] < 0.7 * vision[0]["ce_colour"], vision
    grounding = curve(tmp_path, "grounding")
    assert grounding[-1]["ce"] < 0.8 * grounding[0]["ce"], grounding
    sam = curve(tmp_path, "sam")
    assert sam[-1]["loss"] < sam[0]["loss"], sam
    assert {"val_box_acc50", "val_ce"} <= set(curve(tmp_path, "grounding", evaluated=True)[-1])
    # The training code's own loaders read what was written.
    cfg = load_config(RECIPE, overrides(tmp_path))
    mllm, _ = load_mllm(cfg.model.mllm_path)
    assert mllm.config.model_type == "llava"
    load_sam(cfg.model)


def test_same_config_gives_the_same_weights(tmp_path):
    steps = [
        "pretrain.vision={steps: 4, batch_size: 2, lr: 1.0e-3, warmup_steps: 1}",
        "pretrain.sam={steps: 3, batch_size: 2, lr: 1.0e-3, warmup_steps: 1}",
    ]
    weights = []
    for run in ("a", "b"):
        assert main(["--config", str(RECIPE), "--stages", "vision,sam", *overrides(tmp_path / run, *steps)]) == 0
        weights.append(
            (load_file(tmp_path / run / "mllm" / "model.safetensors"), load_file(tmp_path / run / "sam.safetensors"))
        )
    for a, b in zip(*weights):
        assert a.keys() == b.keys()
        assert all(a[k].equal(b[k]) for k in a)


def test_bad_stage_and_seed_are_refused(tmp_path, capsys):
    assert main(["--config", str(RECIPE), "--stages", "vision,colour", *overrides(tmp_path)]) == 2
    assert "colour" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="pretrain.seed"):
        load_config(RECIPE, overrides(tmp_path, "pretrain.seed=0", "data.synthetic.seed=0"))
    assert not (tmp_path / "mllm").exists()

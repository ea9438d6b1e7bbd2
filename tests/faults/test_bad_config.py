"""Bad configs and arguments: each a one-line error that names the problem, before any heavy work."""

import json
from pathlib import Path

import pytest

from ppcr.config import ConfigError, load_config
from ppcr.train.ds_config import build_ds_config

ROOT = Path(__file__).parent.parent.parent
RECIPE = ROOT / "launch/configs/default.yaml"


def test_unknown_key_names_key_and_valid_choices(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, ["data.shufle_buffer=3"])
    msg = str(e.value)
    assert "data.shufle_buffer" in msg and "shuffle_buffer" in msg and "num_workers" in msg
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  sam_image_sise: 4\n")
    with pytest.raises(ConfigError, match=r"model\.sam_image_sise.*sam_image_size"):
        load_config(bad)
    with pytest.raises(ConfigError, match=r"unknown config key 'trian.seed'.*data, model, train, eval, paths"):
        load_config(RECIPE, ["trian.seed=1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"'data\.num_workers'.*integer.*'two'"):
        load_config(RECIPE, ["data.num_workers=two"])
    with pytest.raises(ConfigError, match=r"'data\.flip_prob'.*number"):
        load_config(RECIPE, ["data.flip_prob=[1]"])
    with pytest.raises(ConfigError, match=r"'data\.train_sets\[0\]\.split'.*one of.*testA"):
        load_config(RECIPE, ["data.train_sets=[{name: x, split: tran}]"])
    with pytest.raises(ConfigError, match=r"'data\.train_sets\[0\]\.colour'"):
        load_config(RECIPE, ["data.train_sets=[{name: x, colour: red}]"])


def test_value_checks_name_the_key():
    with pytest.raises(ConfigError, match=r"data\.flip_prob"):
        load_config(RECIPE, ["data.flip_prob=1.5"])
    with pytest.raises(ConfigError, match=r"data\.synthetic\.min_objects"):
        load_config(RECIPE, ["data.synthetic.min_objects=9", "data.synthetic.max_objects=3"])
    with pytest.raises(ConfigError, match=r"data\.train_sets\[0\]\.ratio"):
        load_config(RECIPE, ["data.train_sets=[{name: x, ratio: 0}]"])


def test_malformed_overrides_and_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(RECIPE, ["data.num_workers"])
    with pytest.raises(ConfigError, match="recipe file not found"):
        load_config(tmp_path / "nope.yaml")


def test_ds_config_takes_recipe_values_and_refuses_contradictions(tmp_path):
    cfg = load_config(ROOT / "launch/configs/default.yaml", ["train.micro_batch_size=3", "train.grad_accum=2"])
    ds = build_ds_config(cfg, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24 and ds["gradient_clipping"] == cfg.train.grad_clip
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"] == {"enabled": False}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 8}))
    cfg = load_config(ROOT / "launch/configs/default.yaml", [f"train.ds_config={bad}"])
    with pytest.raises(ConfigError, match="train_micro_batch_size_per_gpu = 8.*train.micro_batch_size"):
        build_ds_config(cfg, 2)
    with pytest.raises(ConfigError, match="no DeepSpeed config"):
        build_ds_config(load_config(ROOT / "launch/configs/default.yaml", ["train.ds_config=nope.json"]), 2)

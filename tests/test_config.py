from pathlib import Path

import pytest

from ppcr.config import Config, ConfigError, dump_config, load_config

RECIPE = Path(__file__).parent.parent / "launch/configs/default.yaml"


def test_default_recipe_loads_and_round_trips(tmp_path):
    cfg = load_config(RECIPE)
    assert isinstance(cfg, Config)
    assert cfg.data.train_sets[0].name == "synthetic_unc"
    assert [s.split for s in cfg.eval.sets] == ["val", "testA", "testB"]
    again = tmp_path / "dumped.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg


def test_overrides_set_nested_values_with_yaml_types():
    cfg = load_config(RECIPE, ["data.num_workers=0", "data.flip_prob=0.25", "train.seed=11", "train.lr=1e-3",
                               "data.synthetic.difficulty_weights=[0, 1, 2]",
                               "data.train_sets=[{name: a, split: train, ratio: 3}, {name: b, split: val}]"])
    assert cfg.data.num_workers == 0 and cfg.data.flip_prob == 0.25 and cfg.train.seed == 11
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; a float field takes it
    assert cfg.data.synthetic.difficulty_weights == [0.0, 1.0, 2.0]
    assert [(s.name, s.split, s.ratio) for s in cfg.data.train_sets] == [("a", "train", 3.0), ("b", "val", 1.0)]


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

from pathlib import Path


from ppcr.config import Config, dump_config, load_config

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



from dataclasses import replace
from pathlib import Path

import pytest

from ppcr.config import (
    Config,
    ConfigError,
    DataConfig,
    ModelConfig,
    PretrainConfig,
    ShardSetConfig,
    SyntheticConfig,
    TemplateConfig,
    TrainConfig,
    dump_config,
    load_config,
    with_dtype,
)

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
    cfg = load_config(
        RECIPE,
        [
            "data.num_workers=0",
            "data.flip_prob=0.25",
            "train.seed=11",
            "train.lr=1e-3",
            "data.synthetic.difficulty_weights=[0, 1, 2]",
            "data.train_sets=[{name: a, split: train, ratio: 3}, {name: b, split: val}]",
        ],
    )
    assert cfg.data.num_workers == 0 and cfg.data.flip_prob == 0.25 and cfg.train.seed == 11
    assert cfg.train.lr == 0.001  # YAML 1.1 reads 1e-3 as a string; a float field takes it
    assert cfg.data.synthetic.difficulty_weights == [0.0, 1.0, 2.0]
    assert [(s.name, s.split, s.ratio) for s in cfg.data.train_sets] == [("a", "train", 3.0), ("b", "val", 1.0)]


@pytest.mark.parametrize("recipe", sorted(p.name for p in RECIPE.parent.glob("*.yaml")))
def test_every_shipped_recipe_loads(recipe):
    assert isinstance(load_config(RECIPE.parent / recipe), Config)


def message(build) -> str:
    with pytest.raises(ConfigError) as e:
        build()
    return str(e.value)


def test_a_config_built_in_code_is_checked_as_a_loaded_one_with_the_same_message():
    """Each dataclass checks its own values when built (its full dotted key in the message); the checks across
    sections are Config's; a list's items are checked by the class that holds the list."""
    cases = [
        (["train.sam_gt_box_floor=2"], lambda: TrainConfig(sam_gt_box_floor=2.0)),
        (["train.warmup_steps=5", "train.max_steps=5"], lambda: TrainConfig(warmup_steps=5, max_steps=5)),
        (["data.synthetic.min_objects=9"], lambda: SyntheticConfig(min_objects=9)),  # nested two deep
        (["data.synthetic.min_objects=9"], lambda: Config(data=DataConfig(synthetic=SyntheticConfig(min_objects=9)))),
        (["model.templates.spatial_answer='{box} [LOC]'"], lambda: TemplateConfig(spatial_answer="{box} [LOC]")),
        (
            ["data.train_sets=[{name: a}, {name: b, ratio: 0}]"],
            lambda: DataConfig(train_sets=[ShardSetConfig(name="a"), ShardSetConfig(name="b", ratio=0.0)]),
        ),
        (["train.precision=bf16"], lambda: Config(train=TrainConfig(precision="bf16"))),  # across sections
        (["pretrain.seed=0"], lambda: Config(pretrain=PretrainConfig(seed=0))),
        (["model.sam_type=vit_h"], lambda: replace(ModelConfig(), sam_type="vit_h")),
    ]
    for overrides, build in cases:
        loaded = message(lambda overrides=overrides: load_config(RECIPE, overrides))
        assert message(build) == loaded, overrides
    assert "config key 'train.sam_gt_box_floor': must lie in [0, 1]" in message(cases[0][1])
    assert message(cases[5][1]) == "config key 'data.train_sets[1].ratio': must be > 0, got 0.0"


def test_a_model_loaded_in_another_dtype_gets_the_precision_that_fits_it():
    cfg = with_dtype(load_config(RECIPE), "bfloat16")
    assert (cfg.model.dtype, cfg.train.precision) == ("bfloat16", "bf16")
    assert with_dtype(cfg, "float32") == load_config(RECIPE)


def test_every_key_is_listed_with_its_type_default_and_doc_and_the_listed_default_loads():
    """``--help``'s list (ppcr.config.settings) names every key the loader takes, each with a doc, and
    writing each listed default back as an override gives the default config."""
    from ppcr.config import _yaml, settings, settings_help, to_dict

    listed = settings()
    keys = {s.key for s in listed if not s.section}

    def leaves(tree, prefix=""):
        for k, v in tree.items():
            if isinstance(v, dict) and k != "num_images":  # the one mapping-valued key
                yield from leaves(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}"

    assert set(leaves(to_dict(Config()))) == {k for k in keys if "[i]" not in k}
    assert {k for k in keys if "[i]" in k} == {
        f"{lst}[i].{f}" for lst in ("data.train_sets", "eval.sets") for f in ("name", "split", "ratio")
    }
    assert all(s.doc.strip() for s in listed), [s.key for s in listed if not s.doc.strip()]
    by_key = {s.key: s for s in listed}
    assert by_key["pretrain.vision.steps"].default == 6000  # the tree's nested default, not the class's 1000
    assert by_key["train.precision"].type == "one of: fp32, bf16, fp16"
    assert by_key["train.global_batch_size"].type == "int or null"
    text = settings_help()
    assert "  train.sam_gt_box_floor (float; default 0.0)\n      the share of jittered ground-truth boxes" in text
    assert "  eval.sets[i].split (one of: train, val, test, testA, testB; default train)" in text
    overrides = [f"{s.key}={_yaml(s.default)}" for s in listed if not s.section and "[i]" not in s.key]
    assert load_config(None, overrides) == Config()


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.sam_arch.encoder_heads=3", "'model.sam_arch.encoder_heads': encoder_dim 64 must divide into 3 heads"),
        ("model.sam_arch.decoder_heads=3", "'model.sam_arch.decoder_heads': prompt_dim 32 / 2 (the decoder's"),
        ("model.sam_arch.global_attn_indexes=[5]", "'model.sam_arch.global_attn_indexes': [5]: each must be a block"),
        ("model.sam_arch.window_size=0", "'model.sam_arch.window_size': must be >= 1"),
    ],
)
def test_a_tiny_sam_that_segment_anything_could_not_build_or_would_build_otherwise_is_refused(override, message):
    """Before these checks heads that do not divide the width failed inside segment_anything's build, and a global
    attention block past the depth was silently left out."""
    with pytest.raises(ConfigError) as e:
        load_config(RECIPE, [override])
    assert message in str(e.value)

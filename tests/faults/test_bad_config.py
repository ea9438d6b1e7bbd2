"""Bad configs and arguments: each a one-line error that names the problem, before any heavy work."""

import json
import os
import sys
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
    with pytest.raises(
        ConfigError, match=r"unknown config key 'trian.seed'.*data, model, train, eval, pretrain, paths"
    ):
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


LAUNCH_CASES = r"""
import contextlib, importlib, io, json, sys
sys.path.insert(0, "launch")
from ppcr.model.model import PPCRModel
def heavy(*a, **k):
    raise SystemExit("the model was built before the inputs were checked")
PPCRModel.from_config = heavy
entries = {"train": importlib.import_module("train"), "eval": importlib.import_module("eval")}
results = {}
for name, (entry, argv) in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = entries[entry].main(argv)
    results[name] = [rc, err.getvalue()]
print("RESULTS " + json.dumps(results))
"""


def test_the_launcher_stops_with_one_line_before_any_heavy_work(tiny_shards, tiny_models, tmp_path):
    from launching import free_port, overrides, run

    base = ["--config", str(RECIPE), *overrides(tiny_shards, tiny_models, tmp_path, "train.run_name=bad")]
    contradicting = tmp_path / "ds.json"
    contradicting.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_clipping": 0.5}))
    stale = tmp_path / "stale/checkpoints"
    stale.mkdir(parents=True)
    (stale / "latest").write_text("step_00000009")
    old = tmp_path / "old/checkpoints"
    (old / "step_00000009").mkdir(parents=True)
    (old / "latest").write_text("step_00000009")
    (old / "step_00000009/ppcr_rank0.json").write_text(json.dumps({"step": 9}))  # before format_version
    cases = {
        "unknown key": (["train.max_step=3"], "unknown config key 'train.max_step' (valid keys under 'train':"),
        "wrong type": (["train.max_steps=many"], "config key 'train.max_steps': expects an integer, got 'many'"),
        "ds contradicts recipe": (
            [f"train.ds_config={contradicting}"],
            f"{contradicting} sets gradient_clipping = 0.5 but the recipe gives 1.0",
        ),
        "missing model": (
            [f"model.mllm_path={tmp_path}/nope"],
            f"model.mllm_path: no MLLM checkpoint at {tmp_path}/nope (config.json missing). A real "
            f"model: 'hf download Qwen/Qwen2.5-VL-7B-Instruct --local-dir {tmp_path}/nope'",
        ),
        "missing sam": ([f"model.sam_checkpoint={tmp_path}/sam.pth"], f"no SAM checkpoint at {tmp_path}/sam.pth"),
        "missing shards": (
            ["data.train_sets=[{name: absent}]"],
            "data.train_sets 'absent/train' under paths.shards_root: no",
        ),
        "missing checkpoint": (["train.run_name=stale"], f"{stale}/latest names step_00000009, which is not in"),
        "checkpoint of an older ppcr": (
            ["train.run_name=old"],
            f"{old}/step_00000009/ppcr_rank0.json: format_version None is not 1, a checkpoint from another ppcr",
        ),
        "batch vs world size": (
            ["train.global_batch_size=5"],
            "'train.global_batch_size': 5 is not divisible by train.micro_batch_size 2 x world size 1",
        ),
    }
    argvs = {name: ("train", base + extra) for name, (extra, _) in cases.items()}
    argvs["eval: missing checkpoint"] = ("eval", ["--checkpoint", f"{tmp_path}/nowhere"])
    cases["eval: missing checkpoint"] = ([], f"checkpoint {tmp_path}/nowhere: neither a run directory")
    env = dict(os.environ, MASTER_PORT=str(free_port()))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    done = run([sys.executable, "-c", LAUNCH_CASES, json.dumps(argvs)], env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    results = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))[8:])
    for name, (_, expected) in cases.items():
        rc, err = results[name]
        assert rc == 2, (name, err)
        ours = [line for line in err.splitlines() if "error" in line.lower()]  # beside library warnings
        assert len(ours) == 1 and ours[0].startswith("error: ") and expected in ours[0], (name, err)
    assert not (tmp_path / "bad").exists()  # nothing written either


def test_global_batch_size_sets_grad_accum_or_names_the_world_size():
    from ppcr.train.preflight import resolve_batch

    cfg = load_config(RECIPE, ["train.micro_batch_size=2", "train.global_batch_size=16"])
    resolve_batch(cfg, 4)
    assert cfg.train.grad_accum == 2
    with pytest.raises(ConfigError, match="16 is not divisible by train.micro_batch_size 2 x world size 3 = 6"):
        resolve_batch(load_config(RECIPE, ["train.micro_batch_size=2", "train.global_batch_size=16"]), 3)
    with pytest.raises(ConfigError, match="'train.grad_accum': 4, but train.global_batch_size 16 on 4 ranks needs 2"):
        resolve_batch(
            load_config(RECIPE, ["train.micro_batch_size=2", "train.global_batch_size=16", "train.grad_accum=4"]), 4
        )

"""Checkpoints without frozen weights: what a 2-rank run saves, its size against the estimate of
`make bench`, loading for evaluation with strict checks, and resume under ZeRO-2."""

import pytest
import torch
from launching import deepspeed_cmd, overrides, run
from torch import nn

from ppcr.bench.memory import checkpoint_bytes, eval_model_bytes, persistent_buffer_bytes
from ppcr.model.model import PPCRModel
from ppcr.model.saving import load_checkpoint
from ppcr.train.checkpoint import load_module


def deepspeed_files(ckpt):
    return sorted(p for p in ckpt.iterdir() if p.name.endswith(("_model_states.pt", "_optim_states.pt")))


def saved_module_keys(ckpt) -> set[str]:
    """Keys of the module state in every model-states file of a checkpoint; fails on frozen fragments."""
    keys = set()
    for f in ckpt.glob("*_model_states.pt"):
        state = torch.load(f, map_location="cpu", weights_only=False)  # DeepSpeed's own file: pickled objects
        assert state.get("frozen_param_fragments") is None and state.get("frozen_param_shapes") is None, f
        keys |= set(state["module"])
    return keys


def assert_size_as_estimated(ckpt, model: nn.Module, stage: str) -> None:
    """The checkpoint's DeepSpeed files are the size `make bench` estimates for the trained state
    alone (plus up to 5 % and 256 KiB a rank of metadata), well below the size with frozen weights."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    now, before = (
        checkpoint_bytes(trainable, frozen, 2, stage, 4, persistent_buffer_bytes(model), f)["total"]
        for f in (False, True)
    )
    measured = sum(f.stat().st_size for f in deepspeed_files(ckpt))
    assert now <= measured <= now * 1.05 + 2 * 2**18 < before, (measured, now, before)


def assert_trainable_only(ckpt, model: nn.Module) -> None:
    """The checkpoint's module state names every trainable parameter of ``model`` and no frozen one."""
    keys = saved_module_keys(ckpt)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and trainable <= keys and not keys & frozen, sorted(keys & frozen)[:3]


def test_a_zero3_checkpoint_holds_no_frozen_weight_and_loads_for_evaluation(trained_run):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    model, cfg, _, tag = load_checkpoint(trained_run)
    ckpt = trained_run / "checkpoints" / tag
    assert_trainable_only(ckpt, model)
    # The frozen vision tower and SAM image encoder are missing, and not as size-0 placeholders only:
    # the files are the size of the trained state alone (fp32 master and Adam's moments per rank).
    assert any(".visual." in n for n, p in model.named_parameters() if not p.requires_grad)
    assert_size_as_estimated(ckpt, model, "zero3")
    # Loaded: trained weights from the checkpoint, frozen ones from the base paths.
    state = get_fp32_state_dict_from_zero_checkpoint(
        str(trained_run / "checkpoints"), tag=tag, exclude_frozen_parameters=True
    )
    base = dict(PPCRModel.from_config(cfg.model, cfg.train.loss).named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, state[name] if p.requires_grad else base[name]), name


def test_load_checkpoint_names_missing_trainable_and_unexpected_keys(trained_run):
    with pytest.raises(
        RuntimeError,
        match=r"step_00000003 does not fit.*trainable parameter\(s\) missing from the "
        r"checkpoint, first \['sam\.sam\.prompt_encoder\.",
    ):
        load_checkpoint(trained_run, ["model.trainable.sam_prompt_encoder=true"])
    with pytest.raises(RuntimeError, match=r"key\(s\) not in the model, first \[.*k_proj\.lora_"):
        load_checkpoint(trained_run, ["model.lora.target_modules=[q_proj, v_proj, o_proj]"])
    # A checkpoint's trained weight may land on a parameter this config freezes: the key exists.
    model, *_ = load_checkpoint(trained_run, ["model.trainable.sam_mask_decoder=false"])
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.startswith("sam.sam.mask_decoder."))


def test_resume_module_load_lets_frozen_weights_be_absent_but_no_trainable_one():
    net = nn.Sequential(nn.Linear(2, 3), nn.Linear(3, 1))
    net[0].requires_grad_(False)
    frozen = net[0].weight.detach().clone()
    saved = {k: v + 1 for k, v in net.state_dict().items() if k.startswith("1.")}
    load_module(saved, net, where="ckpt")
    assert torch.equal(net[0].weight, frozen) and torch.equal(net[1].bias, saved["1.bias"])
    with pytest.raises(RuntimeError, match=r"checkpoint ckpt .*1 trainable parameter\(s\) missing .*\['1\.bias'\]"):
        load_module({"1.weight": saved["1.weight"]}, net, where="ckpt")
    with pytest.raises(RuntimeError, match=r"1 key\(s\) not in the model, first \['2\.weight'\]"):
        load_module({**saved, "2.weight": torch.zeros(1)}, net, where="ckpt")


def test_zero2_saves_trained_weights_only_and_resumes(tiny_shards, tiny_models, tmp_path):
    base = overrides(
        tiny_shards,
        tiny_models,
        tmp_path,
        "train.max_steps=2",
        "train.save_every=100",
        "train.warmup_steps=1",
        "train.ds_config=ds_configs/zero2.json",
        "train.run_name=z2",
    )
    first = run(deepspeed_cmd(base + ["train.halt_at_step=1"]))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "ZeRO-2" in first.stdout and "halted at step 1" in first.stdout
    model, *_ = load_checkpoint(tmp_path / "z2/checkpoints/step_00000001")
    assert_trainable_only(tmp_path / "z2/checkpoints/step_00000001", model)
    assert_size_as_estimated(tmp_path / "z2/checkpoints/step_00000001", model, "zero2")
    second = run(deepspeed_cmd(base))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from step 1" in second.stdout and "done at step 2" in second.stdout


def test_checkpoint_and_eval_estimates_on_a_hand_computed_case():
    t, f, b = 1000, 8000, 16
    assert checkpoint_bytes(t, f, 8, "zero3", 2, b) == {"total": 8 * (1500 + b), "rank": 1500 + b}
    assert checkpoint_bytes(t, f, 8, "zero3", 2, b, frozen_included=True) == {"total": 8 * (3500 + b), "rank": 3500 + b}
    assert checkpoint_bytes(t, f, 8, "zero2", 2, b) == {"total": 12 * t + 2 * t + b, "rank": 1500 + 2 * t + b}
    assert checkpoint_bytes(t, f, 8, "zero2", 2, b, True)["rank"] == 1500 + 2 * (t + f) + b
    assert eval_model_bytes(t, f, 2) == 2 * 9000 + 4 * t and eval_model_bytes(t, f, 2, True) == 6 * 9000

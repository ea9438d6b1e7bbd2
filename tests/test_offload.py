"""ZeRO-Offload (ds_configs/zero3_offload.json): the optimizer is DeepSpeedCPUAdam with the recipe's
groups, it trains on 2 ranks through the real launcher as ZeRO-3 without offload does, and a machine
that cannot build its cpu_adam op is told what is missing."""

import copy
import json
import os
import shutil

import pytest
import torch
from conftest import TRAINED_RUN, model_config
from launching import ROOT, deepspeed_cmd, losses, overrides, run

from ppcr.train import offload
from ppcr.train.offload import CpuAdamUnavailable, load_cpu_adam, offloads_optimizer
from ppcr.train.optim import build_optimizer

DS = {
    name: json.loads((ROOT / "ds_configs" / f"{name}.json").read_text()) for name in ("zero2", "zero3", "zero3_offload")
}


def why_cpu_adam_cannot_build() -> str | None:
    """What the JIT build of DeepSpeed's cpu_adam op lacks on this machine (None: it can build)."""
    from torch.utils.cpp_extension import verify_ninja_availability

    try:
        verify_ninja_availability()
    except RuntimeError:
        return "ninja is not installed"
    cxx = os.environ.get("CXX", "c++")
    return None if shutil.which(cxx) else f"no C++ compiler ({cxx}) on PATH"


NO_BUILD = why_cpu_adam_cannot_build()
needs_cpu_adam = pytest.mark.skipif(
    NO_BUILD is not None, reason=f"DeepSpeed's cpu_adam op cannot be built here: {NO_BUILD}"
)


def test_only_the_offload_config_moves_the_optimizer_to_cpu():
    assert offloads_optimizer(DS["zero3_offload"])
    assert not offloads_optimizer(DS["zero3"]) and not offloads_optimizer(DS["zero2"])
    assert offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "none"}}})
    assert not offloads_optimizer({"zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}}})


@needs_cpu_adam
def test_cpu_adam_has_the_recipe_groups_and_makes_adamw_updates(tiny_shards, tiny_models):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from ppcr.model.model import PPCRModel

    cfg = model_config(tiny_shards, tiny_models, "llava", "train.weight_decay=0.1", "train.head_lr=3e-3")
    model = PPCRModel.from_config(cfg.model, cfg.train.loss)
    twin = copy.deepcopy(model)
    plain, cpu = build_optimizer(model, cfg.train), build_optimizer(twin, cfg.train, ds=DS["zero3_offload"])
    assert type(plain) is torch.optim.AdamW and type(cpu) is DeepSpeedCPUAdam and cpu.adam_w_mode

    def described(opt, module):
        name_of = {p: n for n, p in module.named_parameters()}
        return [
            (g["name"], g["lr"], g["weight_decay"], g["betas"], g["eps"], [name_of[p] for p in g["params"]])
            for g in opt.param_groups
        ]

    assert described(cpu, twin) == described(plain, model)
    assert {g["name"] for g in cpu.param_groups} >= {"lr", "head_lr", "head_lr_no_decay"}  # decay and not
    # The same gradients give the same updates in every group (learning rate, decay, betas, eps); they
    # change between steps, else Adam's step would not depend on the betas.
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for a, b in zip(model.parameters(), twin.parameters()):
            if a.requires_grad:
                a.grad = torch.randn(a.shape, generator=gen)
                b.grad = a.grad.clone()
        plain.step()
        cpu.step()
    changed = 0
    for (name, a), b in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)
        changed += a.requires_grad
    assert changed


def test_a_cpu_adam_that_does_not_build_is_an_error_naming_the_config_and_what_it_needs(monkeypatch):
    from deepspeed.ops.op_builder import CPUAdamBuilder

    def no_build(self, verbose=False):
        raise RuntimeError("Error building extension 'cpu_adam'")

    monkeypatch.setattr(CPUAdamBuilder, "load", no_build)
    with pytest.raises(CpuAdamUnavailable) as e:
        load_cpu_adam(ds_config="ds_configs/zero3_offload.json", announce=False)
    message = str(e.value)
    assert "train.ds_config ds_configs/zero3_offload.json" in message and "Error building extension" in message
    assert "ninja" in message and "C++ compiler" in message and "ds_configs/zero3.json" in message
    assert str(offload.extensions_dir()) in message


@needs_cpu_adam
def test_zero3_offload_trains_on_two_ranks_as_zero3_does(trained_run, tiny_shards, tiny_models, tmp_path):
    """The recipe's train.ds_config picks the JSON. Same model, data and steps as the trained run (ZeRO-3, torch's
    AdamW): the optimizer is DeepSpeedCPUAdam, the loss moves, and it moves as with AdamW on ZeRO-3."""
    args = overrides(tiny_shards, tiny_models, tmp_path, *TRAINED_RUN, "train.run_name=offload")
    offloaded = run(deepspeed_cmd(args + ["train.ds_config=ds_configs/zero3_offload.json"]))
    assert offloaded.returncode == 0, offloaded.stdout[-3000:] + offloaded.stderr[-3000:]
    assert "optimizer: DeepSpeedCPUAdam" in offloaded.stdout and "cpu_adam op ready" in offloaded.stdout
    plain = (trained_run.parent / "trained.stdout").read_text()
    assert "optimizer: AdamW" in plain and "cpu_adam" not in plain

    mine, ref = losses(tmp_path / "offload"), losses(trained_run)
    assert sorted(mine) == sorted(ref) == [1, 2, 3]
    assert mine[3]["loss"] < mine[1]["loss"]  # it trains
    for step in (1, 2, 3):
        assert mine[step]["loss"] == pytest.approx(ref[step]["loss"], rel=1e-5), step
        lrs = {k: v for k, v in mine[step].items() if k.startswith("lr/")}
        assert lrs and lrs == {k: v for k, v in ref[step].items() if k.startswith("lr/")}  # groups and schedule
    assert (tmp_path / "offload/checkpoints/latest").read_text() == "step_00000003"

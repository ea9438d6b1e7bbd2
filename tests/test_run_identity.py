"""End to end through the real launcher (issue 22): a run trained for 20 steps on 2, then 1, then 2 CPU ranks
(elastic resume: DeepSpeed's universal checkpoint, the data stream dealt again); then its SAM file replaced:
resume, make eval (launch/eval.py), ppcr-export and ppcr-infer each refuse, naming the file, both hashes and
the flag, and with the flag each runs; and a new run that starts from a trained model (model.init_from)."""

import json
import math
import shutil
import sys
from collections import Counter

import pytest
import torch
from conftest import model_config
from launching import deepspeed_cmd, losses, overrides, run

from ppcr.common.hashing import sha256_uncached
from ppcr.config import load_config
from ppcr.data.shards import iter_tar_samples, load_manifest
from ppcr.eval.demo import examples
from ppcr.eval.infer import main as infer_main
from ppcr.model.export import main as export_main
from ppcr.model.fingerprint import FINGERPRINT_FILE
from ppcr.model.model import PPCRModel
from ppcr.model.saving import load_checkpoint, load_pretrained, trained_state
from ppcr.model.tiny import save_tiny_sam
from ppcr.train.init_from import init_trained


@pytest.fixture(scope="module")
def long_run(tiny_shards, tiny_models, tmp_path_factory):
    """20 steps of 4 samples: steps 1-8 on 2 ZeRO-3 ranks, 9-14 on 1 process, 15-20 on 2 again, every sample recorded;
    on a SAM file of the run's own that a test may replace. The head's learning rate is twice the LoRA's, so
    that an optimizer group given another group's settings shows."""
    root = tmp_path_factory.mktemp("identity")
    sam = shutil.copy(tiny_models["sam"], root / "sam.pth")
    args = overrides(
        tiny_shards,
        tiny_models,
        root / "runs",
        f"model.sam_checkpoint={sam}",
        "train.max_steps=20",
        "train.save_every=100",
        "train.run_name=long",
        "model.max_new_tokens=6",
        "train.global_batch_size=4",
        "train.record_samples=true",
        "train.lr=1e-3",
        "train.head_lr=2e-3",
        "train.sam_lr=1e-3",
    )
    one_rank = [sys.executable, "launch/train.py", "--config", "launch/configs/default.yaml"]  # one process
    phases = []
    for ranks, halt in ((2, 8), (1, 14), (2, None)):
        extra = [f"train.halt_at_step={halt}"] if halt else []
        done = run(deepspeed_cmd(args + extra) if ranks == 2 else one_rank + args + extra)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        phases.append(done)
    return {"run": root / "runs/long", "sam": root / "sam.pth", "args": args, "root": root, "phases": phases}


def test_two_then_one_then_two_ranks_resume_with_every_sample_once(long_run, tiny_shards):
    """Elastic resume: the trained state and Adam's moments re-sharded (DeepSpeed's universal checkpoint), each
    optimizer group keeping its own learning rate, training going on (weights move after each change), and the
    data stream continued with no sample of an epoch twice and none left out (ResumableLoader.load_elastic)."""
    run_dir, phases = long_run["run"], long_run["phases"]
    assert "resuming checkpoint step_00000008 of 2 ranks on 1" in phases[1].stdout
    assert "resumed from step 8" in phases[1].stdout and "halted at step 14" in phases[1].stdout
    assert "resuming checkpoint step_00000014 of 1 ranks on 2" in phases[2].stdout
    assert "resumed from step 14" in phases[2].stdout and "done at step 20" in phases[2].stdout
    logged = losses(run_dir)
    assert sorted(logged) == list(range(1, 21))
    assert all(math.isfinite(logged[s]["loss"]) for s in logged)
    groups = {k for k in logged[1] if k.startswith("lr/")}  # each optimizer group by name, with its own rate
    assert all({k for k in logged[s] if k.startswith("lr/")} == groups for s in logged)
    assert all(logged[s]["lr/head_lr_no_decay"] == pytest.approx(2 * logged[s]["lr/lr_no_decay"]) for s in logged)
    ckpts = run_dir / "checkpoints"
    heads = [load_checkpoint(ckpts / tag)[0].box_head.state_dict() for tag in ("step_00000014", "step_00000020")]
    assert any(not torch.equal(heads[0][k], heads[1][k]) for k in heads[0])  # it trains after the change
    # Sample accounting, from what each rank recorded it trained on: 4 samples a step whatever the ranks.
    lines = [
        json.loads(line)
        for f in sorted((run_dir / "samples").glob("rank*.jsonl"))
        for line in f.read_text().splitlines()
    ]
    per_step = Counter()
    for line in lines:
        per_step[line["step"]] += len(line["keys"])
    assert per_step == {s: 4 for s in range(1, 21)}
    seen = [(e, k) for line in lines for e, k in zip(line["epochs"], line["keys"])]
    everything = sorted(
        raw["__key__"]
        for s in load_manifest(tiny_shards)["splits"]["train"]["shards"]
        for raw in iter_tar_samples(tiny_shards / s["name"])
    )
    assert len(everything) < 80  # the run goes past one epoch: epoch 0 must be complete
    assert sorted(k for e, k in seen if e == 0) == everything  # every sample of epoch 0 once, none twice
    later = [k for e, k in seen if e == 1]
    assert later and len(later) == len(set(later))


def test_a_replaced_sam_file_is_refused_by_resume_eval_export_and_infer_unless_overridden(long_run, capsys):
    run_dir, sam = long_run["run"], long_run["sam"]
    was = json.loads((run_dir / "checkpoints/step_00000020" / FINGERPRINT_FILE).read_text())["sam"]["sha256"]
    assert was == sha256_uncached(sam)
    save_tiny_sam(load_config(run_dir / "config.yaml").model.sam_arch, 256, sam, seed=1)  # another SAM, same path
    now = sha256_uncached(sam)
    assert now != was

    def refused(text):
        assert f"{sam}: sha256 {was} when trained, {now} now" in text and "--allow-base-mismatch" in text, text[-3000:]

    flag = "--allow-base-mismatch"
    ev = [sys.executable, "launch/eval.py", "--checkpoint", str(run_dir), "eval.max_expressions=2"]
    done = run(ev)
    assert done.returncode == 2
    refused(done.stderr)
    done = run(ev + [flag])
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run_dir / "eval/step_00000020/results.json").is_file()

    out = long_run["root"] / "export"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out)]) == 2
    refused(capsys.readouterr().err)
    assert not out.exists()
    with pytest.warns(UserWarning, match="loaded anyway as asked"):
        assert export_main(["--checkpoint", str(run_dir), "--out", str(out), flag]) == 0

    image, expression = examples()[0]
    infer = [
        "--checkpoint",
        str(run_dir),
        "--image",
        image,
        "--expression",
        expression,
        "--out",
        str(long_run["root"] / "infer"),
        "--device",
        "cpu",
    ]
    assert infer_main(infer) == 2
    refused(capsys.readouterr().err)
    with pytest.warns(UserWarning, match="loaded anyway as asked"):
        assert infer_main(infer + [flag]) == 0

    # one process: the refusal comes before any rank would start; with the flag, an elastic resume (2 -> 1)
    resume = [
        sys.executable,
        "launch/train.py",
        "--config",
        "launch/configs/default.yaml",
        *long_run["args"],
        "train.max_steps=21",
    ]
    done = run(resume)
    assert done.returncode == 2
    refused(done.stderr)
    done = run(resume + [flag])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step 20" in done.stdout and "done at step 21" in done.stdout
    # the new checkpoint records the base it was trained on from there
    assert json.loads((run_dir / "checkpoints/step_00000021" / FINGERPRINT_FILE).read_text())["sam"]["sha256"] == now


def test_a_checkpoints_trained_weights_start_a_new_model(trained_run, tiny_shards, tiny_models):
    """model.init_from with a checkpoint: its trained weights go into a freshly built model, which then predicts
    as the checkpoint does."""
    cfg = load_config(trained_run / "config.yaml")
    state, complete = trained_state(trained_run, cfg.model)
    assert not complete
    fresh = PPCRModel.from_config(cfg.model, cfg.train.loss)
    assert init_trained(fresh, state, complete=False, where=str(trained_run)) == []
    loaded = load_checkpoint(trained_run)[0]
    theirs = dict(loaded.named_parameters())
    assert all(torch.equal(p, theirs[n]) for n, p in fresh.named_parameters())
    other = model_config(tiny_shards, tiny_models, "qwen2_5_vl", "model.lora.rank=4")
    with pytest.raises(RuntimeError, match="lora_A.semantic.weight has shape \\(8, 128\\) there and \\(4, 128\\)"):
        init_trained(PPCRModel.from_config(other.model, other.train.loss), state, complete=False, where="x")


def test_init_from_an_export_starts_a_new_run_with_its_weights_and_fresh_optimizer_and_data(
    exported, tiny_shards, tiny_models, tmp_path
):
    """A new run from an export, one step at a learning rate too small to move anything: its checkpoint holds the
    export's trained weights, its optimizer and data begin at step 1."""
    tiny = "1.0e-12"
    args = overrides(
        tiny_shards,
        tiny_models,
        tmp_path,
        f"model.init_from={exported / 'model'}",
        "train.max_steps=1",
        "train.warmup_steps=0",
        "train.run_name=tuned",
        f"train.lr={tiny}",
        f"train.head_lr={tiny}",
        f"train.sam_lr={tiny}",
        "data.num_workers=0",
    )
    done = run([sys.executable, "launch/train.py", "--config", "launch/configs/default.yaml", *args])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"started from the trained weights of {exported / 'model'}" in done.stdout
    ckpt = tmp_path / "tuned/checkpoints/step_00000001"
    assert json.loads((ckpt / "ppcr_rank0.json").read_text())["loader"]["batches"] == 1  # fresh data
    tuned, source = load_checkpoint(ckpt)[0], load_pretrained(exported / "model")[0]
    theirs = dict(source.named_parameters())
    for name, p in tuned.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p, theirs[name], atol=1e-6), name

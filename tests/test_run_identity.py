"""End to end through the real entry points: a run trained for 20 steps, then its SAM file replaced by
another SAM: resume, make eval (launch/eval.py), ppcr-export and ppcr-infer each refuse, naming the file,
both hashes and the flag; with the flag each runs."""

import json
import shutil
import sys

import pytest

from launching import deepspeed_cmd, overrides, run
from ppcr.common.hashing import sha256_uncached
from ppcr.config import load_config
from ppcr.eval.demo import examples
from ppcr.eval.infer import main as infer_main
from ppcr.model.export import main as export_main
from ppcr.model.fingerprint import FINGERPRINT_FILE
from ppcr.model.tiny import save_tiny_sam


@pytest.fixture(scope="module")
def long_run(tiny_shards, tiny_models, tmp_path_factory):
    """20 steps on 2 ZeRO-3 ranks, on a SAM file of the run's own that a test may replace."""
    root = tmp_path_factory.mktemp("identity")
    sam = shutil.copy(tiny_models["sam"], root / "sam.pth")
    args = overrides(tiny_shards, tiny_models, root / "runs", f"model.sam_checkpoint={sam}", "train.max_steps=20",
                     "train.save_every=10", "train.run_name=long", "model.max_new_tokens=6")
    done = run(deepspeed_cmd(args))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return {"run": root / "runs/long", "sam": root / "sam.pth", "args": args, "root": root}


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
    assert export_main(["--checkpoint", str(run_dir), "--out", str(out), flag]) == 0

    image, expression = examples()[0]
    infer = ["--checkpoint", str(run_dir), "--image", image, "--expression", expression, "--out",
             str(long_run["root"] / "infer"), "--device", "cpu"]
    assert infer_main(infer) == 2
    refused(capsys.readouterr().err)
    assert infer_main(infer + [flag]) == 0

    resume = deepspeed_cmd(long_run["args"] + ["train.max_steps=21"])
    done = run(resume)
    assert done.returncode == 2
    refused(done.stderr)
    done = run(resume + [flag])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resumed from step 20" in done.stdout and "done at step 21" in done.stdout
    # the new checkpoint records the base it was trained on from there
    assert json.loads((run_dir / "checkpoints/step_00000021" / FINGERPRINT_FILE).read_text())["sam"]["sha256"] == now

"""Ranks that halt, die or are told to stop: train.halt_at_step, SIGTERM (preemption), kill -9 of one rank, a
kill while a checkpoint is being written. The job stops; the same command resumes from the last complete
checkpoint and continues as an uninterrupted run would."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from launching import ROOT, deepspeed_cmd, losses, overrides, rank_processes, run
from test_checkpoint_size import assert_trainable_only

from ppcr.model.saving import load_checkpoint
from ppcr.train.nonfinite import NAMES as TERMS  # the total and its six terms

INJECT = Path(__file__).parent / "inject.py"


@pytest.fixture(scope="module")
def uninterrupted(tiny_shards, tiny_models, tmp_path_factory):
    """The reference: 8 steps with checkpoints every 2, never interrupted; and its arguments."""
    runs = tmp_path_factory.mktemp("runs")
    args = overrides(tiny_shards, tiny_models, runs, "train.max_steps=8", "train.save_every=2")
    done = run(deepspeed_cmd(args + ["train.run_name=reference"]))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return args, losses(runs / "reference"), runs / "reference"


def same_losses(run_dir, reference):
    mine = losses(run_dir)  # a step logged twice (before the fault and after the resume): the last line
    assert sorted(mine) == sorted(reference) == list(range(1, 9))
    for step in reference:
        for term in TERMS:
            assert mine[step][term] == pytest.approx(reference[step][term], rel=1e-6, abs=1e-7), (step, term)


def gone(procs, timeout):
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return not alive


def test_a_halted_run_resumes_from_trained_weights_alone_as_the_uninterrupted_run_goes_on(uninterrupted, tmp_path):
    """train.halt_at_step stops at step 3 (between the checkpoints every 2) with a checkpoint of the trained
    weights only; the same command resumes there, with the losses and data position of the uninterrupted run."""
    args, reference, reference_dir = uninterrupted
    args = args + [f"paths.runs_root={tmp_path}", "train.run_name=halted"]
    first = run(deepspeed_cmd(args + ["train.halt_at_step=3"]))
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "halted at step 3" in first.stdout
    halted = tmp_path / "halted/checkpoints/step_00000003"
    assert_trainable_only(halted, load_checkpoint(halted)[0])  # the frozen weights come from the base paths
    again = run(deepspeed_cmd(args))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from step 3" in again.stdout and "done at step 8" in again.stdout
    same_losses(tmp_path / "halted", reference)
    # The same data position at the end: the same batches were consumed, none twice, none skipped.
    for rank in (0, 1):
        name = f"step_00000008/ppcr_rank{rank}.json"
        mine = json.loads((tmp_path / "halted/checkpoints" / name).read_text())["loader"]
        assert mine == json.loads((reference_dir / "checkpoints" / name).read_text())["loader"]
        assert mine["batches"] == 8
    assert (tmp_path / "halted/checkpoints/latest").read_text() == "step_00000008"


def test_kill_9_of_one_rank_stops_the_job_and_the_same_command_resumes(uninterrupted, tmp_path):
    args, reference, _ = uninterrupted
    args = args + [f"paths.runs_root={tmp_path}", "train.run_name=killed"]
    env = dict(os.environ, PPCR_FAULT=json.dumps({"stop_after_step": 5, "rank": 1}))
    proc = subprocess.Popen(
        deepspeed_cmd(args, INJECT), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline, ranks = time.time() + 300, []
    while time.time() < deadline and proc.poll() is None:
        ranks = rank_processes(proc.pid)
        if len(ranks) == 2 and ranks[1].status() == psutil.STATUS_STOPPED:
            break
        time.sleep(0.2)
    assert len(ranks) == 2 and ranks[1].status() == psutil.STATUS_STOPPED, proc.communicate()[0][-3000:]
    everything = [ranks[0], ranks[1], *ranks[0].children(recursive=True), *ranks[1].children(recursive=True)]
    os.kill(ranks[1].pid, signal.SIGKILL)  # kill -9, mid-training (after step 5, between checkpoints 4 and 6)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0  # the launcher stops the job...
    assert gone(everything, timeout=30)  # ...and nothing of it is left: the other rank, the loader workers,
    port = proc.args[proc.args.index("--master_port") + 1]
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))  # DeepSpeed's shm buffers
    assert (tmp_path / "killed/checkpoints/latest").read_text() == "step_00000004"

    again = run(deepspeed_cmd(args))  # the same command, without the fault
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed from step 4" in again.stdout and "done at step 8" in again.stdout
    same_losses(tmp_path / "killed", reference)


def test_a_rank_killed_while_writing_a_checkpoint_leaves_the_previous_one_latest(uninterrupted, tmp_path):
    args, reference, _ = uninterrupted
    args = args + [f"paths.runs_root={tmp_path}", "train.run_name=torn"]
    env = dict(os.environ, PPCR_FAULT=json.dumps({"die_in_save": "step_00000004", "rank": 1}))
    torn = run(deepspeed_cmd(args, INJECT), env=env)
    assert torn.returncode != 0
    ckpts = tmp_path / "torn/checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002"
    half = ckpts / "step_00000004/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    assert half.is_file() and not (ckpts / "step_00000004/ppcr_rank1.json").exists()  # really torn mid-write

    again = run(deepspeed_cmd(args))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "a save that did not complete" in again.stdout and "resumed from step 2" in again.stdout
    same_losses(tmp_path / "torn", reference)
    assert (ckpts / "latest").read_text() == "step_00000008"


def test_sigusr1_to_one_rank_saves_a_complete_checkpoint_and_exits_zero(tiny_shards, tiny_models, tmp_path):
    """SIGUSR1 (what SLURM sends before the end with --signal=USR1@...) to one rank; SIGTERM, which the ranks
    handle alike, to every process is the test below."""
    args = overrides(
        tiny_shards, tiny_models, tmp_path, "train.max_steps=500", "train.save_every=1000", "train.run_name=pre"
    )
    proc = subprocess.Popen(deepspeed_cmd(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "pre/metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 2):
        time.sleep(0.5)
    ranks = rank_processes(proc.pid)
    assert len(ranks) == 2
    ranks[1].send_signal(signal.SIGUSR1)  # one rank is enough: the others follow at the step boundary
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out
    tag = (tmp_path / "pre/checkpoints/latest").read_text()
    step = int(tag.split("_")[1])
    assert 2 <= step < 500
    ckpt = tmp_path / "pre/checkpoints" / tag
    assert (ckpt / "ppcr_rank0.json").is_file() and (ckpt / "ppcr_rank1.json").is_file()
    again = run(
        deepspeed_cmd(args[:-3] + [f"train.max_steps={step + 1}", "train.save_every=1000", "train.run_name=pre"])
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from step {step}" in again.stdout and f"done at step {step + 1}" in again.stdout


def test_sigterm_during_validation_checkpoints_and_exits_before_validation_ends(tiny_shards, tiny_models, tmp_path):
    """Validation asks the preemption flag between its batches: a signal in its 2nd batch (of 18) stops it
    there, on every rank, and the step's checkpoint is written."""
    args = overrides(
        tiny_shards,
        tiny_models,
        tmp_path,
        "train.max_steps=4",
        "train.save_every=1000",
        "train.val_every=2",
        "train.val_samples=36",
        "eval.batch_size=1",
        "train.run_name=preval",
    )
    after = tmp_path / "batches_after_signal"
    env = dict(os.environ, PPCR_FAULT=json.dumps({"sigterm_in_validation": 2, "rank": 1, "out": str(after)}))
    done = run(deepspeed_cmd(args, INJECT), env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "preempted at step 2" in done.stdout
    assert after.read_text() == "0"  # the batch after the signalled one never started
    assert (tmp_path / "preval/checkpoints/latest").read_text() == "step_00000002"
    logged = [json.loads(line) for line in (tmp_path / "preval/metrics.jsonl").read_text().splitlines()]
    assert not [d for d in logged if d["kind"].startswith("val")]  # no half-done validation is logged


def test_sigterm_to_every_process_of_the_job_checkpoints_and_exits_zero(tiny_shards, tiny_models, tmp_path):
    """What SLURM does on preemption or scancel: SIGTERM reaches every process of the job step, both ranks
    and all their loader workers. The workers leave it to their rank (a worker that died of it would crash
    the rank: "DataLoader worker ... is killed by signal"); the ranks checkpoint and exit 0. (Workers and
    SIGUSR1 from others: tests/test_worker_signals.py.)"""
    args = overrides(
        tiny_shards, tiny_models, tmp_path, "train.max_steps=500", "train.save_every=1000", "train.run_name=all"
    )
    proc = subprocess.Popen(deepspeed_cmd(args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "all/metrics.jsonl"
    deadline, ranks, workers = time.time() + 300, [], []
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:  # training, loaders running
            ranks = rank_processes(proc.pid)
            workers = [w for r in ranks for w in r.children(recursive=True)]
            if len(ranks) == 2 and len(workers) >= 4:  # data.num_workers=2 per rank
                break
        time.sleep(0.5)
    assert len(ranks) == 2 and len(workers) >= 4, proc.communicate()[0][-3000:]
    for p in workers + ranks:  # the workers first: they must not die before their rank has decided
        p.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out and "killed by signal" not in out
    tag = (tmp_path / "all/checkpoints/latest").read_text()
    assert int(tag.split("_")[1]) >= 2
    ckpt = tmp_path / "all/checkpoints" / tag
    for rank in (0, 1):  # every rank's part of it
        for name in (
            f"ppcr_rank{rank}.json",
            f"ppcr_rank{rank}_rng.pt",
            f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt",
            f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt",
        ):
            assert (ckpt / name).is_file(), name
        assert json.loads((ckpt / f"ppcr_rank{rank}.json").read_text())["step"] == int(tag.split("_")[1])

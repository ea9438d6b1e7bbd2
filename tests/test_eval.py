"""Evaluation by generation: the launcher on 1 process and on 2 CPU ranks agrees, and counts each
expression of the split exactly once."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from launching import ROOT, deepspeed_cmd, run
from PIL import Image
from pycocotools import mask as mask_utils

from ppcr.data.shards import load_manifest
from ppcr.eval.rescore import read_records, rescore


def test_eval_on_two_zero3_ranks_equals_one_process_and_counts_every_expression(tiny_shards, trained_run):
    """Two ranks with the weights partitioned by ZeRO-3 (--zero3: every forward gathers them, so the ranks decode
    in lockstep; a rank whose share ran out runs filler batches) give every expression the answers and boxes one
    process with the whole model gives, and the same table; each expression is scored once."""
    run_dir = trained_run
    sets = f"eval.sets=[{{name: {tiny_shards.name}, split: val}}]"
    one = run([sys.executable, "launch/eval.py", "--checkpoint", str(run_dir), sets])
    assert one.returncode == 0, one.stderr[-3000:]
    out = run_dir / "eval/step_00000003"
    rows_one = json.loads((out / "results.json").read_text())["rows"]
    records_one = read_records(out / f"predictions_{tiny_shards.name}_val.jsonl")
    cmd = deepspeed_cmd([])
    cmd[cmd.index(str(ROOT / "launch/train.py"))] = str(ROOT / "launch/eval.py")
    cmd = cmd[: cmd.index("--config")] + ["--checkpoint", str(run_dir), sets, "--redo", "--zero3"]
    two = run(cmd)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "kept from an earlier run" not in two.stdout  # --redo: not the split just written
    rows_two = json.loads((out / "results.json").read_text())["rows"]
    timing = ("seconds", "expressions_per_s", "lm_forwards_per_expression")  # differ with the ranks' batches
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_one] == [
        {k: v for k, v in r.items() if k not in timing} for r in rows_two
    ]
    alone = {(r["key"], r["sentence"]): r for r in records_one}
    synced = read_records(out / f"predictions_{tiny_shards.name}_val.jsonl")
    assert len(synced) == len(alone)
    for z in synced:
        r = alone[(z["key"], z["sentence"])]
        assert (z["semantic_answer"], z["spatial_answer"]) == (r["semantic_answer"], r["spatial_answer"])
        assert z["box"] == pytest.approx(r["box"], abs=1e-4) and z["text_box"] == r["text_box"]
    manifest = load_manifest(tiny_shards)
    whole = [r for r in rows_one if r["group"] == "all"]
    assert [r["count"] for r in whole] == [manifest["splits"]["val"]["expressions"]]
    # the split's groups partition it, with the counts its manifest gives
    for split, row in zip(("val",), whole):
        groups = {r["group"]: r["count"] for r in rows_one if r["split"] == row["split"] and r["group"] != "all"}
        assert groups == manifest["splits"][split]["groups"] and sum(groups.values()) == row["count"]
    assert "| synthetic_unc/val" in one.stdout and "cIoU" in one.stdout
    assert (run_dir / "eval/step_00000003/masks.png").is_file()
    with Image.open(run_dir / "eval/step_00000003/prec_at_x.png") as plot:  # Prec@X over X
        assert plot.format == "PNG" and plot.size == (576, 408)
    # The per-expression file rescored gives the table's figures back, whole split and groups alike.
    for row in [r for r in rows_two if r["group"] == "all"]:
        records = read_records(run_dir / f"eval/step_00000003/predictions_{row['split'].replace('/', '_')}.jsonl")
        assert len(records) == row["count"] and len({(r["ref_id"], r["sentence"]) for r in records}) == row["count"]
        ious = [r["iou"][row["ablation"]] for r in records]
        assert sum(ious) / len(ious) == pytest.approx(row["gIoU"], abs=1e-4)
        rescored = rescore(records, row["split"])
        table = [{k: v for k, v in r.items() if k in rescored[0]} for r in rows_two if r["split"] == row["split"]]
        assert rescored == table
        mask = mask_utils.decode(records[0]["mask"] | {"counts": records[0]["mask"]["counts"].encode()})
        assert mask.ndim == 2 and mask.dtype == np.uint8


def broken_copy(tiny_shards, tmp_path, name="broken_unc"):
    """A copy of the test set that says it holds refcoco/unc, whose val split then has fewer expressions than the
    published one: a split whose count check fails."""
    out = shutil.copytree(tiny_shards, tmp_path / "shards" / name)
    manifest = load_manifest(out)
    manifest["source"]["dataset"] = "refcoco"
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_every_count_is_checked_before_the_first_forward_and_a_bad_split_loses_nothing(
    tiny_shards, tiny_models, tmp_path, monkeypatch
):
    from conftest import model_config

    from ppcr.common.distributed import DistInfo
    from ppcr.eval import evaluate, splits
    from ppcr.model.model import PPCRModel
    from ppcr.model.predict import PPCR

    broken = broken_copy(tiny_shards, tmp_path)
    shutil.copytree(tiny_shards, broken.parent / tiny_shards.name)
    sets = f"eval.sets=[{{name: {tiny_shards.name}, split: testB}}, {{name: {broken.name}, split: val}}]"
    cfg = model_config(
        tiny_shards,
        tiny_models,
        "llava",
        f"paths.shards_root={broken.parent}",
        sets,
        "model.max_new_tokens=4",
        "eval.max_expressions=3",
    )
    events = []
    counted, forward = splits.expected_expressions, evaluate.predict_items
    monkeypatch.setattr(
        splits, "expected_expressions", lambda d, s: (events.append(("count", Path(d).name)), counted(d, s))[1]
    )
    monkeypatch.setattr(evaluate, "predict_items", lambda *a, **k: (events.append("forward"), forward(*a, **k))[1])
    model = PPCRModel.from_config(cfg.model, cfg.train.loss).eval()
    one = DistInfo(rank=0, world_size=1, local_rank=0, node_rank=0)
    good, bad = evaluate_splits_list(model, cfg, one, PPCR)
    assert events.index(("count", broken.name)) < events.index("forward")  # every split checked first
    assert good.error is None and good.rows[0]["count"] == 3
    assert bad.rows == [] and f"shard set {broken} split 'val': the refs file" in bad.error
    assert "the published refcoco/unc val has 10834" in bad.error


def evaluate_splits_list(model, cfg, dist, ablation):
    from ppcr.eval.splits import evaluate_splits

    return list(evaluate_splits(model, cfg, dist, synced=False, ablations=[ablation]))


def test_make_eval_writes_each_split_reports_a_failing_one_keeps_done_ones_and_flags_unexcluded(
    tiny_shards, trained_run, tmp_path
):
    """A split that fails is an error line and in results.json, the others are written as they are done
    (predictions, rows, TensorBoard); run again, the written splits are kept; testB, which the run's training
    did not leave out (its eval.sets held val only), is flagged."""
    run_dir = shutil.copytree(trained_run, tmp_path / "run", ignore=shutil.ignore_patterns("eval"))
    assert json.loads((run_dir / "checkpoints/step_00000003/ppcr_excluded.json").read_text()) == {
        "exclude_eval_images": True,
        "excluded_eval_splits": [f"{tiny_shards.name}/val"],
    }
    broken = broken_copy(tiny_shards, tmp_path)
    shutil.copytree(tiny_shards, broken.parent / tiny_shards.name)
    sets = (
        f"eval.sets=[{{name: {tiny_shards.name}, split: val}}, {{name: {broken.name}, split: val}}, "
        f"{{name: {tiny_shards.name}, split: testB}}]"
    )
    cmd = [
        sys.executable,
        "launch/eval.py",
        "--checkpoint",
        str(run_dir),
        sets,
        "eval.max_expressions=3",
        f"paths.shards_root={broken.parent}",
    ]
    done = run(cmd)
    second = run(cmd)
    assert done.returncode == 4, done.stderr[-3000:]
    assert f"error: shard set {broken} split 'val': the refs file" in done.stderr
    out = run_dir / "eval/step_00000003"
    results = json.loads((out / "results.json").read_text())
    assert [r["split"] for r in results["rows"] if r["group"] == "all"] == [
        f"{tiny_shards.name}/val",
        f"{tiny_shards.name}/testB",
    ]
    assert list(results["errors"]) == [f"{broken.name}/val"]
    assert results["not_excluded_from_training"] == [f"{broken.name}/val", f"{tiny_shards.name}/testB"]
    flags = {r["split"]: r["excluded_from_training"] for r in results["rows"]}
    assert flags == {f"{tiny_shards.name}/val": True, f"{tiny_shards.name}/testB": False}
    assert f"| {tiny_shards.name}/testB*" in done.stdout and "may have trained on them" in done.stdout
    for split in ("val", "testB"):
        assert len(read_records(out / f"predictions_{tiny_shards.name}_{split}.jsonl")) == 3
        assert (out / f"split_{tiny_shards.name}_{split}.json").is_file()
    logged = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert f"eval/{tiny_shards.name}/testB/box=head,sam=box+semsp" in logged
    assert (
        second.returncode == 4
        and f"kept from an earlier run (--redo evaluates again): {tiny_shards.name}/val, {tiny_shards.name}/testB"
        in second.stdout
    )
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]

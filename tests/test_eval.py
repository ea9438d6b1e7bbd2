"""Evaluation by generation: the launcher on 1 process and on 2 CPU ranks agrees, and counts each
expression of the split exactly once."""

import json
import sys

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils

from test_train import ROOT, deepspeed_cmd, run
from ppcr.data.shards import load_manifest
from ppcr.eval.rescore import read_records, rescore


def test_eval_on_two_ranks_equals_one_process_and_counts_every_expression(tiny_shards, trained_run):
    run_dir = trained_run
    sets = f"eval.sets=[{{name: {tiny_shards.name}, split: val}}, {{name: {tiny_shards.name}, split: testB}}]"
    one = run([sys.executable, "launch/eval.py", "--checkpoint", str(run_dir), sets])
    assert one.returncode == 0, one.stderr[-3000:]
    rows_one = json.loads((run_dir / "eval/step_00000003/results.json").read_text())["rows"]
    cmd = deepspeed_cmd([])
    cmd[cmd.index(str(ROOT / "launch/train.py"))] = str(ROOT / "launch/eval.py")
    cmd = cmd[:cmd.index("--config")] + ["--checkpoint", str(run_dir), sets]
    two = run(cmd)
    assert two.returncode == 0, two.stderr[-3000:]
    rows_two = json.loads((run_dir / "eval/step_00000003/results.json").read_text())["rows"]
    timing = ("seconds", "expressions_per_s", "lm_forwards_per_expression")  # differ with the ranks' batches
    assert [{k: v for k, v in r.items() if k not in timing} for r in rows_one] == \
        [{k: v for k, v in r.items() if k not in timing} for r in rows_two]
    manifest = load_manifest(tiny_shards)
    whole = [r for r in rows_one if r["group"] == "all"]
    assert [r["count"] for r in whole] == [manifest["splits"]["val"]["expressions"],
                                           manifest["splits"]["testB"]["expressions"]]
    # each split's groups partition it, with the counts its manifest gives
    for split, row in zip(("val", "testB"), whole):
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

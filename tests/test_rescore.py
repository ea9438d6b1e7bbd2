"""ppcr-rescore: make eval's table back from the predictions files (splits, ablation rows, groups), bad records
named, and the A/B of two evaluations with its paired bootstrap."""

import json
import shutil

import numpy as np
import pytest

from ppcr.eval.rescore import (
    PREDICTIONS_VERSION,
    RecordError,
    compare,
    main,
    predictions_files,
    read_records,
    rescore,
    rescore_files,
)

ROW_KEYS = ("split", "ablation", "group")


def test_rescore_gives_make_evals_table_back(evaluated_run, capsys):
    eval_dir = evaluated_run / "eval/step_00000003"
    made = json.loads((eval_dir / "results.json").read_text())["rows"]
    files = predictions_files(evaluated_run)  # the run: its latest checkpoint's evaluation
    assert list(files) == ["synthetic_unc/val", "synthetic_unc/testB"]  # make eval's order
    rows = rescore_files(files, made)  # make eval lists a group without an expression among the 8, too
    assert [tuple(r[k] for k in ROW_KEYS) for r in rows] == [tuple(r[k] for k in ROW_KEYS) for r in made]
    assert len({r["ablation"] for r in rows}) == 5 and len({r["group"] for r in rows}) > 2  # ablations, groups
    for ours, theirs in zip(rows, made):
        for k, v in ours.items():
            if k not in ROW_KEYS:
                assert v == pytest.approx(theirs[k], abs=1e-6), (ours["split"], ours["ablation"], ours["group"], k)
    assert main([str(eval_dir)]) == 0
    out = capsys.readouterr().out
    assert "every figure equal within 1e-06" in out and "| synthetic_unc/testB" in out and "box=gt,sam=box+semsp" in out


def test_a_changed_figure_is_reported_and_a_bad_record_named(evaluated_run, tmp_path, capsys):
    eval_dir = tmp_path / "eval"
    shutil.copytree(evaluated_run / "eval/step_00000003", eval_dir)
    results = json.loads((eval_dir / "results.json").read_text())
    results["rows"][0]["cIoU"] += 0.01  # a table that is not what the predictions give
    (eval_dir / "results.json").write_text(json.dumps(results))
    assert main([str(eval_dir)]) == 1
    assert "synthetic_unc/val box=head,sam=box+semsp all cIoU:" in capsys.readouterr().out

    val = eval_dir / "predictions_synthetic_unc_val.jsonl"
    lines = val.read_text().splitlines()
    val.write_text("\n".join([lines[0], "{broken", *lines[1:]]) + "\n")
    assert main([str(val)]) == 2
    assert f"error: {val}:2: not a JSON record" in capsys.readouterr().err
    record = json.loads(lines[0])
    del record["pixels"]
    val.write_text(json.dumps(record) + "\n")
    assert main([str(val)]) == 2
    assert f"error: {val}:1: record has no 'pixels'" in capsys.readouterr().err
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "no predictions_<split>.jsonl" in capsys.readouterr().err


def records(pixels, groups=None, keys=None):
    """Records of one split as make eval writes them (the fields rescoring reads), one per (inter, union)."""
    return [
        {
            "key": (keys or {}).get(i, f"ref_{i // 2}"),
            "sentence": f"sentence {i % 2}" if not keys else "the one",
            "group": (groups or ["level 0"] * len(pixels))[i],
            "pixels": {"ppcr": list(p)},
            "box_iou": 0.0,
            "text_box_iou": None,
            "agreement": None,
            "spatial_answer": f"answer {i}",
        }
        for i, p in enumerate(pixels)
    ]


def test_a_predictions_file_of_another_format_is_refused_naming_it(tmp_path):
    path = tmp_path / "predictions_synthetic_unc_val.jsonl"
    lines = [{"format_version": PREDICTIONS_VERSION, **r} for r in records([(1, 2), (3, 4)])]
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    assert rescore(read_records(path), "synthetic_unc/val")[0]["cIoU"] == pytest.approx(4 / 6)
    for version in (None, PREDICTIONS_VERSION + 1):
        lines[1]["format_version"] = version
        path.write_text("".join(json.dumps(r) + "\n" for r in lines))
        with pytest.raises(RecordError) as e:
            read_records(path)
        assert str(e.value) == (
            f"{path}:2: format_version {version} is not {PREDICTIONS_VERSION}, predictions "
            "written by another ppcr: re-run make eval for their checkpoint"
        )


def test_compare_gives_the_paired_cIoU_difference_and_its_interval():
    rng = np.random.default_rng(3)
    unions = rng.integers(200, 400, 60)
    before = (unions * rng.uniform(0.3, 0.5, 60)).astype(int)
    groups = ["level 0"] * 30 + ["level 1"] * 30
    after = before.copy()
    after[30:] = np.minimum(unions[30:], before[30:] + 60)  # level 1 gains on every expression; level 0 unchanged
    a = records(zip(before.tolist(), unions.tolist()), groups)
    b = records(zip(after.tolist(), unions.tolist()), groups)
    result = compare(a, b, ablation="ppcr", resamples=500, seed=0, top=3)
    assert result["matched"] == 60 and result["only_a"] == result["only_b"] == 0
    diffs = {d.group: d for d in result["differences"]}
    ciou = {(r["split"], r["group"]): r["cIoU"] for r in rescore(a, "A") + rescore(b, "B")}
    assert diffs["all"].diff == pytest.approx(ciou[("B", "all")] - ciou[("A", "all")], abs=1e-12)
    assert diffs["level 1"].diff == pytest.approx(ciou[("B", "level 1")] - ciou[("A", "level 1")], abs=1e-12)
    assert 0 < diffs["all"].low <= diffs["all"].diff <= diffs["all"].high  # a gain on every changed expression
    assert diffs["level 0"].diff == diffs["level 0"].low == diffs["level 0"].high == 0
    again = compare(a, b, ablation="ppcr", resamples=500, seed=0, top=3)
    assert [(d.low, d.high) for d in again["differences"]] == [(d.low, d.high) for d in result["differences"]]
    other = compare(a, b, ablation="ppcr", resamples=500, seed=1, top=3)
    assert other["differences"][0].low != result["differences"][0].low  # the seed draws the resamples
    gains = (after - before) / unions
    assert [r["change"] for r in result["changed"]] == pytest.approx(sorted(gains, reverse=True)[:3])
    assert all(r["group"] == "level 1" for r in result["changed"])

    # noise without a trend: the interval holds 0
    noisy = np.clip(before + rng.integers(-40, 41, 60), 0, unions)
    c = records(zip(noisy.tolist(), unions.tolist()), groups)
    d = compare(a, c, ablation="ppcr", resamples=500, seed=0)["differences"][0]
    assert d.low < 0 < d.high


def test_compare_matches_by_key_and_sentence_and_counts_the_unmatched():
    a = records([(1, 10), (2, 10), (3, 10)], keys={0: "x", 1: "x", 2: "y"})  # "x" says "the one" twice
    b = records([(4, 10), (3, 10)], keys={0: "y", 1: "x"})
    result = compare(a, b, ablation="ppcr", resamples=50)
    assert result["matched"] == 2 and result["only_a"] == 1 and result["only_b"] == 0
    changed = {(r["key"], r["iou_a"], r["iou_b"]) for r in result["changed"]}
    assert changed == {("y", 0.3, 0.4), ("x", 0.1, 0.3)}  # the first "x" pairs with the first
    with pytest.raises(ValueError, match="has no ablation 'other'"):
        compare(a, b, ablation="other")


def test_compare_on_two_evaluations_prints_the_difference_per_split(evaluated_run, tmp_path, capsys):
    a = evaluated_run / "eval/step_00000003"
    b = tmp_path / "b"
    shutil.copytree(a, b)
    val = b / "predictions_synthetic_unc_val.jsonl"
    changed = []
    for line in val.read_text().splitlines():
        r = json.loads(line)
        inter, union = r["pixels"]["box=head,sam=box+semsp"]
        r["pixels"]["box=head,sam=box+semsp"] = [union, union]  # B got this one exactly right
        changed.append(json.dumps(r))
    val.write_text("\n".join(changed[:1] + [line for line in val.read_text().splitlines()[1:]]) + "\n")
    assert main(["--compare", str(a), str(b), "--top", "2", "--resamples", "200"]) == 0
    out = capsys.readouterr().out
    assert "### synthetic_unc/val: 8 expressions in both" in out and "### synthetic_unc/testB" in out
    assert "| group | count | cIoU A | cIoU B | B - A | bootstrap mean | 95% interval |" in out
    first = json.loads(changed[0])
    assert f"| {first['key']} | {first['sentence']} |" in out and "1.000 |" in out
    assert "No expression's IoU changed." in out  # testB is the same in both

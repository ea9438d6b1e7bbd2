"""Every metric of ``make eval`` recomputed from its predictions files, without the model.

A record (one line of ``predictions_<split>.jsonl``, written by :func:`ppcr.eval.evaluate.evaluate_batches`)
holds the parts each metric is built from: the mask's intersection and union with the target in pixels
per ablation, the head box's IoU with the ground truth, and the answer's box's IoU with the ground truth
and with the head's box. Adding them up through the same :class:`ppcr.eval.metrics.SegmentationMetrics`
gives the rows ``make eval`` printed, whole splits and expression groups alike.
"""

from __future__ import annotations

import json
from pathlib import Path

from ppcr.eval.metrics import SegmentationMetrics


def read_records(path: str | Path) -> list[dict]:
    """The records of one predictions file."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def rescore(records: list[dict], split: str) -> list[dict]:
    """Rows as ``make eval`` writes them (without its timings) for one split's ``records``: per ablation,
    the whole split (group "all"), then each group in sorted order."""
    if not records:
        return []
    ablations = list(records[0]["pixels"])
    groups = sorted({r["group"] for r in records})
    rows = []
    for ab in ablations:
        whole, by_group = SegmentationMetrics(), {g: SegmentationMetrics() for g in groups}
        for r in records:
            inter, union = r["pixels"][ab]
            parts = {k: r[k] for k in ("box_iou", "text_box_iou", "agreement")}
            whole.add(inter, union, **parts)
            by_group[r["group"]].add(inter, union, **parts)
        rows.append({"split": split, "ablation": ab, "group": "all", **whole.result()})
        rows += [{"split": split, "ablation": ab, "group": g, **m.result()} for g, m in by_group.items()]
    return rows

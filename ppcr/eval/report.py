"""The evaluation table, as papers print it (every metric in percent), with what helps to read it."""

from __future__ import annotations

from ppcr.eval.metrics import THRESHOLDS
from ppcr.model.predict import PPCR

COLUMNS = [
    "cIoU",
    "gIoU",
    *[f"Prec@{t}" for t in THRESHOLDS],
    "BoxAcc@0.5",
    "TextBoxAcc@0.5",
    "Agreement",
    "count",
    "missing",
]


NOT_EXCLUDED = "*"  # the flag of a split whose images training did not leave out


def table(rows: list[dict]) -> str:
    """Markdown, one line per split and ablation, then the PPCR row's expression groups under their split;
    counts as integers, throughput in expressions/s. A split with missing expressions (scored as misses) is
    flagged with '!', one whose images the checkpoint's training did not leave out (``excluded_from_training``
    false: it may have trained on them) with '*', explained under the table."""
    head = (
        f"| {'dataset/split':<28} | {'ablation':<24} | {'group':<10} | "
        + " | ".join(f"{c:>10}" for c in COLUMNS)
        + f" | {'expr/s':>7} |"
    )
    lines = [head, "|" + "|".join(["---"] * (len(COLUMNS) + 4)) + "|"]
    shown = [r for r in rows if r.get("group", "all") == "all" or r["ablation"] == PPCR.name]
    for r in shown:
        vals = [f"{r[c]:10d}" if c in ("count", "missing") else f"{100 * r[c]:10.2f}" for c in COLUMNS]
        flag = ("!" if r["missing"] else "") + (NOT_EXCLUDED if r.get("excluded_from_training") is False else "")
        speed = f"{r['expressions_per_s']:7.2f}" if "expressions_per_s" in r else f"{'':7}"
        lines.append(
            f"| {r['split'] + flag:<28} | {r['ablation']:<24} | {r.get('group', 'all'):<10} | "
            + " | ".join(vals)
            + f" | {speed} |"
        )
    if any(r.get("excluded_from_training") is False for r in rows):
        lines.append(
            f"\n{NOT_EXCLUDED} images of this split were not left out of the checkpoint's training "
            "(data.exclude_eval_images off, the split not in its eval.sets, or its shards missing then): "
            "the model may have trained on them"
        )
    return "\n".join(lines)

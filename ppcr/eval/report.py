"""The evaluation table, as papers print it (every metric in percent), with what helps to read it."""

from __future__ import annotations

from ppcr.eval.metrics import THRESHOLDS

COLUMNS = ["cIoU", "gIoU", *[f"Prec@{t}" for t in THRESHOLDS], "BoxAcc@0.5", "TextBoxAcc@0.5", "Agreement", "count",
           "missing"]


def table(rows: list[dict]) -> str:
    """Markdown, one line per split and ablation; counts as integers, throughput in expressions/s. A split
    with missing expressions (scored as misses) is flagged with '!'."""
    head = (f"| {'dataset/split':<28} | {'ablation':<24} | " + " | ".join(f"{c:>10}" for c in COLUMNS)
            + f" | {'expr/s':>7} |")
    lines = [head, "|" + "|".join(["---"] * (len(COLUMNS) + 3)) + "|"]
    for r in rows:
        vals = [f"{r[c]:10d}" if c in ("count", "missing") else f"{100 * r[c]:10.2f}" for c in COLUMNS]
        flag = "!" if r["missing"] else " "
        lines.append(f"| {r['split'] + flag:<28} | {r['ablation']:<24} | " + " | ".join(vals)
                     + f" | {r.get('expressions_per_s', 0.0):7.2f} |")
    return "\n".join(lines)

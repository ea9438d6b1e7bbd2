"""``ppcr-rescore``: every metric of ``make eval`` recomputed from its predictions files, without the model;
and an A/B of two evaluations, expression by expression.

    ppcr-rescore runs/default                                  # the latest checkpoint's make eval
    ppcr-rescore runs/default/eval/step_00001600 [more ...]    # an eval directory, or predictions_*.jsonl files
    ppcr-rescore --compare runs/a/eval/step_00001600 runs/b/eval/step_00001600 [--top 10] [--resamples 2000]

A record (one line of ``predictions_<split>.jsonl``, written by :func:`ppcr.eval.evaluate.evaluate_batches`;
its ``format_version`` must be :data:`PREDICTIONS_VERSION`, else it is refused) holds the
parts each metric is built from: the mask's intersection and union with the target in pixels per ablation,
the head box's IoU with the ground truth, and the answer's box's IoU with the ground truth and with the head's
box. Adding them up through the same :class:`ppcr.eval.metrics.SegmentationMetrics`
gives the rows ``make eval`` printed, whole splits, ablations and expression groups alike; beside a
``results.json`` the rescored table is checked against it (missing expressions, which have no record, are
taken from it).

``--compare A B`` matches the expressions of each split by ref key and sentence and reports, per split and
expression group, cIoU of A and B, their difference and its 95% interval from a paired bootstrap over
expressions (expressions resampled with replacement, both runs' pixel sums from the same draw; a seeded
numpy Generator): a difference whose interval holds 0 is one the split cannot tell from seed noise. Then
the expressions whose IoU changed most.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ppcr.common.checkpoint_paths import latest_tag
from ppcr.eval.metrics import SegmentationMetrics
from ppcr.eval.report import table
from ppcr.model.predict import PPCR

FIELDS = ("key", "sentence", "group", "pixels", "box_iou", "text_box_iou", "agreement")  # what rescoring reads
PREDICTIONS_VERSION = 1  # every record's "format_version", which ppcr.eval.evaluate writes and read_records checks
TOLERANCE = 1e-6


class RecordError(ValueError):
    """A predictions file that cannot be rescored; the message names the file, line and field."""


def read_records(path: str | Path) -> list[dict]:
    """The records of one predictions file; :class:`RecordError` names the file, line and field of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(f"predictions file not found: {path}")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise RecordError(f"{path}:{n}: not a JSON record ({e})") from e
        if not isinstance(r, dict):
            raise RecordError(f"{path}:{n}: not a JSON object")
        if r.get("format_version") != PREDICTIONS_VERSION:
            raise RecordError(
                f"{path}:{n}: format_version {r.get('format_version')} is not {PREDICTIONS_VERSION}, "
                "predictions written by another ppcr: re-run make eval for their checkpoint"
            )
        missing = [f for f in FIELDS if f not in r]
        if missing:
            raise RecordError(f"{path}:{n}: record has no {', '.join(repr(f) for f in missing)}")
        parts = r["pixels"].values() if isinstance(r["pixels"], dict) else [None]
        if not all(isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v) for v in parts):
            raise RecordError(f"{path}:{n}: 'pixels' must map each ablation to [intersection, union] in pixels")
        out.append(r)
    return out


def rescore(records: list[dict], split: str, *, missing: int = 0, groups: list[str] | None = None) -> list[dict]:
    """Rows as ``make eval`` writes them (without its timings) for one split's ``records``: per ablation,
    the whole split (group "all", with ``missing`` expressions scored as misses), then each group in sorted
    order: those of the records and ``groups`` (make eval lists every group of the split's manifest, also
    one without an expression scored, under eval.max_expressions)."""
    if not records:
        return []
    ablations = list(records[0]["pixels"])
    groups = sorted({r["group"] for r in records} | set(groups or []))
    rows = []
    for ab in ablations:
        whole, by_group = SegmentationMetrics(), {g: SegmentationMetrics() for g in groups}
        for r in records:
            inter, union = r["pixels"][ab]
            parts = {k: r[k] for k in ("box_iou", "text_box_iou", "agreement")}
            whole.add(inter, union, **parts)
            by_group[r["group"]].add(inter, union, **parts)
        if missing:
            whole.add_missing(missing)
        rows.append({"split": split, "ablation": ab, "group": "all", **whole.result()})
        rows += [{"split": split, "ablation": ab, "group": g, **m.result()} for g, m in by_group.items()]
    return rows


def split_name(path: Path) -> str:
    """``predictions_<set>_<split>.jsonl`` -> "<set>/<split>" (as make eval names it; a split has no '_')."""
    stem = path.stem.removeprefix("predictions_")
    name, _, split = stem.rpartition("_")
    if not path.stem.startswith("predictions_") or not name:
        raise RecordError(f"{path}: not a predictions file of make eval (predictions_<set>_<split>.jsonl)")
    return f"{name}/{split}"


def predictions_files(path: str | Path) -> dict[str, Path]:
    """Split name -> predictions file, in make eval's order where a results.json says it: for a run directory
    (its latest checkpoint's evaluation), an eval directory or an export (``eval/saved``), or one file."""
    path = Path(path)
    if path.is_file():
        return {split_name(path): path}
    if (path / "checkpoints").is_dir():
        tag = latest_tag(path / "checkpoints")
        if tag is None:
            raise RecordError(f"{path}/checkpoints has no complete checkpoint (no 'latest')")
        path = path / "eval" / tag
    elif (path / "eval" / "saved").is_dir():
        path = path / "eval" / "saved"
    files = {split_name(f): f for f in sorted(path.glob("predictions_*.jsonl"))} if path.is_dir() else {}
    if not files:
        raise RecordError(f"{path}: no predictions_<split>.jsonl (make eval writes them into <run>/eval/<tag>/)")
    order = [r["split"] for r in _results(path) or [] if r.get("group", "all") == "all"]
    return dict(sorted(files.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else len(order)))


def _results(eval_dir: Path) -> list[dict] | None:
    """The rows of make eval's results.json in ``eval_dir``, if there is one."""
    f = eval_dir / "results.json"
    if not f.is_file():
        return None
    try:
        return json.loads(f.read_text())["rows"]
    except (ValueError, KeyError) as e:
        raise RecordError(f"{f}: not make eval's results ({e})") from e


def rescore_files(files: dict[str, Path], results: list[dict] | None = None) -> list[dict]:
    """Every row of make eval from the predictions files. What has no record is taken from make eval's
    ``results`` where given: the expressions missing from the shards (scored as misses) and the groups of a
    split without an expression scored."""
    missing = {r["split"]: r["missing"] for r in results or [] if r.get("group", "all") == "all"}
    groups: dict[str, set] = {}
    for r in results or []:
        if r.get("group", "all") != "all":
            groups.setdefault(r["split"], set()).add(r["group"])
    return [
        row
        for split, f in files.items()
        for row in rescore(read_records(f), split, missing=missing.get(split, 0), groups=sorted(groups.get(split, ())))
    ]


def differences(rows: list[dict], results: list[dict]) -> list[str]:
    """Where rescored ``rows`` and make eval's ``results`` differ by more than :data:`TOLERANCE`, in words."""
    theirs = {(r["split"], r["ablation"], r.get("group", "all")): r for r in results}
    out = []
    if len(theirs) != len(rows):
        out.append(f"{len(rows)} rows rescored, {len(theirs)} in results.json")
    for r in rows:
        t = theirs.get((r["split"], r["ablation"], r["group"]))
        if t is None:
            out.append(f"{r['split']} {r['ablation']} {r['group']}: not in results.json")
            continue
        out += [
            f"{r['split']} {r['ablation']} {r['group']} {k}: {r[k]} rescored, {t.get(k)} in results.json"
            for k, v in r.items()
            if k not in ("split", "ablation", "group")
            and not (isinstance(t.get(k), (int, float)) and abs(v - t[k]) <= TOLERANCE)
        ]
    return out


# --------------------------------------------------------------------------------------------------
# A/B
# --------------------------------------------------------------------------------------------------


@dataclass
class Difference:
    """cIoU of A and B over the expressions both hold, B - A, and its paired bootstrap (mean, 95% interval)."""

    group: str
    count: int
    ciou_a: float
    ciou_b: float
    diff: float
    boot_mean: float
    low: float
    high: float


def _ciou(inter: np.ndarray, union: np.ndarray) -> np.ndarray:
    """cIoU over the last axis, 1 where nothing is in either (as SegmentationMetrics reports it)."""
    u = union.sum(-1)
    return np.where(u > 0, inter.sum(-1) / np.maximum(u, 1), 1.0)


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """``resamples`` draws of cIoU(B) - cIoU(A): each draw resamples the expressions with replacement, the
    same expressions for both. ``a`` and ``b``: (n, 2) intersection and union per expression."""
    n = len(a)
    chunk = max(1, 4_000_000 // max(n, 1))
    out = []
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        out.append(_ciou(b[idx, 0], b[idx, 1]) - _ciou(a[idx, 0], a[idx, 1]))
    return np.concatenate(out)


def _occurrences(records: list[dict]) -> dict[tuple, dict]:
    """Records by (key, sentence, occurrence): a sentence said twice of one ref pairs in order."""
    seen: Counter = Counter()
    out = {}
    for r in records:
        k = (r["key"], r["sentence"])
        out[(*k, seen[k])] = r
        seen[k] += 1
    return out


def compare(
    a: list[dict], b: list[dict], *, ablation: str, resamples: int = 2000, seed: int = 0, top: int = 10
) -> dict:
    """A/B of one split's records: the expressions both hold (by key and sentence), per group ("all" first) the
    cIoU :class:`Difference`, and the ``top`` expressions whose IoU changed most (largest |IoU B - IoU A|, those
    that changed at all)."""
    ka, kb = _occurrences(a), _occurrences(b)
    both = [k for k in ka if k in kb]
    for name, recs in (("A", a), ("B", b)):
        if recs and ablation not in recs[0]["pixels"]:
            raise RecordError(f"{name} has no ablation {ablation!r} (it has {', '.join(recs[0]['pixels'])})")
    rng = np.random.default_rng(seed)
    pa = np.array([ka[k]["pixels"][ablation] for k in both], dtype=np.int64).reshape(-1, 2)
    pb = np.array([kb[k]["pixels"][ablation] for k in both], dtype=np.int64).reshape(-1, 2)
    groups = np.array([ka[k]["group"] for k in both])
    diffs = []
    for g in ["all", *sorted(set(groups.tolist()))]:
        sel = np.ones(len(both), bool) if g == "all" else groups == g
        if not sel.any():
            continue
        ca, cb = float(_ciou(pa[sel, 0], pa[sel, 1])), float(_ciou(pb[sel, 0], pb[sel, 1]))
        boot = paired_bootstrap(pa[sel], pb[sel], resamples=resamples, rng=rng)
        low, high = np.percentile(boot, [2.5, 97.5])
        diffs.append(
            Difference(
                group=g,
                count=int(sel.sum()),
                ciou_a=ca,
                ciou_b=cb,
                diff=cb - ca,
                boot_mean=float(boot.mean()),
                low=float(low),
                high=float(high),
            )
        )

    def iou(p):
        return 1.0 if p[1] == 0 else p[0] / p[1]

    changed = sorted(
        ((iou(kb[k]["pixels"][ablation]) - iou(ka[k]["pixels"][ablation]), k) for k in both),
        key=lambda dk: (-abs(dk[0]), dk[1]),
    )
    changed = [(d, k) for d, k in changed if d != 0]
    rows = [
        {
            "key": k[0],
            "sentence": k[1],
            "group": ka[k]["group"],
            "iou_a": iou(ka[k]["pixels"][ablation]),
            "iou_b": iou(kb[k]["pixels"][ablation]),
            "change": d,
            "answer_a": ka[k].get("spatial_answer"),
            "answer_b": kb[k].get("spatial_answer"),
        }
        for d, k in changed[:top]
    ]
    return {
        "matched": len(both),
        "only_a": len(ka) - len(both),
        "only_b": len(kb) - len(both),
        "differences": diffs,
        "changed": rows,
    }


def compare_text(split: str, result: dict, *, resamples: int, seed: int) -> str:
    """One split's A/B as Markdown."""
    lines = [
        f"### {split}: {result['matched']} expressions in both (only in A: {result['only_a']}, only in B: "
        f"{result['only_b']})",
        "",
        f"cIoU in percent; B - A with its paired bootstrap over expressions ({resamples} resamples, seed {seed}): "
        "mean and 95% interval",
        "",
        "| group | count | cIoU A | cIoU B | B - A | bootstrap mean | 95% interval | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for d in result["differences"]:
        verdict = "holds 0: not told from noise" if d.low <= 0 <= d.high else ("B better" if d.low > 0 else "A better")
        lines.append(
            f"| {d.group} | {d.count} | {100 * d.ciou_a:.2f} | {100 * d.ciou_b:.2f} | {100 * d.diff:+.2f} | "
            f"{100 * d.boot_mean:+.2f} | [{100 * d.low:+.2f}, {100 * d.high:+.2f}] | {verdict} |"
        )
    if not result["changed"]:
        return "\n".join([*lines, "", "No expression's IoU changed."])
    lines += [
        "",
        "Expressions whose IoU changed most:",
        "",
        "| key | sentence | group | IoU A | IoU B | change | answer A | answer B |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(text) -> str:
        return str(text or "").replace("|", "\\|").replace("\n", " ")

    for r in result["changed"]:
        lines.append(
            f"| {cell(r['key'])} | {cell(r['sentence'])} | {cell(r['group'])} | {r['iou_a']:.3f} | "
            f"{r['iou_b']:.3f} | {r['change']:+.3f} | {cell(r['answer_a'])} | {cell(r['answer_b'])} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="ppcr-rescore", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("paths", nargs="*", help="run directories, eval directories or predictions_*.jsonl files")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two evaluations (run, eval directory or file)")
    p.add_argument("--ablation", default=PPCR.name, help=f"the row --compare compares (default {PPCR.name})")
    p.add_argument("--top", type=int, default=10, help="expressions listed per split by --compare")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of --compare")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap's numpy Generator")
    args = p.parse_args(argv)
    if bool(args.paths) == bool(args.compare):
        p.error("give predictions to rescore, or --compare A B")
    if args.resamples < 1 or args.top < 0:
        p.error("--resamples must be >= 1 and --top >= 0")
    try:
        if args.compare:
            return _compare(*args.compare, args=args)
        status = 0
        for path in args.paths:
            files = predictions_files(path)
            eval_dir = next(iter(files.values())).parent
            results = _results(eval_dir)
            rows = rescore_files(files, results)
            print(f"rescored {path}: {len(files)} split(s) from their predictions files")
            print(table(rows))
            if results is not None and not Path(path).is_file():
                diff = differences(rows, results)
                print(
                    f"against {eval_dir / 'results.json'}: "
                    + (
                        f"every figure equal within {TOLERANCE:g}"
                        if not diff
                        else f"{len(diff)} differ:\n" + "\n".join(f"  {d}" for d in diff[:20])
                    )
                )
                status = status or (1 if diff else 0)
        return status
    except RecordError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _compare(a: str, b: str, *, args: argparse.Namespace) -> int:
    fa, fb = predictions_files(a), predictions_files(b)
    common = [s for s in fa if s in fb]
    if not common:
        raise RecordError(f"{a} ({', '.join(fa)}) and {b} ({', '.join(fb)}) share no split")
    print(
        f"A: {a}\nB: {b}\nablation {args.ablation}"
        + "".join(
            f"\n(only in {n}: {', '.join(s for s in f if s not in common)})"
            for n, f in (("A", fa), ("B", fb))
            if any(s not in common for s in f)
        )
    )
    for split in common:
        result = compare(
            read_records(fa[split]),
            read_records(fb[split]),
            ablation=args.ablation,
            resamples=args.resamples,
            seed=args.seed,
            top=args.top,
        )
        print()
        print(compare_text(split, result, resamples=args.resamples, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())

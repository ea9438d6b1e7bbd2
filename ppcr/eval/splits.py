"""Every split of ``eval.sets`` evaluated in turn, with its expression count checked against the source.

A split's shards may hold fewer expressions than the REFER file it was built from: refs rejected at
build time, samples skipped as unreadable at load time. Published numbers count every expression, so
a missing one either stops the evaluation (``eval.on_missing: fail``, the default) or is scored as a
miss and flagged in the table (``eval.on_missing: score_zero``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ppcr.common.distributed import DistInfo
from ppcr.config import Config, ShardSetConfig
from ppcr.data.counts import expected_expressions
from ppcr.eval.evaluate import (SplitResult, evaluate_batches, filler_item, forwards_per_expression, groups_of,
                                split_batches, split_size)
from ppcr.model.predict import Ablation


class MissingExpressions(RuntimeError):
    pass


@dataclass
class EvalRun:
    rows: list[dict] = field(default_factory=list)  # per split and ablation: the whole split (group "all"), then each group
    shown: list = field(default_factory=list)  # (item, prediction) pairs for the picture
    records: dict[str, list[dict]] = field(default_factory=dict)  # per split: this rank's expressions


def expected_count(cfg: Config, spec: ShardSetConfig) -> tuple[int, int]:
    """(expressions in the source REFER split, expressions the shards hold); raises
    :class:`MissingExpressions` under ``eval.on_missing: fail`` when the shards hold fewer."""
    count = expected_expressions(Path(cfg.paths.shards_root) / spec.name, spec.split)
    if count.source != count.written and cfg.eval.on_missing == "fail":
        raise MissingExpressions(
            f"{spec.name}/{spec.split}: the shards hold {count.written} of the source's {count.source} expressions "
            f"({count.rejected} in refs rejected at build, see {spec.name}/rejected.jsonl); published numbers count "
            "every one. Fix the data, or score the missing ones as misses with eval.on_missing=score_zero")
    return count.source, count.written


def evaluate_splits(model, cfg: Config, dist: DistInfo, *, synced: bool, ablations: list[Ablation],
                    records: bool = True, keep: int = 2) -> EvalRun:
    run = EvalRun()
    limit = cfg.eval.max_expressions
    for spec in cfg.eval.sets:
        name = f"{spec.name}/{spec.split}"
        source, _ = expected_count(cfg, spec) if limit is None else (None, None)
        start = time.perf_counter()
        batches = split_batches(cfg, spec, dist, batch_size=cfg.eval.batch_size, limit=limit)
        with tqdm(total=split_size(cfg, spec, limit), disable=not dist.is_main, desc=f"eval {name}", unit="expr",
                  dynamic_ncols=True) as bar:
            result: SplitResult = evaluate_batches(model, batches, filler=filler_item(cfg, spec), dist=dist,
                                                   synced=synced, groups=groups_of(cfg, spec), ablations=ablations,
                                                   keep=keep, records=records, progress=bar)
        seconds = time.perf_counter() - start
        forwards = forwards_per_expression(result)
        for ab in ablations:
            metrics = result.metrics[ab.name]
            scored = metrics.result()["count"]
            if source is not None and scored < source:
                if cfg.eval.on_missing == "fail":
                    raise MissingExpressions(f"{name}: {source - scored} of {source} expressions could not be read "
                                             "(see the warnings above); eval.on_missing=score_zero scores them as misses")
                metrics.add_missing(source - scored)
            run.rows.append({"split": name, "ablation": ab.name, "group": "all", **metrics.result(), "seconds": seconds,
                             "expressions_per_s": scored / seconds if seconds else 0.0,
                             "lm_forwards_per_expression": forwards})
            run.rows += [{"split": name, "ablation": ab.name, "group": g, **m.result()}
                         for g, m in result.groups[ab.name].items()]
        run.shown += result.shown
        run.records[name] = result.records
    return run

"""Every split of ``eval.sets`` evaluated in turn, with its expression count checked against the source.

A split's shards may hold fewer expressions than the REFER file it was built from: refs rejected at
build time, samples skipped as unreadable at load time. Published numbers count every expression, so
a missing one either fails that split (``eval.on_missing: fail``, the default) or is scored as a miss
and flagged in the table (``eval.on_missing: score_zero``).

Nothing done is lost to one bad split: every split's counts are checked before the first forward, the
splits come one by one as they are done (``launch/eval.py`` writes each at once), and a split that fails
is an outcome with its error while the others are still scored.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

from ppcr.common.distributed import DistInfo
from ppcr.config import Config, ShardSetConfig
from ppcr.data.counts import expected_expressions
from ppcr.data.shards import split_shards
from ppcr.eval.evaluate import (
    SplitResult,
    evaluate_batches,
    filler_item,
    forwards_per_expression,
    groups_of,
    split_batches,
    split_size,
)
from ppcr.model.predict import Ablation


class MissingExpressions(RuntimeError):
    pass


# What makes one split fail while the others are still scored: its manifest or counts (checked before the
# first forward, the same on every rank) or its unreadable expressions (known once the split's metrics are
# reduced, so again the same on every rank). Anything else (a device error) ends the evaluation.
SPLIT_ERRORS = (MissingExpressions, ValueError, FileNotFoundError)


@dataclass
class SplitOutcome:
    """One split evaluated: its rows (per ablation, whole split then each expression group), a few
    (item, prediction) pairs to show and this rank's per-expression records; or the error that stopped it."""

    name: str  # "name/split"
    rows: list[dict] = field(default_factory=list)
    shown: list = field(default_factory=list)
    records: list[dict] = field(default_factory=list)
    error: str | None = None


def split_name(spec: ShardSetConfig) -> str:
    return f"{spec.name}/{spec.split}"


def expected_count(cfg: Config, spec: ShardSetConfig) -> tuple[int, int]:
    """(expressions in the source REFER split, expressions the shards hold); raises
    :class:`MissingExpressions` under ``eval.on_missing: fail`` when the shards hold fewer."""
    count = expected_expressions(Path(cfg.paths.shards_root) / spec.name, spec.split)
    if count.source != count.written and cfg.eval.on_missing == "fail":
        raise MissingExpressions(
            f"{spec.name}/{spec.split}: the shards hold {count.written} of the source's {count.source} expressions "
            f"({count.rejected} in refs rejected at build, see {spec.name}/rejected.jsonl); published numbers count "
            "every one. Fix the data, or score the missing ones as misses with eval.on_missing=score_zero"
        )
    return count.source, count.written


def check_splits(cfg: Config) -> dict[str, int | None | Exception]:
    """Every split of ``eval.sets`` checked before the first forward: its shards exist and its counts agree with
    the source (:func:`expected_count`). Per split name: the source's expression count to score against (None
    under ``eval.max_expressions``, a partial evaluation), or the :data:`SPLIT_ERRORS` error that rules it out."""
    out: dict[str, int | None | Exception] = {}
    for spec in cfg.eval.sets:
        try:
            split_shards(Path(cfg.paths.shards_root) / spec.name, spec.split)
            if cfg.eval.max_expressions is None:
                out[split_name(spec)] = expected_count(cfg, spec)[0]
            else:  # the counts must still be readable; a partial evaluation is not compared with them
                expected_expressions(Path(cfg.paths.shards_root) / spec.name, spec.split)
                out[split_name(spec)] = None
        except SPLIT_ERRORS as e:
            out[split_name(spec)] = e
    return out


def evaluate_split(
    model,
    cfg: Config,
    spec: ShardSetConfig,
    dist: DistInfo,
    *,
    source: int | None,
    synced: bool,
    ablations: list[Ablation],
    records: bool = True,
    keep: int = 2,
) -> SplitOutcome:
    """One split by generation, scored against ``source`` expressions (:func:`check_splits`; None: what the
    shards hold, up to ``eval.max_expressions``). Raises :class:`MissingExpressions` when expressions could not
    be read under ``eval.on_missing: fail`` (every rank alike: the count is reduced)."""
    name, limit = split_name(spec), cfg.eval.max_expressions
    start = time.perf_counter()
    batches = split_batches(cfg, spec, dist, batch_size=cfg.eval.batch_size, limit=limit)
    with tqdm(
        total=split_size(cfg, spec, limit),
        disable=not dist.is_main,
        desc=f"eval {name}",
        unit="expr",
        dynamic_ncols=True,
    ) as bar:
        result: SplitResult = evaluate_batches(
            model,
            batches,
            filler=filler_item(cfg, spec),
            dist=dist,
            synced=synced,
            groups=groups_of(cfg, spec),
            ablations=ablations,
            keep=keep,
            records=records,
            progress=bar,
        )
    seconds = time.perf_counter() - start
    forwards = forwards_per_expression(result)
    out = SplitOutcome(name, shown=result.shown, records=result.records)
    for ab in ablations:
        metrics = result.metrics[ab.name]
        scored = metrics.result()["count"]
        if source is not None and scored < source:
            if cfg.eval.on_missing == "fail":
                raise MissingExpressions(
                    f"{name}: {source - scored} of {source} expressions could not be read "
                    "(see the warnings above); eval.on_missing=score_zero scores them as misses"
                )
            metrics.add_missing(source - scored)
        out.rows.append(
            {
                "split": name,
                "ablation": ab.name,
                "group": "all",
                **metrics.result(),
                "seconds": seconds,
                "expressions_per_s": scored / seconds if seconds else 0.0,
                "lm_forwards_per_expression": forwards,
            }
        )
        out.rows += [
            {"split": name, "ablation": ab.name, "group": g, **m.result()} for g, m in result.groups[ab.name].items()
        ]
    return out


def evaluate_splits(
    model,
    cfg: Config,
    dist: DistInfo,
    *,
    synced: bool,
    ablations: list[Ablation],
    records: bool = True,
    keep: int = 2,
    skip: frozenset[str] = frozenset(),
) -> Iterator[SplitOutcome]:
    """Every split of ``eval.sets`` not in ``skip``, in order, each as soon as it is done. Every split's counts
    are checked before the first forward (:func:`check_splits`); a split that fails (there, or with unreadable
    expressions) comes as an outcome with its ``error``, and the others are still evaluated."""
    checked = check_splits(cfg)
    for spec in cfg.eval.sets:
        name = split_name(spec)
        if name in skip:
            continue
        if isinstance(checked[name], Exception):
            yield SplitOutcome(name, error=str(checked[name]))
            continue
        try:
            yield evaluate_split(
                model,
                cfg,
                spec,
                dist,
                source=checked[name],
                synced=synced,
                ablations=ablations,
                records=records,
                keep=keep,
            )
        except MissingExpressions as e:
            yield SplitOutcome(name, error=str(e))

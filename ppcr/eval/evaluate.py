"""Evaluation of a split by generation (never teacher-forced), streamed in batches and spread over
ranks without padding the counts: every expression is predicted on exactly one rank.

Under ZeRO-3 (``synced``) every forward gathers parameters collectively, so ranks run the same
forwards: before each batch they agree whether any rank still has one, and a rank that has run out
runs a one-expression filler batch whose results it throws away; inside a batch they agree at every
decoding step (:mod:`ppcr.model.generation`).

The ablations share one generation per batch and differ only in SAM's prompts
(:mod:`ppcr.model.predict`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from pycocotools import mask as mask_utils
from tqdm import tqdm

from ppcr.common.distributed import DistInfo, all_ranks_done, all_reduce_sum, device
from ppcr.config import Config, ShardSetConfig
from ppcr.data.shards import split_groups, split_shards
from ppcr.data.stream import EvalStream, ShardSet
from ppcr.data.transforms import Preprocessor, box_pair_iou
from ppcr.eval.metrics import SegmentationMetrics, mask_iou_parts
from ppcr.eval.rescore import PREDICTIONS_VERSION
from ppcr.model.predict import PPCR, Ablation, predict_items


def batch_items(batch: dict) -> list[dict]:
    """A collated loader batch back into one dict per expression."""
    out = []
    for i in range(len(batch["expressions"])):
        out.append(
            {
                "sam_image": batch["sam_images"][i],
                "mllm_image": batch["mllm_images"][i],
                "input_size": tuple(batch["input_sizes"][i].tolist()),
                "original_size": tuple(batch["original_sizes"][i].tolist()),
                "mask": batch["masks"][i],
                "box": batch["boxes"][i],
                "expression": batch["expressions"][i],
                "group": batch["groups"][i],
                "category": batch["categories"][i],
                "key": batch["keys"][i],
                "ref_id": batch["ref_ids"][i],
                "dataset": batch["datasets"][i],
            }
        )
    return out


def split_batches(
    cfg: Config, spec: ShardSetConfig, dist: DistInfo, *, batch_size: int, limit: int | None = None
) -> Iterator[list[dict]]:
    """This rank's share of a split, streamed, in batches of ``batch_size`` expressions; ``limit`` caps
    the total over ranks."""
    pre = Preprocessor.from_config(cfg.model)
    share = None
    if limit is not None:
        share = limit // dist.world_size + (1 if dist.rank < limit % dist.world_size else 0)
    given = 0
    for b in EvalStream(ShardSet.open(cfg.paths.shards_root, spec), pre, batch_size, dist.rank, dist.world_size):
        items = batch_items(b)
        if share is not None:
            items = items[: share - given]
        if not items:
            return
        given += len(items)
        yield items


def groups_of(cfg: Config, spec: ShardSetConfig) -> list[str]:
    """The expression groups of a split (``ppcr.data.refer.expression_group``), from its manifest: the same
    list, in the same order, on every rank."""
    return split_groups(Path(cfg.paths.shards_root) / spec.name, spec.split)


def split_size(cfg: Config, spec: ShardSetConfig, limit: int | None = None) -> int:
    """Expressions in a split's shards (the manifest's count), capped at ``limit``."""
    n = sum(s["expressions"] for s in split_shards(Path(cfg.paths.shards_root) / spec.name, spec.split))
    return n if limit is None else min(n, limit)


def filler_item(cfg: Config, spec: ShardSetConfig) -> dict:
    """An expression any rank can run (and discard) to keep in step when its own share has run out."""
    one = DistInfo(rank=0, world_size=1, local_rank=0, node_rank=0)
    return next(split_batches(cfg, spec, one, batch_size=1, limit=1))[0]


def mask_rle(mask: torch.Tensor) -> dict:
    """COCO run-length encoding of a boolean (H, W) mask, JSON-ready."""
    rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


@dataclass
class SplitResult:
    """Metrics per ablation and per ablation and expression group (reduced over ranks), language-model
    forwards and expressions (this rank), a few (item, prediction) pairs of the PPCR row to show, and this
    rank's per-expression records."""

    metrics: dict[str, SegmentationMetrics]  # per ablation name, reduced over ranks
    groups: dict[str, dict[str, SegmentationMetrics]] = field(default_factory=dict)  # ablation -> group -> metrics
    forwards: int = 0
    expressions: int = 0
    shown: list = field(default_factory=list)
    records: list[dict] = field(default_factory=list)


@torch.no_grad()
def evaluate_batches(
    model,
    batches: Iterable[list[dict]],
    *,
    filler: dict,
    dist: DistInfo,
    synced: bool,
    groups: list[str],
    ablations: list[Ablation] | tuple[Ablation, ...] = (PPCR,),
    keep: int = 0,
    records: bool = False,
    progress: tqdm | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> SplitResult | None:
    """Metrics over every rank's ``batches``, whole and per expression group (``groups``: the split's, the
    same on every rank). ``records``: one JSON-ready dict per expression (answers, boxes, the parts of every
    metric, the PPCR mask as COCO RLE). ``should_stop`` (collective, all ranks agree) is asked before each
    batch; when it says stop, returns None."""
    was_training = model.training
    model.eval()
    metrics = {ab: SegmentationMetrics() for ab in ablations}
    by_group = {ab: {g: SegmentationMetrics() for g in groups} for ab in ablations}
    out = SplitResult(metrics={})
    agree = all_ranks_done if synced else None
    it = iter(batches)
    try:
        while True:
            if should_stop is not None and should_stop():
                return None
            items = next(it, None)
            if all_ranks_done(items is None) if synced else items is None:
                break
            real = items is not None
            items = items if real else [filler]
            preds, gen = predict_items(model, items, [x["expression"] for x in items], agree=agree, ablations=ablations)
            if not real:
                continue
            out.forwards += gen.forwards
            out.expressions += len(items)
            boxes = [box_parts(p, x) for p, x in zip(preds[0], items)]  # the boxes do not depend on the ablation
            pixels = {
                ab: [mask_iou_parts(p.mask, x["mask"] > 0) for p, x in zip(rows, items)]
                for ab, rows in zip(ablations, preds)
            }
            for ab in ablations:
                for x, (inter, union), b in zip(items, pixels[ab], boxes):
                    if x["group"] not in by_group[ab]:
                        raise ValueError(
                            f"expression group {x['group']!r} of {x['key']} is not among the split's "
                            f"groups {groups} (its manifest): rebuild the shards"
                        )
                    metrics[ab].add(inter, union, **b)
                    by_group[ab][x["group"]].add(inter, union, **b)
            main = preds[list(ablations).index(PPCR)] if PPCR in ablations else preds[0]
            for x, p in zip(items, main):
                if len(out.shown) < keep:
                    out.shown.append((x, p))
            if records:
                for i, (x, p) in enumerate(zip(items, main)):
                    out.records.append(
                        {
                            "format_version": PREDICTIONS_VERSION,
                            "dataset": x["dataset"],
                            "ref_id": x["ref_id"],
                            "key": x["key"],
                            "sentence": x["expression"],
                            "group": x["group"],
                            "semantic_answer": p.semantic_answer,
                            "spatial_answer": p.spatial_answer,
                            "box": [round(v, 5) for v in p.box.tolist()],
                            "text_box": None if p.text_box is None else [round(v, 5) for v in p.text_box.tolist()],
                            "gt_box": [round(v, 5) for v in x["box"].tolist()],
                            **boxes[i],
                            "iou": {ab.name: round(_iou(*pixels[ab][i]), 5) for ab in ablations},
                            "pixels": {ab.name: list(pixels[ab][i]) for ab in ablations},
                            "mask": mask_rle(p.mask),
                        }
                    )
            if progress is not None:
                progress.update(len(items) * dist.world_size)
    finally:
        model.train(was_training)
    out.metrics = {ab.name: metrics[ab].reduce() for ab in ablations}
    out.groups = {ab.name: {g: m.reduce() for g, m in by_group[ab].items()} for ab in ablations}
    return out


def _iou(inter: int, union: int) -> float:
    return 1.0 if union == 0 else inter / union


def box_parts(pred, item: dict) -> dict[str, float | None]:
    """The box figures of one prediction, as :meth:`SegmentationMetrics.add` takes them and a predictions
    record stores them (full precision, so that rescoring gives the same hits): the head box's IoU with
    the ground truth, and the answer's box's IoU with the ground truth and with the head's box."""
    text = pred.text_box
    return {
        "box_iou": box_pair_iou(pred.box, item["box"]),
        "text_box_iou": None if text is None else box_pair_iou(text, item["box"]),
        "agreement": None if text is None else box_pair_iou(text, pred.box),
    }


def forwards_per_expression(result: SplitResult) -> float:
    """Language-model forwards per expression, over all ranks."""
    sums = all_reduce_sum(torch.tensor([result.forwards, result.expressions], dtype=torch.float64, device=device()))
    return float(sums[0] / sums[1]) if sums[1] else 0.0


def write_records(records: list[dict], out: Path, dist: DistInfo) -> None:
    """This rank's records to ``out``.rank<R> (the caller merges them once every rank is done)."""
    with open(f"{out}.rank{dist.rank}", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def merge_records(out: Path, world_size: int) -> int:
    """Concatenate the ranks' record files into ``out``; returns the number of records."""
    n = 0
    with open(out, "w") as f:
        for rank in range(world_size):
            part = Path(f"{out}.rank{rank}")
            for line in part.read_text().splitlines():
                f.write(line + "\n")
                n += 1
            part.unlink()
    return n

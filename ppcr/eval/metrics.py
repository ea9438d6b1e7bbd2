"""Referring segmentation metrics, per dataset split, as papers report them.

- cIoU (overall IoU): sum of intersections / sum of unions over all expressions;
- gIoU (mean IoU): mean over expressions of I / U, where an empty prediction of an empty target
  scores 1;
- Prec@X: share of expressions whose mask IoU is at least X, for X in 0.5 ... 0.9;
- Box Acc@0.5: share of predicted boxes with IoU at least 0.5 against the ground-truth box;
- TextBoxAcc@0.5: the same for the box written in the spatial answer (no box written: a miss), and
  Agreement: the mean IoU between the head's box and the written one, over answers that hold one.

One comparison rule for every threshold, masks and boxes alike: a hit is IoU >= X (as LAVT's and
MDETR's evaluation code count them; an IoU exactly at X is rare in practice and counts).

An expression of the split that could not be evaluated (its ref rejected when the shards were built,
or its sample unreadable) can be scored as a miss (:meth:`SegmentationMetrics.add_missing`): IoU 0
for gIoU and Prec@X, no box hit, and counted under ``missing``; cIoU leaves it out, as its target's
pixels are unknown.

Counts and pixel sums are int64 and are summed over ranks, so each expression counts once whatever
the number of ranks.
"""

from __future__ import annotations

import torch

from ppcr.common.distributed import all_reduce_sum, device
from ppcr.data.transforms import box_pair_iou

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def mask_iou_parts(pred: torch.Tensor, target: torch.Tensor) -> tuple[int, int]:
    """Intersection and union pixel counts of two boolean masks of the same size."""
    if pred.shape != target.shape:
        raise ValueError(f"mask sizes differ: prediction {tuple(pred.shape)}, target {tuple(target.shape)}")
    pred, target = pred.bool(), target.bool()
    return int((pred & target).sum()), int((pred | target).sum())


class SegmentationMetrics:
    """Accumulates one split's expressions; :meth:`reduce` sums over ranks, :meth:`result` reports."""

    def __init__(self) -> None:
        # count, sum I, sum U, sum of per-expression IoU (x 1e6, integer), Prec@X hits, box hits,
        # text box hits, answers with a text box, sum of head/text IoU (x 1e6), missing expressions
        self.ints = torch.zeros(4 + len(THRESHOLDS) + 5, dtype=torch.int64)

    def update(
        self,
        pred_mask: torch.Tensor,
        target_mask: torch.Tensor,
        pred_box: torch.Tensor | None = None,
        target_box: torch.Tensor | None = None,
        text_box: torch.Tensor | None = None,
    ) -> float:
        """Add one expression; boxes are normalised (cx, cy, w, h). Returns its IoU."""
        inter, union = mask_iou_parts(pred_mask, target_mask)
        box_iou = box_pair_iou(pred_box, target_box) if pred_box is not None and target_box is not None else None
        text_iou = agreement = None
        if text_box is not None:
            text_iou = box_pair_iou(text_box, target_box) if target_box is not None else 0.0
            agreement = box_pair_iou(text_box, pred_box) if pred_box is not None else 0.0
        return self.add(inter, union, box_iou=box_iou, text_box_iou=text_iou, agreement=agreement)

    def add(
        self,
        inter: int,
        union: int,
        *,
        box_iou: float | None = None,
        text_box_iou: float | None = None,
        agreement: float | None = None,
    ) -> float:
        """Add one expression from its parts: mask intersection and union in pixels, the head box's IoU with
        the ground truth, and, when the answer wrote a box, that box's IoU with the ground truth and with
        the head's box (``agreement``). What a predictions file records, so rescoring it (ppcr.eval.rescore)
        gives the same figures. Returns the mask IoU."""
        iou = 1.0 if union == 0 else inter / union
        row = [1, inter, union, round(iou * 1_000_000)] + [int(iou >= t) for t in THRESHOLDS]
        box_hit = int(box_iou is not None and box_iou >= 0.5)
        text_hit = int(text_box_iou is not None and text_box_iou >= 0.5)
        agree = round(agreement * 1_000_000) if agreement is not None else 0
        self.ints += torch.tensor(row + [box_hit, text_hit, int(text_box_iou is not None), agree, 0], dtype=torch.int64)
        return iou

    def add_missing(self, n: int) -> None:
        """Score ``n`` expressions that could not be evaluated as misses (see the module docstring)."""
        self.ints[0] += n
        self.ints[-1] += n

    def reduce(self) -> SegmentationMetrics:
        self.ints = all_reduce_sum(self.ints.to(device())).cpu()
        return self

    def result(self) -> dict[str, float]:
        n, inter, union, iou_sum = (int(v) for v in self.ints[:4])
        out = {"count": n, "cIoU": inter / union if union else 1.0, "gIoU": iou_sum / 1_000_000 / n if n else 0.0}
        for i, t in enumerate(THRESHOLDS):
            out[f"Prec@{t}"] = int(self.ints[4 + i]) / n if n else 0.0
        box_hits, text_hits, with_text, agreement, missing = (int(v) for v in self.ints[-5:])
        out["BoxAcc@0.5"] = box_hits / n if n else 0.0
        out["TextBoxAcc@0.5"] = text_hits / n if n else 0.0
        out["Agreement"] = agreement / 1_000_000 / with_text if with_text else 0.0
        out["missing"] = missing
        return out

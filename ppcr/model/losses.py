"""PPCR's per-stage losses: text cross-entropy, box L1 + GIoU (and the pointer head's per-token terms,
:func:`ppcr.model.pointer.pointer_losses`), mask BCE + Dice."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torchvision.ops import box_convert, generalized_box_iou_loss

from ppcr.config import LossWeights
from ppcr.data.transforms import frame_region

TERMS = ("ce_sem", "ce_spa", "l1", "giou", "point", "token_l1", "token_giou", "bce", "dice")


def text_ce(hidden: torch.Tensor, stage, logits: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Next-token cross-entropy over a stage's labelled (answer) tokens, mean over them. ``hidden``
    (B, L, H) last-layer states; ``logits`` maps (N, H) to (N, V) and runs only at the N positions that
    predict a label (``stage.target_index``, found on the host): the full (B, L, V) logits would be
    mostly thrown away, and at a 150k vocabulary they are the largest activation of the step."""
    h = hidden.flatten(0, 1).index_select(0, stage.target_index)  # (N, H)
    return F.cross_entropy(logits(h).float(), stage.targets)


def box_losses(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """L1 on normalised (cx, cy, w, h) and GIoU on the corner form; both (B, 4), means over B."""
    l1 = F.l1_loss(pred, target)
    giou = generalized_box_iou_loss(
        box_convert(pred, "cxcywh", "xyxy"), box_convert(target, "cxcywh", "xyxy"), reduction="mean"
    )
    return l1, giou


def mask_losses(
    low: torch.Tensor, targets: torch.Tensor, input_sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel BCE and Dice of low-resolution logits (B, S/4, S/4) against masks (B, S, S) in SAM's
    input frame, over each image's own region (its padding excluded); each averaged per mask, then
    over the masks. ``input_sizes`` (B, 2) holds each image's h, w inside the frame."""
    size = targets.shape[-1]
    x = F.interpolate(low[:, None].float(), (size, size), mode="bilinear", align_corners=False)[:, 0]
    valid = frame_region(input_sizes, size).float()  # (B, S, S)
    t = targets.float() * valid
    pixels = valid.sum((1, 2))
    bce = (F.binary_cross_entropy_with_logits(x, t, reduction="none") * valid).sum((1, 2)) / pixels
    p = x.sigmoid() * valid
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    return bce.mean(), dice.mean()


def total_loss(terms: dict[str, torch.Tensor], w: LossWeights) -> torch.Tensor:
    """The weighted sum (:class:`ppcr.config.LossWeights`); the per-token box terms take the box weights,
    scaled by ``w_token_box``."""
    return (
        w.w_ce_sem * terms["ce_sem"]
        + w.w_ce_spa * terms["ce_spa"]
        + w.w_l1 * terms["l1"]
        + w.w_giou * terms["giou"]
        + w.w_point * terms["point"]
        + w.w_token_box * (w.w_l1 * terms["token_l1"] + w.w_giou * terms["token_giou"])
        + w.w_bce * terms["bce"]
        + w.w_dice * terms["dice"]
    )

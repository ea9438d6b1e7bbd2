"""Pretraining the tiny MLLM's vision tower (and its projector) with dense targets per image token.

Real MLLMs start from vision towers that already see (CLIP, SigLIP, Qwen's ViT were trained on
billions of images). A tiny random tower cannot learn to see from a referring loss alone: measured
here, neither the whole tiny MLLM nor the tower with a small probe regressed the box of "the red
circle" in 2,000 steps (held-out IoU stayed at the mean box's 0.07). So, as a stand-in for that
pretraining, every image token of a synthetic scene learns what covers it: the colour, shape and
size of the object (or "none"), and that object's box in image coordinates (which needs the
tower's absolute position embeddings). Per object, the mean of its tokens also learns the shape,
which an interior token alone cannot see. The classifiers are thrown away after pretraining; the
tower's features are what the language model later reads, and the per-token box head is kept
(``ppcr-pretrain`` saves it beside the MLLM) to seed PPCR's pointer box head, which reads the box of
the image tokens it selects (``ppcr.model.pointer``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss

from ppcr.model.mllm import Family
from ppcr.pretrain.scenes import COLOURS, SHAPES, SIZES, PretrainScene

MIN_COVER = 0.1  # share of a token's cell an object must cover to own it


def token_grid(family: Family, image_size: int) -> tuple[int, int]:
    """(cell side in input pixels, tokens per side) of the MLLM's image tokens."""
    vision = family.config.vision_config
    if family.config.model_type == "llava":
        cell = vision.patch_size
    else:
        cell = vision.patch_size * vision.spatial_merge_size
    if image_size % cell:
        raise ValueError(f"model.mllm_image_size {image_size} is not a multiple of the image token's {cell} px")
    return cell, image_size // cell


def dense_targets(scene: PretrainScene, mllm_image: torch.Tensor, cell: int) -> dict[str, torch.Tensor]:
    """Per token (raster order) of the (3, S, S) MLLM image: owner (0 none, k + 1 object k), colour,
    shape and size classes (the last class of each is "none") and the owner's box (x1, y1, x2, y2 in
    [0, 1])."""
    size = mllm_image.shape[-1]
    g = size // cell
    masks = torch.stack([torch.from_numpy(o.mask) for o in scene.objects])  # (n, H, W)
    h, w = masks.shape[-2:]
    small = TF.resize(masks, [size, size], interpolation=TF.InterpolationMode.NEAREST_EXACT).float()
    cover = F.avg_pool2d(small[None], cell)[0].flatten(1)  # (n, g*g)
    best, owner = cover.max(0)
    owner = torch.where(best >= MIN_COVER, owner + 1, torch.zeros_like(owner))  # (g*g,)
    table = torch.tensor([[o.colour, o.shape, o.size] for o in scene.objects])
    none = torch.tensor([len(COLOURS), len(SHAPES), len(SIZES)])
    classes = torch.where((owner > 0)[:, None], table[(owner - 1).clamp(min=0)], none)
    boxes = torch.tensor([o.box for o in scene.objects], dtype=torch.float32) / torch.tensor([w, h, w, h])
    return {
        "owner": owner,
        "colour": classes[:, 0],
        "shape": classes[:, 1],
        "size": classes[:, 2],
        "box": boxes[(owner - 1).clamp(min=0)] * (owner > 0)[:, None],
        "cells": torch.tensor(g * g),
    }


class DenseHeads(nn.Module):
    """Linear classifiers and a box MLP on the image token features; discarded after pretraining."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.colour = nn.Linear(width, len(COLOURS) + 1)
        self.shape = nn.Linear(width, len(SHAPES) + 1)
        self.size = nn.Linear(width, len(SIZES) + 1)
        self.object_shape = nn.Linear(width, len(SHAPES))
        self.box = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 4))

    def forward(self, feats: torch.Tensor, targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """feats (B, T, C) -> total loss and the per-part figures (losses and accuracies)."""
        owner = targets["owner"]  # (B, T)
        obj = owner > 0
        logits = {k: getattr(self, k)(feats) for k in ("colour", "shape", "size")}
        ce = {k: F.cross_entropy(v.flatten(0, 1), targets[k].flatten()) for k, v in logits.items()}
        # Per object: the mean feature of its tokens.
        n_obj = int(owner.max())
        one_hot = F.one_hot(owner, n_obj + 1)[..., 1:].float()  # (B, T, n)
        count = one_hot.sum(1)  # (B, n)
        pooled = (one_hot.transpose(1, 2) @ feats) / count.clamp(min=1)[..., None]  # (B, n, C)
        first = one_hot.argmax(1)  # (B, n): a token of each object, to read its shape
        present = count > 0
        object_shape = torch.gather(targets["shape"], 1, first)[present]
        object_logits = self.object_shape(pooled)[present]
        ce_object = F.cross_entropy(object_logits, object_shape)
        raw = self.box(feats[obj]).sigmoid()
        pred = torch.cat([torch.minimum(raw[:, :2], raw[:, 2:]), torch.maximum(raw[:, :2], raw[:, 2:])], -1)
        target = targets["box"][obj]
        l1 = F.l1_loss(pred, target)
        giou = generalized_box_iou_loss(pred, target, reduction="mean")
        loss = ce["colour"] + ce["shape"] + ce["size"] + ce_object + 5.0 * l1 + 2.0 * giou
        with torch.no_grad():
            figures = {f"ce_{k}": v.detach() for k, v in ce.items()}
            figures.update(ce_object_shape=ce_object.detach(), l1=l1.detach(), giou=giou.detach())
            for k in ("colour", "shape", "size"):
                figures[f"acc_{k}"] = (logits[k].argmax(-1) == targets[k])[obj].float().mean()
            figures["acc_object_shape"] = (object_logits.argmax(-1) == object_shape).float().mean()
            figures["box_acc50"] = (box_iou(pred, target).diagonal() >= 0.5).float().mean()
        return loss, figures

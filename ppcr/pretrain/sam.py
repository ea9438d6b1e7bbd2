"""Pretraining the tiny SAM: box (with jitter) -> mask for every object of a synthetic scene.

The released SAM models come trained to segment from a box; the tiny one is random. Here it learns
that task the way SAM was trained for it (a box per object, its corners jittered, so that a loose or
shifted box still gives the object's mask), with PPCR's own mask losses and the same batched
decoder and preprocessing PPCR uses. All of SAM trains: image encoder, prompt encoder, mask decoder.
"""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import box_convert

from ppcr.data.transforms import Preprocessor
from ppcr.eval.metrics import mask_iou_parts
from ppcr.model.losses import mask_losses
from ppcr.model.sam import SamSegmenter
from ppcr.pretrain.scenes import PretrainScene


def sam_items(scene: PretrainScene, pre: Preprocessor) -> dict:
    """A scene through PPCR's preprocessing: SAM's image and, per object, its mask in SAM's frame,
    its mask at the original size and its normalised (cx, cy, w, h) box."""
    first = None
    masks, full, boxes = [], [], []
    for o in scene.objects:
        x0, y0, x1, y1 = o.box
        item = pre(scene.image, torch.from_numpy(o.mask), [x0, y0, x1 - x0, y1 - y0])
        first = first or item
        masks.append(item["sam_mask"])
        full.append(item["mask"])
        boxes.append(item["box"])
    return {
        "sam_image": first["sam_image"],
        "input_size": torch.tensor(first["input_size"]),
        "sam_masks": torch.stack(masks),
        "masks": full,
        "boxes": torch.stack(boxes),
    }


def collate_scenes(items: list[dict]) -> dict:
    """Images stacked once; objects flattened with ``owner`` (their image's row)."""
    return {
        "sam_images": torch.stack([it["sam_image"] for it in items]),
        "input_sizes": torch.stack([it["input_size"] for it in items]),
        "owner": torch.cat([torch.full((len(it["boxes"]),), i) for i, it in enumerate(items)]),
        "sam_masks": torch.cat([it["sam_masks"] for it in items]),
        "boxes": torch.cat([it["boxes"] for it in items]),
        "masks": [m for it in items for m in it["masks"]],
    }


def jitter_boxes(boxes: torch.Tensor, scale: float, generator: torch.Generator) -> torch.Tensor:
    """(N, 4) normalised (cx, cy, w, h): centre moved by N(0, scale) box sides, sides scaled by
    exp(N(0, scale)); ``scale`` 0 returns the boxes."""
    if scale == 0:
        return boxes
    noise = torch.randn(boxes.shape, generator=generator) * scale
    out = boxes.clone()
    out[:, :2] += noise[:, :2] * boxes[:, 2:]
    out[:, 2:] *= noise[:, 2:].exp()
    return out.clamp(0.0, 1.0)


def segment(seg: SamSegmenter, batch: dict, boxes: torch.Tensor) -> torch.Tensor:
    """Low-resolution mask logits (N, S/4, S/4) of every object from its box; each image encoded once."""
    embeddings = seg.encode(batch["sam_images"], batch["input_sizes"])[batch["owner"]]
    hw = batch["input_sizes"][batch["owner"]].to(boxes.dtype)
    scale = torch.stack([hw[:, 1], hw[:, 0], hw[:, 1], hw[:, 0]], dim=-1)
    return seg.decode(embeddings, box_convert(boxes, "cxcywh", "xyxy") * scale, None)


def sam_loss(
    seg: SamSegmenter, batch: dict, jitter: float, generator: torch.Generator, w_bce: float = 2.0, w_dice: float = 0.5
) -> tuple[torch.Tensor, dict]:
    low = segment(seg, batch, jitter_boxes(batch["boxes"], jitter, generator))
    bce, dice = mask_losses(low, batch["sam_masks"], batch["input_sizes"][batch["owner"]])
    return w_bce * bce + w_dice * dice, {"bce": bce.detach(), "dice": dice.detach()}


@torch.no_grad()
def sam_scores(seg: SamSegmenter, batches: list[dict], jitter: float, seed: int = 0) -> dict[str, float]:
    """cIoU and mean IoU at the original resolution, from exact and from jittered boxes."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, scale in (("box", 0.0), ("jittered_box", jitter)):
        inter = union = 0
        ious = []
        for b in batches:
            low = segment(seg, b, jitter_boxes(b["boxes"], scale, generator))
            for k, target in enumerate(b["masks"]):
                size = tuple(b["input_sizes"][b["owner"][k]].tolist())
                pred = seg.to_original(low[k], size, tuple(target.shape)) > 0
                i, u = mask_iou_parts(pred, target > 0)
                inter, union = inter + i, union + u
                ious.append(i / max(u, 1))
        out[f"cIoU_{name}"] = inter / max(union, 1)
        out[f"mIoU_{name}"] = float(np.mean(ious))
    return out

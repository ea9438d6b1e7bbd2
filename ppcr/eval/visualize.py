"""Pictures of predictions: image, ground truth and prediction side by side, for TensorBoard and eval;
a prediction over a user's image, for ppcr-infer and the demo."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw
from torchvision.ops import box_convert

MASK_COLOUR = (230, 40, 40)  # red, half transparent
HEAD_BOX_COLOUR = (255, 220, 0)  # yellow: the box head's box
TEXT_BOX_COLOUR = (0, 200, 255)  # cyan, a thinner line: the box written in the answer


def pixel_corners(box: torch.Tensor, height: int, width: int) -> list[float]:
    """A normalised (cx, cy, w, h) box as [x1, y1, x2, y2] in pixels of a height x width image."""
    x1, y1, x2, y2 = box_convert(box.float(), "cxcywh", "xyxy").tolist()
    return [x1 * width, y1 * height, x2 * width, y2 * height]


def overlay(
    image: np.ndarray, mask: np.ndarray, box: torch.Tensor, text_box: torch.Tensor | None = None
) -> Image.Image:
    """(H, W, 3) uint8 image with the (H, W) bool mask, the head's box and the answer's box (normalised
    cx, cy, w, h) drawn in their colours; line widths grow with the image."""
    out = image.copy()
    out[mask] = (0.5 * out[mask] + 0.5 * np.array(MASK_COLOUR)).astype(np.uint8)
    pil = Image.fromarray(out)
    h, w = image.shape[:2]
    width = max(2, round(max(h, w) / 250))
    draw = ImageDraw.Draw(pil)
    for b, colour, line in ((box, HEAD_BOX_COLOUR, width), (text_box, TEXT_BOX_COLOUR, max(1, width // 2))):
        if b is not None:
            draw.rectangle(pixel_corners(b, h, w), outline=colour, width=line)
    return pil


def grid(pairs: list) -> np.ndarray:
    """Image, ground truth (green) and prediction (red) side by side, with the expression and answers."""
    tiles = []
    for item, pred in pairs:
        image = _image_of(item)
        gt = item["mask"].numpy() > 0
        pm = pred.mask.numpy()
        panels = []
        for m, colour in ((None, None), (gt, (0, 200, 0)), (pm, (220, 30, 30))):
            p = image.copy()
            if m is not None:
                p[m] = (0.5 * p[m] + 0.5 * np.array(colour)).astype(np.uint8)
            panels.append(p)
        tile = Image.fromarray(np.concatenate(panels, axis=1))
        canvas = Image.new("RGB", (tile.width, tile.height + 36), (255, 255, 255))
        canvas.paste(tile, (0, 36))
        d = ImageDraw.Draw(canvas)
        d.text((2, 0), item["expression"][:90], fill=(0, 0, 0))
        d.text((2, 12), pred.semantic_answer[:90], fill=(0, 0, 120))
        d.text((2, 24), pred.spatial_answer[:90], fill=(120, 0, 0))
        tiles.append(np.asarray(canvas.resize((3 * 160, int(canvas.height * 3 * 160 / canvas.width)))))
    width = max(t.shape[1] for t in tiles)
    return np.concatenate([np.pad(t, ((0, 4), (0, width - t.shape[1]), (0, 0)), constant_values=255) for t in tiles])


def _image_of(item: dict) -> np.ndarray:
    """The original image back from SAM's input (crop the padding, resize)."""
    ih, iw = item["input_size"]
    h, w = item["original_size"]
    x = item["sam_image"][:, :ih, :iw].permute(1, 2, 0).numpy()
    return np.asarray(Image.fromarray(x).resize((w, h), Image.BILINEAR))


def precision_plot(rows: list[dict], path) -> None:
    """Prec@X over the thresholds X, one line per split, for the full model's rows (``ablation`` of
    PPCR); saved as a small PNG beside the results table."""
    import matplotlib

    matplotlib.use("Agg")  # no display; a file only
    import matplotlib.pyplot as plt

    from ppcr.eval.metrics import THRESHOLDS
    from ppcr.model.predict import PPCR

    fig, ax = plt.subplots(figsize=(4.8, 3.4), dpi=120)
    for r in rows:
        if r["ablation"] != PPCR.name or r.get("group", "all") != "all":
            continue
        ax.plot(
            THRESHOLDS, [100 * r[f"Prec@{t}"] for t in THRESHOLDS], marker="o", label=f"{r['split']} ({r['count']})"
        )
    ax.set_xlabel("mask IoU threshold X")
    ax.set_ylabel("Prec@X (%)")
    ax.set_xticks(THRESHOLDS)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

"""Pictures of predictions: image, ground truth and prediction side by side, for TensorBoard and eval."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw


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

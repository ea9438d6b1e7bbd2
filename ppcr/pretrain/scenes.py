"""An endless, deterministic stream of synthetic scenes for pretraining the tiny backbones.

Scenes come from the generator of the embedded dataset (:mod:`ppcr.data.synthetic`) with a seed of
their own, so they are never the dataset's train, val or test images (each image's generator is
seeded by (seed, split, index)). Each scene goes through the same JPEG encoding as the dataset's
files, and carries every object's attributes, visible box and mask as the REFER annotations hold
them (the mask from the visible polygon, rasterised by pycocotools).
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ppcr.config import SyntheticConfig
from ppcr.data import synthetic
from ppcr.data.refer import segmentation_to_mask
from ppcr.data.transforms import decode_image

COLOURS = list(synthetic.COLOURS)
SHAPES = [name for _, name, _ in synthetic.CATEGORIES]
SIZES = list(synthetic.SIZES)


@dataclass
class SceneObjectInfo:
    colour: int  # index into COLOURS
    shape: int  # index into SHAPES
    size: int  # index into SIZES
    box: tuple[float, float, float, float]  # visible part, x1, y1, x2, y2 in pixels
    mask: np.ndarray  # (H, W) uint8 {0, 1}, the visible part

    @property
    def name(self) -> str:
        return f"{SIZES[self.size]} {COLOURS[self.colour]} {SHAPES[self.shape]}"


@dataclass
class PretrainScene:
    index: int
    image: torch.Tensor  # (3, H, W) uint8 RGB, after the dataset's JPEG round trip
    objects: list[SceneObjectInfo]  # in drawing order
    expressions: dict[int, dict[int, list[str]]]  # object -> difficulty level -> expressions picking it out


def draw(cfg: SyntheticConfig, index: int) -> PretrainScene:
    """Scene ``index`` of the stream of ``cfg.seed`` (drawn as a "train" image of that seed)."""
    scene, pixels, _, _ = synthetic.draw_image(cfg, "train", index)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=cfg.jpeg_quality)
    objects, expressions = [], {}
    for k, obj in enumerate(scene.objects):
        if obj.visible is None:
            continue
        x0, y0, x1, y1 = obj.visible.bounds
        mask = segmentation_to_mask(synthetic.coco_polygons(obj.visible), scene.height, scene.width)
        if mask.sum() < synthetic.MIN_VISIBLE_PIXELS:
            continue
        expressions[len(objects)] = synthetic.expressions(scene, k)
        objects.append(
            SceneObjectInfo(
                COLOURS.index(obj.colour), SHAPES.index(obj.shape), SIZES.index(obj.size), (x0, y0, x1, y1), mask
            )
        )
    return PretrainScene(index, decode_image(buf.getvalue()), objects, expressions)


class SceneStream(IterableDataset):
    """Scenes ``start, start + 1, ...`` of ``cfg.seed``, each passed through ``transform``; with loader
    workers, worker w of n makes scenes w, w + n, ... and the loader's round robin restores the order."""

    def __init__(self, cfg: SyntheticConfig, transform, start: int = 0) -> None:
        super().__init__()
        self.cfg, self.transform, self.start = cfg, transform, start

    def __iter__(self) -> Iterator:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        index = self.start + worker
        while True:
            yield self.transform(draw(self.cfg, index))
            index += workers


def scene_config(base: SyntheticConfig, seed: int) -> SyntheticConfig:
    """The dataset's scene settings with the pretraining seed; refuses the dataset's own seed."""
    if seed == base.seed:
        raise ValueError(
            f"pretraining seed {seed} equals data.synthetic.seed: pretraining would draw the dataset's own images"
        )
    return SyntheticConfig(**{**base.__dict__, "seed": seed})

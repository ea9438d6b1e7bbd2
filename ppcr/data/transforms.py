"""The one preprocessing of images, masks and boxes, shared by training, evaluation and inference.

Peer codebases drift apart here (resize, SAM's pixel mean/std, padding done three ways); in ppcr the
loader, the evaluator and ``ppcr-infer`` all call :class:`Preprocessor`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from ppcr.config import ModelConfig


@dataclass(frozen=True)
class Preprocessor:
    mllm_image_size: int
    sam_image_size: int
    sam_pixel_mean: tuple[float, float, float]
    sam_pixel_std: tuple[float, float, float]

    @classmethod
    def from_config(cls, m: ModelConfig) -> "Preprocessor":
        return cls(m.mllm_image_size, m.sam_image_size, tuple(m.sam_pixel_mean), tuple(m.sam_pixel_std))

    def image(self, image: np.ndarray) -> dict:
        """(H, W, 3) uint8 RGB -> the two model inputs and the sizes needed to map results back.

        sam_image: (3, S, S) float32, SAM's longest-side resize, pixel mean/std, zero pad right/bottom.
        mllm_image: (3, M, M) uint8, a square resize the MLLM's own processor takes from there.
        """
        h, w = image.shape[:2]
        resized = ResizeLongestSide(self.sam_image_size).apply_image(image)
        ih, iw = resized.shape[:2]
        x = torch.from_numpy(np.ascontiguousarray(resized)).permute(2, 0, 1).float()
        mean = torch.tensor(self.sam_pixel_mean).view(3, 1, 1)
        std = torch.tensor(self.sam_pixel_std).view(3, 1, 1)
        x = F.pad((x - mean) / std, (0, self.sam_image_size - iw, 0, self.sam_image_size - ih))
        mllm = Image.fromarray(image).resize((self.mllm_image_size, self.mllm_image_size), Image.BICUBIC)
        return {
            "sam_image": x,
            "mllm_image": torch.from_numpy(np.array(mllm)).permute(2, 0, 1).contiguous(),
            "original_size": (h, w),
            "input_size": (ih, iw),
        }

    def mask(self, mask: np.ndarray, input_size: tuple[int, int]) -> torch.Tensor:
        """(H, W) {0,1} mask -> (S, S) uint8 in SAM's input frame (nearest resize, same padding)."""
        ih, iw = input_size
        m = Image.fromarray(mask.astype(np.uint8)).resize((iw, ih), Image.NEAREST)
        m = torch.from_numpy(np.array(m))
        return F.pad(m, (0, self.sam_image_size - iw, 0, self.sam_image_size - ih))

    def __call__(self, image: np.ndarray, mask: np.ndarray | None = None, bbox: list[float] | None = None) -> dict:
        out = self.image(image)
        h, w = out["original_size"]
        if mask is not None:
            out["mask"] = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.uint8))
            out["sam_mask"] = self.mask(mask, out["input_size"])
        if bbox is not None:
            out["box"] = xywh_to_norm_cxcywh(bbox, w, h)
        return out


def xywh_to_norm_cxcywh(bbox: list[float], width: int, height: int) -> torch.Tensor:
    """COCO [x, y, w, h] in pixels -> (cx, cy, w, h) normalised to [0, 1] by the image size."""
    x, y, bw, bh = bbox
    box = torch.tensor([(x + bw / 2) / width, (y + bh / 2) / height, bw / width, bh / height], dtype=torch.float32)
    return box.clamp(0.0, 1.0)


_LEFT_RIGHT = re.compile(r"\b(left|right)(?=(?:most)?\b)", re.IGNORECASE)


def swap_left_right(text: str) -> str:
    """'the leftmost square right of the circle' -> 'the rightmost square left of the circle'."""

    def swap(m: re.Match) -> str:
        word = m.group(1)
        new = "right" if word.lower() == "left" else "left"
        if word.isupper():
            return new.upper()
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, text)


def hflip(image: np.ndarray, mask: np.ndarray, bbox: list[float], sentence: str) -> tuple:
    """Mirror a sample left-right; the expression's 'left' and 'right' swap with it."""
    w = image.shape[1]
    x, y, bw, bh = bbox
    return (np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1]),
            [w - x - bw, y, bw, bh], swap_left_right(sentence))

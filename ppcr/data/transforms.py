"""The one preprocessing of images, masks and boxes, shared by training, evaluation and inference.

Peer codebases drift apart here (resize, SAM's pixel mean/std, padding done three ways); in ppcr the
loader, the evaluator and ``ppcr-infer`` all call :class:`Preprocessor`. Images stay (3, H, W) uint8
tensors from decoding to the batch (TorchCodec's decoders, torchvision's uint8 resampling):
SAM's pixel mean and std are applied on the device by the model, where segment_anything's own
``Sam.preprocess`` applies them, so loader workers do no float work and batches are 4x smaller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from segment_anything.utils.transforms import ResizeLongestSide
from torchcodec.decoders import decode_image as _decode
from torchvision.ops import box_convert, box_iou

from ppcr.config import ModelConfig


def decode_image(data: bytes, gray: bool = False) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> (3, H, W) uint8 RGB, or (1, H, W) for ``gray``; raises
    RuntimeError or ValueError on data that does not decode."""
    return _decode(data, mode="GRAY" if gray else "RGB")


def frame_region(input_sizes: torch.Tensor, size: int) -> torch.Tensor:
    """(B, S, S) bool: the pixels of SAM's S x S frame that each image covers (the rest is padding);
    ``input_sizes`` (B, 2) holds each image's h, w inside the frame."""
    ar = torch.arange(size, device=input_sizes.device)
    return (ar[None, :, None] < input_sizes[:, 0, None, None]) & (ar[None, None, :] < input_sizes[:, 1, None, None])


@dataclass(frozen=True)
class Preprocessor:
    mllm_image_size: int
    sam_image_size: int

    @classmethod
    def from_config(cls, m: ModelConfig) -> "Preprocessor":
        return cls(m.mllm_image_size, m.sam_image_size)

    def image(self, image: torch.Tensor) -> dict:
        """(3, H, W) uint8 RGB -> the two model inputs and the sizes needed to map results back.

        sam_image: (3, S, S) uint8, SAM's longest-side resize (bilinear, antialiased, as SAM's
            ``ResizeLongestSide`` through PIL), zero padding right and bottom.
        mllm_image: (3, M, M) uint8, a square bicubic resize the MLLM's own processor takes from there.
        """
        h, w = image.shape[-2:]
        ih, iw = ResizeLongestSide.get_preprocess_shape(h, w, self.sam_image_size)
        sam = TF.resize(image, [ih, iw], antialias=True)
        return {
            "sam_image": F.pad(sam, (0, self.sam_image_size - iw, 0, self.sam_image_size - ih)),
            "mllm_image": self.mllm_image(image),
            "original_size": (h, w),
            "input_size": (ih, iw),
        }

    def mllm_image(self, image: torch.Tensor) -> torch.Tensor:
        """(3, H, W) uint8 -> (3, M, M) uint8, the MLLM's square input."""
        return TF.resize(image, [self.mllm_image_size] * 2, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)

    def mask(self, mask: torch.Tensor, input_size: tuple[int, int]) -> torch.Tensor:
        """(H, W) {0,1} uint8 mask -> (S, S) uint8 in SAM's input frame (nearest resize, same padding)."""
        ih, iw = input_size
        m = TF.resize(mask[None], [ih, iw], interpolation=TF.InterpolationMode.NEAREST_EXACT)[0]
        return F.pad(m, (0, self.sam_image_size - iw, 0, self.sam_image_size - ih))

    def __call__(self, image: torch.Tensor, mask: torch.Tensor | None = None, bbox: list[float] | None = None) -> dict:
        out = self.image(image)
        h, w = out["original_size"]
        if mask is not None:
            out["mask"] = mask
            out["sam_mask"] = self.mask(mask, out["input_size"])
        if bbox is not None:
            out["box"] = xywh_to_norm_cxcywh(bbox, w, h)
        return out


def xywh_to_norm_cxcywh(bbox: list[float], width: int, height: int) -> torch.Tensor:
    """COCO [x, y, w, h] in pixels -> (cx, cy, w, h) normalised to [0, 1] by the image size."""
    x, y, bw, bh = bbox
    box = torch.tensor([(x + bw / 2) / width, (y + bh / 2) / height, bw / width, bh / height], dtype=torch.float32)
    return box.clamp(0.0, 1.0)


def box_pair_iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """IoU of two normalised (cx, cy, w, h) boxes (4,)."""
    pair = box_convert(torch.stack([a.float().cpu(), b.float().cpu()]), "cxcywh", "xyxy")
    return float(box_iou(pair[:1], pair[1:])[0, 0])


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


def hflip(image: torch.Tensor, mask: torch.Tensor, bbox: list[float], sentence: str) -> tuple:
    """Mirror a sample left-right: image (3, H, W), mask (H, W), COCO box; 'left' and 'right' in the
    expression swap with it."""
    w = image.shape[-1]
    x, y, bw, bh = bbox
    return image.flip(-1), mask.flip(-1), [w - x - bw, y, bw, bh], swap_left_right(sentence)

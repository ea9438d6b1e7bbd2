"""The one preprocessing of images, masks and boxes, shared by training, evaluation and inference.

Peer codebases drift apart here (resize, SAM's pixel mean/std, padding done three ways); in ppcr the
loader, the evaluator and ``ppcr-infer`` all call :class:`Preprocessor`. Images stay (3, H, W) uint8
tensors from decoding to the batch (TorchCodec's decoders, or PIL's; torchvision's uint8 resampling):
SAM's pixel mean and std are applied on the device by the model, where segment_anything's own
``Sam.preprocess`` applies them, so loader workers do no float work and batches are 4x smaller.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from segment_anything.utils.transforms import ResizeLongestSide
from PIL import Image
from torchvision.ops import box_convert, box_iou

from ppcr.config import ModelConfig


def _decode_pil(data: bytes, gray: bool = False) -> torch.Tensor:
    """PIL's decoder with :func:`decode_image`'s contract; pixel for pixel TorchCodec's on RGB JPEGs and
    gray PNGs, the two kinds shards hold (both libraries use libjpeg-turbo and libpng; tested)."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = "L" if gray else "RGB"
            pixels = np.array(im if im.mode == mode else im.convert(mode))
    except (OSError, SyntaxError) as e:  # PIL's errors for unknown, broken and truncated data
        raise ValueError(f"image does not decode ({e})") from e
    t = torch.from_numpy(pixels)
    return t[None] if gray else t.permute(2, 0, 1)


def _pick_decoder() -> tuple[Callable[[bytes, bool], torch.Tensor], str]:
    """TorchCodec's decoder where it works with the installed torch, else PIL's; with the reason.

    TorchCodec (2.5x faster than PIL on a 640x480 JPEG) is the decoder torchvision deprecates its own
    in favour of, but each release loads only with the torch versions it was built for (0.16 and later
    need torch >= 2.11), and its wheels declare no torch requirement, so pip cannot pick a matching one:
    the CUDA 12.x torch on PyPI (2.10, cu128) gets a TorchCodec that does not load. Decoding therefore
    must not depend on it; a TorchCodec that fails to import or to decode a probe image is replaced by
    PIL (already a requirement), once per process, with a warning that says why.
    """
    try:
        from torchcodec.decoders import decode_image as tc_decode

        def decode(data: bytes, gray: bool = False) -> torch.Tensor:
            return tc_decode(data, mode="GRAY" if gray else "RGB")

        probe = io.BytesIO()
        Image.new("RGB", (2, 1), (10, 20, 30)).save(probe, "PNG")
        if decode(probe.getvalue()).tolist() != [[[10, 10]], [[20, 20]], [[30, 30]]]:
            raise RuntimeError("decoded a probe image wrong")
        return decode, "torchcodec"
    except Exception as e:  # ImportError, OSError (undefined symbol), RuntimeError: a torch it was not built for
        first_line = (str(e).strip().splitlines() or [""])[0]
        reason = f"TorchCodec unusable with torch {torch.__version__} ({type(e).__name__}: {first_line})"
        warnings.warn(f"{reason}; images decode with PIL instead (same pixels, slower)", RuntimeWarning, stacklevel=2)
        return _decode_pil, f"pil: {reason}"


_decode, IMAGE_DECODER = _pick_decoder()  # IMAGE_DECODER: "torchcodec", or "pil: <why TorchCodec is not used>"


def decode_image(data: bytes, gray: bool = False) -> torch.Tensor:
    """Encoded image bytes (JPEG, PNG, ...) -> (3, H, W) uint8 RGB, or (1, H, W) for ``gray``; raises
    RuntimeError or ValueError on data that does not decode. The decoder is TorchCodec's or PIL's
    (``IMAGE_DECODER``; see :func:`_pick_decoder`)."""
    return _decode(data, gray)


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

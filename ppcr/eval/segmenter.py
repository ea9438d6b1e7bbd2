"""The Python API: load a trained PPCR model once, then segment what an expression refers to.

    from ppcr import Segmenter

    segmenter = Segmenter.from_pretrained("exports/default")  # an export, a run directory or a checkpoint
    result = segmenter("photo.jpg", "the red circle on the left")
    result.mask        # (H, W) bool, at the size of the image as a viewer shows it
    result.box         # the box head's box, [x1, y1, x2, y2] in pixels
    result.text_box    # the box written in the answer, [x1, y1, x2, y2] in pixels, or None
    results = segmenter(["a.jpg", "b.jpg"], ["the red circle", "the small square"])  # a list

Images may be file paths, PIL images or arrays, taken as a viewer shows them (:func:`ppcr.data.images.load_image`:
EXIF orientation applied, grey, 16-bit and transparent images converted). Prediction is by generation
(:func:`ppcr.model.predict.predict`), ``batch_size`` expressions at a time; ``ppcr-infer`` and ``ppcr-demo`` are
built on this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ppcr.config import Config
from ppcr.data.images import LoadedImage, load_image
from ppcr.eval.visualize import overlay, pixel_corners
from ppcr.model.predict import Prediction, predict
from ppcr.model.saving import load_checkpoint

ImageInput = str | Path | Image.Image | np.ndarray | LoadedImage
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Segmentation:
    """One expression's answer on one image."""

    expression: str
    mask: np.ndarray  # (H, W) bool at the image's size (as a viewer shows it)
    box: list[float]  # the box head's box, [x1, y1, x2, y2] in pixels
    text_box: list[float] | None  # the box written in the spatial answer, in pixels; None if it holds none
    box_agreement: float | None  # IoU of the two boxes
    semantic_answer: str  # stage 1's answer, ending in [SEM]
    spatial_answer: str  # stage 2's answer, [LOC] and (by default) the box as text
    stopped: dict[str, bool]  # whether each stage generated its end token before the token limit
    timings: dict[str, float]  # seconds per stage, for the whole batch this expression was decoded in
    notes: list[str]  # what was converted to read the image (EXIF rotation, 16-bit, transparency)
    image: np.ndarray = field(repr=False)  # (H, W, 3) uint8, the pixels the mask lines up with
    prediction: Prediction = field(repr=False)  # normalised boxes and the mask's logits

    def overlay(self) -> Image.Image:
        """The image with the mask (red), the head's box (yellow) and the answer's box (cyan)."""
        return overlay(self.image, self.mask, self.prediction.box, self.prediction.text_box)

    def to_json(self) -> dict:
        """The answer's facts, JSON-ready (what ``ppcr-infer`` writes beside the mask)."""
        p = self.prediction
        return {
            "expression": self.expression,
            "semantic_answer": self.semantic_answer,
            "spatial_answer": self.spatial_answer,
            "box_xyxy": self.box,
            "text_box_xyxy": self.text_box,
            "box_cxcywh": p.box.tolist(),
            "text_box_cxcywh": None if p.text_box is None else p.text_box.tolist(),
            "box_agreement_iou": self.box_agreement,
            "mask_area": int(self.mask.sum()),
            "image_size_hw": list(self.mask.shape),
            "timings_s": self.timings,
            "stopped": self.stopped,
            "notes": self.notes,
        }


class Segmenter:
    """A loaded PPCR model and the one prediction path of the API, ``ppcr-infer`` and the demo."""

    def __init__(self, model, *, config: Config | None = None, tag: str | None = None, batch_size: int = 8) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.model, self.config, self.tag, self.batch_size = model, config, tag, batch_size

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        device_map: str | None = None,
        batch_size: int = 8,
        allow_base_mismatch: bool = False,
    ) -> Segmenter:
        """Load an export (``ppcr-export``), a run directory (its latest checkpoint) or one checkpoint
        directory. ``device`` defaults to the GPU where there is one; ``dtype`` ("bfloat16", torch.bfloat16,
        ...) overrides the dtype the model was trained in; ``device_map="auto"`` spreads a large MLLM over
        the visible GPUs instead of ``device`` (the rest of the model on its first one), for an export or a
        run checkpoint alike (:func:`ppcr.model.saving.place`). Needs no DeepSpeed for an export. Base weights
        other than those the model was trained on are refused (``ppcr.model.fingerprint.BaseMismatch``) unless
        ``allow_base_mismatch``."""
        if isinstance(dtype, torch.dtype):
            dtype = str(dtype).removeprefix("torch.")
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
        if device_map is None and device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        model, cfg, _, tag = load_checkpoint(
            path, device=device, device_map=device_map, dtype=dtype, allow_base_mismatch=allow_base_mismatch
        )
        return cls(model, config=cfg, tag=tag, batch_size=batch_size)

    def __call__(
        self, images: ImageInput | Sequence[ImageInput], expressions: str | Sequence[str]
    ) -> Segmentation | list[Segmentation]:
        """One image and one expression -> one :class:`Segmentation`; lists of both (equal lengths) -> a list.
        Raises :class:`ppcr.data.images.ImageError` for an image that cannot be read (naming it) and
        ValueError for an empty expression (naming its position)."""
        single = isinstance(expressions, str)
        if single:
            images, expressions = [images], [expressions]
        elif not isinstance(images, (list, tuple)):
            raise ValueError("give one image with one expression, or a list of images with a list of expressions")
        if len(images) != len(expressions):
            raise ValueError(f"{len(images)} images but {len(expressions)} expressions")
        texts = []
        for i, e in enumerate(expressions):
            if not isinstance(e, str) or not e.strip():
                raise ValueError(f"expression {i}: empty (say which object to segment, e.g. 'the red circle')")
            texts.append(e.strip())
        loaded = [im if isinstance(im, LoadedImage) else load_image(im) for im in images]
        preds = predict(self.model, [x.pixels for x in loaded], texts, batch_size=self.batch_size)
        out = [self._result(x, t, p) for x, t, p in zip(loaded, texts, preds)]
        return out[0] if single else out

    @staticmethod
    def _result(loaded: LoadedImage, expression: str, pred: Prediction) -> Segmentation:
        h, w = loaded.pixels.shape[:2]
        return Segmentation(
            expression=expression,
            mask=pred.mask.numpy(),
            box=pixel_corners(pred.box, h, w),
            text_box=None if pred.text_box is None else pixel_corners(pred.text_box, h, w),
            box_agreement=pred.box_agreement,
            semantic_answer=pred.semantic_answer,
            spatial_answer=pred.spatial_answer,
            stopped=pred.stopped,
            timings=pred.timings,
            notes=list(loaded.notes),
            image=loaded.pixels,
            prediction=pred,
        )

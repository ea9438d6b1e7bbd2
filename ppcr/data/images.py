"""A user's image, as a person sees it, for inference (``ppcr.Segmenter``, ``ppcr-infer``) and the demo
(``ppcr-demo``): a file, a PIL image or an array.

Photos from phones and cameras are often stored sideways with an EXIF orientation tag that viewers
apply; the mask must line up with what the user sees, so the tag is applied here. Training and
evaluation do not go through this: the REFER/COCO annotations are drawn on the stored pixels.

Every mode PIL opens becomes 8-bit RGB (grey, palette, CMYK, 16- and 32-bit integer and float
greys by their value range, transparency composited over white), and each conversion is named in
``LoadedImage.notes`` so that a front end can say what it did. An image above ``max_pixels`` is
refused before its pixels are decoded (PIL reads the size from the header), with its size in the
message. So is a degenerate shape (sides more than 20:1 apart, an empty array), which would only fail
later, inside the model's resize.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MAX_PIXELS = 64_000_000  # 8000 x 8000: far above any camera's photo, below PIL's decompression-bomb limit
# Longer over shorter side: wider than any panorama a phone takes (about 10:1). Past it the model's resizes
# break down: SAM's longest-side resize of a 1 x 8000 strip has no rows left.
MAX_ASPECT = 20.0


class ImageError(ValueError):
    """The image cannot be used; the message says why, for the user."""


@dataclass
class LoadedImage:
    pixels: np.ndarray  # (H, W, 3) uint8, in the orientation a viewer shows
    notes: list[str] = field(default_factory=list)  # conversions applied, in words


def load_image(source: str | Path | Image.Image | np.ndarray, *, max_pixels: int = MAX_PIXELS) -> LoadedImage:
    """A file path, a PIL image or an array as 8-bit RGB in display orientation; :class:`ImageError` names the
    file (or the array's shape and dtype) and why. A PIL image gets the same treatment as a file (its EXIF
    orientation, mode conversions); an array is taken as stored: (H, W, 3) or (H, W, 4) uint8 RGB(A), or an
    (H, W) grey of uint8, uint16, bool or float in [0, 1]."""
    if isinstance(source, np.ndarray):
        return _to_rgb(_array_image(source, max_pixels))
    if isinstance(source, Image.Image):
        _check_size(source.size, "the PIL image", max_pixels)
        return _to_rgb(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"image not found: {path}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                _check_size(im.size, str(path), max_pixels)
                return _to_rgb(im)
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"cannot read image {path}: not an image file PIL can open ({e})") from e
    except (OSError, ValueError, SyntaxError) as e:  # truncated or corrupt files raise these from PIL's decoders
        raise ImageError(f"cannot read image {path} ({e})") from e


def _check_size(size: tuple[int, int], what: str, max_pixels: int) -> None:
    """Refuse an image of (width, height) ``size`` above ``max_pixels`` or with sides further apart than
    :data:`MAX_ASPECT`, naming ``what`` it is and its size."""
    w, h = size
    if w * h > max_pixels:
        raise ImageError(f"{what} is {w} x {h} px ({w * h / 1e6:.0f} MP); images up to {max_pixels / 1e6:.0f} MP "
                         "are taken")
    if min(w, h) == 0:
        raise ImageError(f"{what} is {w} x {h} px: it has no pixels")
    if max(w, h) > MAX_ASPECT * min(w, h):
        raise ImageError(f"{what} is {w} x {h} px, one side {max(w, h) / min(w, h):.0f} times the other; images up to "
                         f"{MAX_ASPECT:.0f}:1 are taken (crop it to the part with the object)")


def _array_image(a: np.ndarray, max_pixels: int) -> Image.Image:
    """An array as the PIL image of the same pixels (the modes :func:`_to_rgb` converts)."""
    what = f"image array of shape {a.shape} and dtype {a.dtype}"
    grey = a.ndim == 2 and a.dtype in (np.uint8, np.uint16, np.bool_, np.float32, np.float64)
    colour = a.ndim == 3 and a.shape[2] in (3, 4) and a.dtype == np.uint8
    if not (grey or colour) or min(a.shape[:2]) == 0:
        raise ImageError(f"{what}: give (H, W, 3) or (H, W, 4) uint8 RGB(A), or an (H, W) grey of uint8, uint16, "
                         "bool or float in [0, 1]")
    _check_size((a.shape[1], a.shape[0]), f"the {what}", max_pixels)
    if a.dtype == np.float64:
        a = a.astype(np.float32)
    if a.dtype == np.float32 and not (np.isfinite(a).all() and 0.0 <= a.min() and a.max() <= 1.0):
        raise ImageError(f"{what}: a float grey must lie in [0, 1]")
    return Image.fromarray(np.ascontiguousarray(a))


def _to_rgb(im: Image.Image) -> LoadedImage:
    notes = []
    orientation = im.getexif().get(0x0112, 1)  # EXIF Orientation
    if orientation not in (1, None):
        im = ImageOps.exif_transpose(im)
        notes.append(f"rotated as its EXIF orientation ({orientation}) says")
    mode = im.mode
    if mode.startswith("I") or mode == "F":  # 16-bit and 32-bit greys: by their range, not clipped
        values = np.asarray(im, dtype=np.float64)
        if mode.startswith("I;16") or (mode == "I" and values.max() <= 65535):
            top, what = 65535.0, "16-bit grey"  # PIL opens 16-bit PNGs as I;16 or I
        elif mode == "F" and values.max() <= 1.0:
            top, what = 1.0, "floating-point grey"
        else:
            top, what = float(values.max()), f"{mode}-mode grey"
        grey = np.clip(values / max(top, 1e-12) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        notes.append(f"{what} scaled to 8 bits")
        return LoadedImage(np.repeat(grey[..., None], 3, axis=2), notes)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
        notes.append("transparency composited over white")
    elif mode in ("L", "1"):
        notes.append("grey scale shown as RGB")
    elif mode == "CMYK":
        notes.append("CMYK converted to RGB")
    return LoadedImage(np.array(im.convert("RGB")), notes)

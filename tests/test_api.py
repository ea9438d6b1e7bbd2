"""The Python API (ppcr.Segmenter): images as paths, PIL images or arrays, one or many, in another dtype."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ppcr
from ppcr.data.images import ImageError
from ppcr.eval.demo import examples
from ppcr.eval.visualize import pixel_corners
from ppcr.model.saving import load_checkpoint


def from_pil_image(path):
    with Image.open(path) as im:
        im.load()
        return im.copy()


def test_import_ppcr_stays_light():
    code = ("import sys, ppcr\n"
            "print([m for m in ('torch', 'transformers', 'deepspeed', 'ppcr.eval.segmenter') if m in sys.modules])\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"  # the API is imported on first use (ppcr.Segmenter, ppcr.load)
    assert ppcr.load == ppcr.Segmenter.from_pretrained and ppcr.Segmenter.__module__ == "ppcr.eval.segmenter"


@pytest.fixture(scope="module")
def segmenter(exported):
    return ppcr.Segmenter.from_pretrained(exported / "model", device="cpu")


def test_one_image_or_many_as_paths_pil_images_or_arrays(segmenter):
    image, expression = examples()[0]
    with Image.open(image) as im:
        pixels = np.array(im.convert("RGB"))
    h, w = pixels.shape[:2]
    many = segmenter([image, from_pil_image(image)], [expression, expression])  # lists: one batch
    assert isinstance(many, list) and len(many) == 2
    result = segmenter(pixels, expression)  # one image and one expression: one result
    for other in many:  # a path, a PIL image, an array: the same pixels, the same answer
        assert np.array_equal(other.mask, result.mask) and other.box == pytest.approx(result.box, abs=1e-3)
        assert other.spatial_answer == result.spatial_answer
    assert result.mask.shape == (h, w) and result.mask.dtype == bool
    assert result.box == pixel_corners(result.prediction.box, h, w)  # pixels, x1 y1 x2 y2
    assert result.text_box is None or result.text_box == pixel_corners(result.prediction.text_box, h, w)
    assert set(result.timings) >= {"vision", "semantic", "spatial", "sam"}
    assert result.semantic_answer == result.prediction.semantic_answer and result.expression == expression
    assert result.overlay().size == (w, h)


def test_bad_input_names_what_is_wrong(segmenter, tmp_path):
    image, expression = examples()[0]
    with pytest.raises(ValueError, match="expression 1: empty"):
        segmenter([image, image], [expression, "  "])
    with pytest.raises(ValueError, match="2 images but 1 expressions"):
        segmenter([image, image], [expression])
    with pytest.raises(ImageError, match=f"image not found: {tmp_path / 'gone.jpg'}"):
        segmenter(tmp_path / "gone.jpg", expression)
    with pytest.raises(ImageError, match=r"image array of shape \(4, 4, 3\) and dtype float64"):
        segmenter(np.zeros((4, 4, 3)), expression)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        ppcr.Segmenter.from_pretrained(tmp_path, dtype="int8")


def test_dtype_loads_an_export_or_a_run_in_another_precision(exported, trained_run):
    segmenter = ppcr.Segmenter.from_pretrained(exported / "model", device="cpu", dtype=torch.bfloat16)
    dtypes = {p.dtype for p in segmenter.model.parameters()}
    assert dtypes == {torch.bfloat16} and segmenter.model.cfg.dtype == "bfloat16"
    image, expression = examples()[0]
    result = segmenter(image, expression)
    with Image.open(image) as im:
        assert result.mask.shape == (im.height, im.width)
    model, cfg, _, tag = load_checkpoint(trained_run, dtype="float16")  # the run was trained in float32
    assert {p.dtype for p in model.parameters()} == {torch.float16} and cfg.train.precision == "fp32"
    assert tag == "step_00000003"

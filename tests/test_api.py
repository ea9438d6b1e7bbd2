"""The Python API (ppcr.Segmenter): images as paths, PIL images or arrays, one or many, in another dtype; an
export moved away from its run loads and segments as ppcr-infer does on the run; the README's example runs."""

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open

import ppcr
from ppcr.data.images import ImageError
from ppcr.eval.demo import examples
from ppcr.eval.infer import main as infer_main
from ppcr.eval.visualize import pixel_corners
from ppcr.model.export import main as export_main
from ppcr.model.saving import load_checkpoint

ROOT = Path(__file__).parent.parent


def from_pil_image(path):
    with Image.open(path) as im:
        im.load()
        return im.copy()


def test_import_ppcr_stays_light():
    code = (
        "import sys, ppcr\n"
        "print([m for m in ('torch', 'transformers', 'deepspeed', 'ppcr.eval.segmenter') if m in sys.modules])\n"
    )
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
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    assert (cfg.model.dtype, cfg.train.precision) == ("float16", "fp16")  # a Config whose two agree
    assert tag == "step_00000003"


def test_an_export_moved_away_from_its_deleted_run_segments_as_ppcr_infer_on_the_run(
    evaluated_run, trained_run, tiny_models, tmp_path
):
    """The run and the base models it names are copied, exported, deleted; the export is moved and loads
    with the Python API alone, with the mask ppcr-infer gives on the original run."""
    work = tmp_path / "work"
    run = work / "runs" / "trained"
    shutil.copytree(evaluated_run, run)
    shutil.copytree(tiny_models["qwen2_5_vl"], work / "base" / "mllm")
    shutil.copy(tiny_models["sam"], work / "base" / "sam.pth")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["model"].update(mllm_path=str(work / "base" / "mllm"), sam_checkpoint=str(work / "base" / "sam.pth"))
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert export_main(["--checkpoint", str(run), "--out", str(work / "export")]) == 0

    files = [f for f in (work / "export").rglob("*") if f.is_file()]
    weights = [f for f in files if f.suffix == ".safetensors"]
    assert len(weights) == 5  # MLLM, both adapters, heads, SAM
    for f in weights:  # what they say they are
        with safe_open(f, "pt") as st:
            assert list(st.keys()), f
    for f in set(files) - set(weights):  # the rest is text: no pickle anywhere
        assert f.suffix in {".json", ".yaml", ".md", ".jinja", ".txt"}, f
        f.read_text(encoding="utf-8")
    card = (work / "export" / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["license"] == "apache-2.0" and header["pipeline_tag"] == "image-segmentation"
    assert header["datasets"] == ["synthetic"] and "referring-image-segmentation" in header["tags"]
    mllm_sha = header["ppcr"]["base_models"][0]["sha256"]
    assert re.fullmatch(r"[0-9a-f]{64}", mllm_sha) and f"sha256 `{mllm_sha}`" in card
    results = (run / "eval/step_00000003/results.md").read_text().strip()
    assert results in card and "| synthetic_unc/testB" in results  # make eval's table of this checkpoint
    assert "Checkpoint `trained/step_00000003`: 3 optimizer steps of 4 expressions a step" in card
    assert "Segmenter.from_pretrained(" in card and "## Limitations" in card

    shutil.rmtree(work / "runs")
    shutil.rmtree(work / "base")
    moved = tmp_path / "elsewhere" / "model"
    shutil.move(work / "export", moved)
    image, expression = examples()[0]
    result = ppcr.load(moved, device="cpu")(image, expression)
    assert (
        infer_main(
            [
                "--checkpoint",
                str(trained_run),
                "--image",
                image,
                "--expression",
                expression,
                "--out",
                str(tmp_path / "infer"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    name = Path(image).stem
    assert np.array_equal(np.array(Image.open(tmp_path / f"infer/{name}.mask.png")), result.mask)
    written = json.loads((tmp_path / f"infer/{name}.json").read_text())
    assert written["spatial_answer"] == result.spatial_answer
    assert written["box_xyxy"] == pytest.approx(result.box, abs=1e-3)


def test_the_readmes_python_example_runs(exported, tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    examples_run = [b for b in blocks if "from ppcr import" in b]
    assert examples_run, "the README shows no Python example"
    (image, _), (image2, _) = examples()[:2]
    (tmp_path / "exports").mkdir()
    (tmp_path / "exports/default").symlink_to(exported / "model")
    shutil.copy(image, tmp_path / "photo.jpg")
    shutil.copy(image2, tmp_path / "other.jpg")
    monkeypatch.chdir(tmp_path)
    for code in examples_run:
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)
    with Image.open(tmp_path / "photo.jpg") as im:
        assert namespace["result"].mask.shape == (im.height, im.width)
    assert (tmp_path / "overlay.png").is_file() and len(namespace["results"]) == 2


def test_device_map_places_a_run_checkpoint_and_an_export_alike(trained_run, exported, monkeypatch):
    """--device-map was ignored for a run checkpoint (left on the CPU) and placed only an export's MLLM; now both
    load through one placement: the MLLM loaded with the device map (accelerate dispatches it where there are
    GPUs), every other part on its input device, the language model's and vision tower's outputs brought back
    there. (On this CPU machine every device is the CPU and transformers does not dispatch.)"""
    from ppcr.model import model as model_module
    from ppcr.model import saving

    asked = []
    for module in (model_module, saving):
        monkeypatch.setattr(
            module,
            "load_mllm",
            lambda *a, _f=module.load_mllm, **k: (asked.append(k.get("device_map")), _f(*a, **k))[1],
        )
    image, expression = examples()[0]
    plain = ppcr.Segmenter.from_pretrained(trained_run, device="cpu")(image, expression)
    for path in (trained_run, exported / "model"):
        asked.clear()
        segmenter = ppcr.Segmenter.from_pretrained(path, device_map="auto")
        model = segmenter.model
        assert asked == ["auto"], path  # the MLLM loaded with the map, for a run checkpoint too
        first = model.mllm.get_input_embeddings().weight.device
        assert {p.device for n, p in model.named_parameters() if not n.startswith("mllm.")} == {first}
        assert all(
            getattr(m, "_hf_hook", None) is not None
            for m in (model.family.language_model, *model.family.vision_modules)
        )
        if path == trained_run:
            result = segmenter(image, expression)
            assert result.spatial_answer == plain.spatial_answer and np.array_equal(result.mask, plain.mask)


def test_model_overrides_an_export_cannot_take_are_refused(exported):
    from ppcr.config import ConfigError

    with pytest.raises(ConfigError, match="config key 'model.lora' cannot apply to an export: its weights fix"):
        load_checkpoint(exported / "model", ["model.lora.rank=4"])
    model, cfg, _, _ = load_checkpoint(exported / "model", ["model.max_new_tokens=5", "eval.batch_size=2"])
    assert model.cfg.max_new_tokens == cfg.model.max_new_tokens == 5 and cfg.eval.batch_size == 2

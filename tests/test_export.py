"""Export from a 2-rank ZeRO-3 checkpoint, loading with peft alone, the layout before safetensors, publishing to
the hub under the network opt-in, and ppcr-infer."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from huggingface_hub import constants, metadata_load
from peft import PeftModel
from PIL import Image
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText

from ppcr.data.shards import decode_sample, iter_tar_samples, load_manifest
from ppcr.eval.infer import main as infer_main
from ppcr.model.export import main as export_main
from ppcr.model.fingerprint import FINGERPRINT_FILE, UnverifiedBaseWarning
from ppcr.model.predict import predict
from ppcr.model.saving import EXPORT_FILE, EXPORT_VERSION, load_checkpoint, load_pretrained


def val_samples(tiny_shards, n):
    """Decoded val samples, images as (H, W, 3) arrays: what a user hands to predict and ppcr-infer."""
    shard = load_manifest(tiny_shards)["splits"]["val"]["shards"][0]
    samples = [decode_sample(raw) for raw in list(iter_tar_samples(tiny_shards / shard["name"]))[:n]]
    return [dict(s, image=s["image"].permute(1, 2, 0).numpy()) for s in samples]


def test_export_predicts_the_checkpoints_masks(trained_run, exported, tiny_shards):
    from_ckpt, _, run_dir, tag = load_checkpoint(trained_run)
    assert run_dir == trained_run
    assert tag == "step_00000003"
    from_export, _ = load_pretrained(exported / "model")
    samples = val_samples(tiny_shards, 3)
    images = [s["image"] for s in samples]
    expressions = [s["meta"]["sentences"][0] for s in samples]
    a, b = predict(from_ckpt, images, expressions), predict(from_export, images, expressions)
    for x, y in zip(a, b):
        assert x.semantic_answer == y.semantic_answer and x.spatial_answer == y.spatial_answer
        assert torch.allclose(x.box, y.box, atol=1e-5)
        assert torch.equal(x.mask, y.mask)


def test_adapters_load_with_peft_alone(exported):
    base = AutoModelForImageTextToText.from_pretrained(exported / "model/mllm")
    peft_model = PeftModel.from_pretrained(base, exported / "model/adapters/semantic", adapter_name="semantic")
    peft_model.load_adapter(exported / "model/adapters/spatial", adapter_name="spatial")
    ours, _ = load_pretrained(exported / "model")
    theirs = dict(peft_model.named_parameters())
    for name, p in ours.mllm.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, theirs[name]), name
    trained_b = [p for n, p in theirs.items() if "lora_B" in n and ".spatial" in n]
    assert any(p.abs().sum() > 0 for p in trained_b)  # the branch learned something


def test_infer_writes_mask_overlay_and_json_and_reports_bad_requests(exported, tiny_shards, tmp_path, capsys):
    sample = val_samples(tiny_shards, 1)[0]
    image = tmp_path / "photo.png"
    Image.fromarray(sample["image"]).save(image)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert (
        infer_main(
            [
                "--checkpoint",
                str(exported / "model"),
                "--image",
                str(image),
                "--expression",
                sample["meta"]["sentences"][0],
                "--out",
                str(out),
            ]
        )
        == 0
    )
    mask = np.array(Image.open(out / "photo.mask.png"))
    assert mask.shape == sample["image"].shape[:2]
    result = json.loads((out / "photo.json").read_text())
    assert {"semantic_answer", "spatial_answer", "box_cxcywh", "timings_s"} <= set(result)
    assert Image.open(out / "photo.overlay.png").size == (sample["image"].shape[1], sample["image"].shape[0])

    requests = tmp_path / "requests.jsonl"
    requests.write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"image": str(image), "expression": "the thing", "id": "good"},
                {"image": str(tmp_path / "missing.png"), "expression": "x"},
                {"image": str(broken), "expression": "x"},
                {"image": str(image), "expression": "  "},
            ]
        )
        + "\n{not json\n"
    )
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(exported / "model"), "--jsonl", str(requests), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{requests}:2: image not found" in err and f"{requests}:3: cannot read image" in err
    assert f"{requests}:4: empty expression" in err and f"{requests}:5: line is not a request object" in err
    assert (out / "good.mask.png").is_file()


def test_infer_masks_an_exif_rotated_photo_in_the_orientation_a_viewer_shows(exported, tmp_path, capsys):
    from test_images import exif_rotated_jpeg

    exif_rotated_jpeg(tmp_path / "phone.jpg")  # stored 40 x 60, shown 60 x 40
    assert (
        infer_main(
            [
                "--checkpoint",
                str(exported / "model"),
                "--image",
                str(tmp_path / "phone.jpg"),
                "--expression",
                "the red part",
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert np.array(Image.open(tmp_path / "out/phone.mask.png")).shape == (60, 40)
    assert Image.open(tmp_path / "out/phone.overlay.png").size == (40, 60)
    assert "rotated as its EXIF orientation (6) says" in capsys.readouterr().out


def test_an_export_with_sams_state_as_a_pickle_still_loads(exported, tmp_path):
    """Exports written before SAM's state went into safetensors hold sam.pth (config.yaml names it)."""
    old = tmp_path / "old"
    shutil.copytree(exported / "model", old)
    torch.save(load_file(old / "sam.safetensors"), old / "sam.pth")
    (old / "sam.safetensors").unlink()
    cfg = yaml.safe_load((old / "config.yaml").read_text())
    assert cfg["model"]["sam_checkpoint"] == "sam.safetensors"
    cfg["model"]["sam_checkpoint"] = "sam.pth"
    (old / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (old / FINGERPRINT_FILE).unlink()  # exports of that time recorded no base fingerprint: loaded with a warning
    (old / EXPORT_FILE).unlink()  # nor a layout version: theirs is version 1
    with pytest.warns(UnverifiedBaseWarning, match="records no fingerprint"):
        a = load_pretrained(old)[0].sam.sam.state_dict()
    b = load_pretrained(exported / "model")[0].sam.sam.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_export_of_another_layout_version_is_refused_naming_the_file_and_field(exported, tmp_path, capsys):
    """A newer ppcr's export (another ppcr_export.json format_version) would be misread: load_pretrained and
    ppcr-infer refuse it with the file, the field and what to do, as they do an unreadable record."""
    assert json.loads((exported / "model" / EXPORT_FILE).read_text()) == {"format_version": EXPORT_VERSION}
    other = tmp_path / "other"
    shutil.copytree(exported / "model", other)
    (other / EXPORT_FILE).write_text(json.dumps({"format_version": EXPORT_VERSION + 1}))
    message = f"{other / EXPORT_FILE}: format_version {EXPORT_VERSION + 1} is not {EXPORT_VERSION}, an export of"
    with pytest.raises(ValueError, match="format_version 2 is not 1, an export of another ppcr"):
        load_pretrained(other)
    image = tmp_path / "x.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(image)
    argv = ["--checkpoint", str(other), "--image", str(image), "--expression", "the circle", "--out", str(tmp_path)]
    assert infer_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "ppcr-export --checkpoint RUN" in err
    (other / EXPORT_FILE).write_text("[1]")
    with pytest.raises(ValueError, match=f"{other / EXPORT_FILE}: not a readable export record"):
        load_pretrained(other)


def test_push_to_hub_is_refused_without_the_network_opt_in(exported, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "out"
    assert export_main(["--checkpoint", str(exported / "model"), "--out", str(out), "--push-to-hub", "org/name"]) == 2
    err = capsys.readouterr().err
    assert "error: --push-to-hub org/name: ppcr does not reach the network unless you opt in" in err
    assert "HF_HUB_OFFLINE=0" in err and not out.exists()  # refused before any work
    assert export_main(["--checkpoint", str(exported / "model"), "--out", str(out), "--push-to-hub", "a/b/c"]) == 2
    assert "is not a hub repo id 'org/name'" in capsys.readouterr().err


def test_push_to_hub_with_the_opt_in_reaches_the_hub_and_keeps_the_export(exported, tmp_path):
    """HF_HUB_OFFLINE=0 (in a fresh process: the hub reads it at import) and an endpoint that refuses
    connections: the upload is tried, fails with the hub client's connection error, and the export (of an
    export: its card keeps the run's facts) stays."""
    out = tmp_path / "again"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    env.update(
        HF_HUB_OFFLINE="0",
        HF_ENDPOINT="http://127.0.0.1:9",
        HF_TOKEN="hf_test",
        HF_HOME=str(tmp_path / "hf"),
        OMP_NUM_THREADS="1",
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppcr.model.export",
            "--checkpoint",
            str(exported / "model"),
            "--out",
            str(out),
            "--push-to-hub",
            "someorg/ppcr-test",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    assert "error: could not upload" in done.stderr and "someorg/ppcr-test" in done.stderr
    assert "Connection refused" in done.stderr and "OfflineModeIsEnabled" not in done.stderr
    before, after = (metadata_load(d / "README.md")["ppcr"] for d in (exported / "model", out))
    assert after == before and after["training"]["checkpoint"] == "trained/step_00000003"
    assert (out / "sam.safetensors").is_file() and load_pretrained(out)[0] is not None

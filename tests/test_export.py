"""Export from a 2-rank ZeRO-3 checkpoint, loading with peft alone, merging, and ppcr-infer."""

import json

import numpy as np
import torch
from peft import PeftModel
from PIL import Image
from transformers import AutoModelForImageTextToText

from ppcr.model.predict import predict
from ppcr.data.shards import decode_sample, iter_tar_samples, load_manifest
from ppcr.eval.infer import main as infer_main
from ppcr.model.saving import load_checkpoint, load_pretrained


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


def test_adapters_load_with_peft_alone_and_merge_gives_a_plain_model(exported):
    base = AutoModelForImageTextToText.from_pretrained(exported / "model/mllm")
    peft_model = PeftModel.from_pretrained(base, exported / "model/adapters/semantic", adapter_name="semantic")
    peft_model.load_adapter(exported / "model/adapters/spatial", adapter_name="spatial")
    ours, _ = load_pretrained(exported / "model")
    theirs = dict(peft_model.named_parameters())
    for name, p in ours.mllm.named_parameters():
        if "lora_" in name:
            assert torch.equal(p, theirs[name]), name
    trained_b = [p for n, p in theirs.items() if "lora_B" in n and ".spatial" in n]
    assert any(p.abs().sum() > 0 for p in trained_b)  # the branch learned something to merge

    merged = AutoModelForImageTextToText.from_pretrained(exported / "merged")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    key = "model.language_model.layers.0.self_attn.q_proj.weight"
    fresh = AutoModelForImageTextToText.from_pretrained(exported / "model/mllm")
    assert not torch.equal(dict(merged.named_parameters())[key], dict(fresh.named_parameters())[key])
    peft_model.set_adapter("spatial")
    peft_model.eval()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = peft_model.model.model.language_model(input_ids=ids).last_hidden_state
        got = merged.model.language_model(input_ids=ids).last_hidden_state
    assert torch.allclose(expected, got, atol=1e-4)


def test_infer_writes_mask_overlay_and_json_and_reports_bad_requests(exported, tiny_shards, tmp_path, capsys):
    sample = val_samples(tiny_shards, 1)[0]
    image = tmp_path / "photo.png"
    Image.fromarray(sample["image"]).save(image)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out = tmp_path / "out"
    assert infer_main(["--checkpoint", str(exported / "model"), "--image", str(image), "--expression",
                       sample["meta"]["sentences"][0], "--out", str(out)]) == 0
    mask = np.array(Image.open(out / "photo.mask.png"))
    assert mask.shape == sample["image"].shape[:2]
    result = json.loads((out / "photo.json").read_text())
    assert {"semantic_answer", "spatial_answer", "box_cxcywh", "timings_s"} <= set(result)
    assert Image.open(out / "photo.overlay.png").size == (sample["image"].shape[1], sample["image"].shape[0])

    requests = tmp_path / "requests.jsonl"
    requests.write_text("\n".join(json.dumps(r) for r in [
        {"image": str(image), "expression": "the thing", "id": "good"},
        {"image": str(tmp_path / "missing.png"), "expression": "x"},
        {"image": str(broken), "expression": "x"},
        {"image": str(image), "expression": "  "},
    ]) + "\n{not json\n")
    capsys.readouterr()
    assert infer_main(["--checkpoint", str(exported / "model"), "--jsonl", str(requests), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert f"{requests}:2: image not found" in err and f"{requests}:3: cannot read image" in err
    assert f"{requests}:4: empty expression" in err and f"{requests}:5: line is not a request object" in err
    assert (out / "good.mask.png").is_file()


def test_infer_masks_an_exif_rotated_photo_in_the_orientation_a_viewer_shows(exported, tmp_path, capsys):
    from test_images import exif_rotated_jpeg

    exif_rotated_jpeg(tmp_path / "phone.jpg")  # stored 40 x 60, shown 60 x 40
    assert infer_main(["--checkpoint", str(exported / "model"), "--image", str(tmp_path / "phone.jpg"),
                       "--expression", "the red part", "--out", str(tmp_path / "out")]) == 0
    assert np.array(Image.open(tmp_path / "out/phone.mask.png")).shape == (60, 40)
    assert Image.open(tmp_path / "out/phone.overlay.png").size == (40, 60)
    assert "rotated as its EXIF orientation (6) says" in capsys.readouterr().out

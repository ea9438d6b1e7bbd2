import sys
from dataclasses import replace

import pytest
import torch
from segment_anything import sam_model_registry

from ppcr.config import ModelConfig, SamArchConfig
from ppcr.model.sam import SAM_ARCHS, SamSegmenter, build_sam, load_sam
from ppcr.model.tiny import save_tiny_sam


def test_tiny_checkpoint_loads_through_the_same_path(tmp_path):
    cfg = ModelConfig(sam_type="tiny", sam_checkpoint=str(tmp_path / "sam.pth"), sam_image_size=128)
    save_tiny_sam(cfg.sam_arch, 128, cfg.sam_checkpoint, seed=3)
    saved = torch.load(cfg.sam_checkpoint, weights_only=True)
    sam = load_sam(cfg)
    for k, v in sam.state_dict().items():
        assert torch.equal(v, saved[k]), k
    seg = SamSegmenter(sam)
    emb = seg.encode(torch.zeros(2, 3, 128, 128, dtype=torch.uint8), torch.tensor([[96, 128], [128, 80]]))
    assert emb.shape == (2, cfg.sam_arch.prompt_dim, 8, 8)
    low = seg.decode(emb, torch.tensor([[10.0, 10, 60, 50], [0, 0, 127, 127]]), torch.randn(2, cfg.sam_arch.prompt_dim))
    assert low.shape == (2, 32, 32)
    assert seg.to_original(low[0], (96, 128), (150, 200)).shape == (150, 200)


@pytest.mark.parametrize("size", ["vit_b", "vit_l", "vit_h"])
def test_one_builder_makes_segment_anythings_released_sizes(size):
    """build_sam from SAM_ARCHS lays out the very modules segment_anything's registry builds (on the meta
    device: no memory), so Meta's checkpoints load into it."""
    with torch.device("meta"):
        ours, theirs = build_sam(SAM_ARCHS[size], 1024), sam_model_registry[size]()
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }
    assert repr(ours) == repr(theirs)


def test_released_sam_layout_loads_through_segment_anything_registry(tmp_path):
    path = tmp_path / "sam_vit_b.pth"
    torch.manual_seed(0)
    reference = sam_model_registry["vit_b"]()
    torch.save(reference.state_dict(), path)
    sam = load_sam(ModelConfig(sam_type="vit_b", sam_checkpoint=str(path), sam_image_size=1024))
    name = "mask_decoder.iou_token.weight"
    assert torch.equal(sam.state_dict()[name], reference.state_dict()[name])
    assert sam.image_encoder.img_size == 1024


def test_missing_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model.sam_checkpoint: no SAM checkpoint at .*nope.pth"):
        load_sam(ModelConfig(sam_checkpoint=str(tmp_path / "nope.pth")))
    with pytest.raises(
        FileNotFoundError,
        match=r"get Meta.s SAM vit_h: https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",
    ):
        load_sam(ModelConfig(sam_checkpoint=str(tmp_path / "nope.pth"), sam_type="vit_h", sam_image_size=1024))
    path = save_tiny_sam(SamArchConfig(encoder_dim=32), 128, tmp_path / "small.pth")
    with pytest.raises(ValueError, match=r"does not fit model.sam_type 'tiny' and model.sam_arch"):
        load_sam(ModelConfig(sam_checkpoint=str(path), sam_image_size=128))
    with pytest.raises(ValueError, match=r"does not fit model.sam_type 'vit_b'"):
        load_sam(ModelConfig(sam_type="vit_b", sam_checkpoint=str(path), sam_image_size=1024))
    ok = save_tiny_sam(SamArchConfig(), 128, tmp_path / "ok.pth")
    with pytest.raises(ValueError, match=r"sam_pixel_mean/std"):
        load_sam(replace(ModelConfig(sam_checkpoint=str(ok), sam_image_size=128), sam_pixel_mean=[0.0, 0.0, 0.0]))


def test_sam_gathers_the_weights_its_prompt_modules_read_under_zero3_outside_the_engine(tmp_path):
    """Validation and prediction call SAM outside the engine's forward; once ZeRO-3 has released the
    prompt embeddings (size-0 partitions), they must still be gathered for the modules that read them."""
    from launching import free_port, run

    script = f"""
import os, torch, deepspeed
os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="{free_port()}")
deepspeed.init_distributed(dist_backend="gloo")
from ppcr.config import ModelConfig
from ppcr.model.sam import SamSegmenter, load_sam
from ppcr.model.tiny import save_tiny_sam
cfg = ModelConfig(sam_type="tiny", sam_checkpoint="{tmp_path / "sam.pth"}", sam_image_size=128)
save_tiny_sam(cfg.sam_arch, 128, cfg.sam_checkpoint)
seg = SamSegmenter(load_sam(cfg))
torch.manual_seed(0)
images, sizes = torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8), torch.tensor([[128, 128], [96, 128]])
boxes, sem = torch.tensor([[10.0, 10, 60, 50], [0, 0, 127, 127]]), torch.randn(2, cfg.sam_arch.prompt_dim)
with torch.no_grad():
    expected = seg.decode(seg.encode(images, sizes), boxes, sem)
ds = {{"train_micro_batch_size_per_gpu": 1, "zero_optimization": {{"stage": 3, "stage3_param_persistence_threshold": 0,
      "stage3_max_live_parameters": 0, "stage3_max_reuse_distance": 0}}}}
engine, *_ = deepspeed.initialize(model=seg, optimizer=torch.optim.AdamW(seg.parameters()), config=ds)
print("RELEASED", seg.sam.prompt_encoder.point_embeddings[2].weight.numel() == 0)
with torch.no_grad():
    got = engine.module.decode(engine.module.encode(images, sizes), boxes, sem)
print("MATCH", bool(torch.allclose(got, expected, atol=1e-5)))
"""
    out = run([sys.executable, "-c", script])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "RELEASED True" in out.stdout and "MATCH True" in out.stdout


@pytest.mark.parametrize("prompts", ["box+semsp", "box", "semsp"])
def test_batched_decode_equals_sams_own_decoder_run_per_image(tmp_path, prompts):
    cfg = ModelConfig(sam_type="tiny", sam_checkpoint=str(tmp_path / "sam.pth"), sam_image_size=128)
    save_tiny_sam(cfg.sam_arch, 128, cfg.sam_checkpoint, seed=1)
    seg = SamSegmenter(load_sam(cfg))
    torch.manual_seed(0)
    emb = seg.encode(torch.randint(0, 256, (3, 3, 128, 128), dtype=torch.uint8), torch.tensor([[128, 128]] * 3))
    boxes = torch.tensor([[10.0, 10, 60, 50], [0, 0, 127, 127], [40, 30, 90, 120]]) if "box" in prompts else None
    sem = torch.randn(3, cfg.sam_arch.prompt_dim) if "semsp" in prompts else None
    sam = seg.sam
    reference = []
    for i in range(3):  # segment_anything's MaskDecoder.forward: one image at a time
        sparse, dense = sam.prompt_encoder(points=None, boxes=None if boxes is None else boxes[i : i + 1], masks=None)
        if sem is not None:
            sparse = torch.cat([sparse, sem[i : i + 1, None]], dim=1)
        low, _ = sam.mask_decoder(
            image_embeddings=emb[i : i + 1],
            image_pe=sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        reference.append(low[:, 0])
    assert torch.allclose(seg.decode(emb, boxes, sem), torch.cat(reference), atol=1e-5)


def test_normalize_on_the_device_equals_sams_own_preprocess(tmp_path):
    cfg = ModelConfig(sam_type="tiny", sam_checkpoint=str(tmp_path / "sam.pth"), sam_image_size=128)
    save_tiny_sam(cfg.sam_arch, 128, cfg.sam_checkpoint)
    seg = SamSegmenter(load_sam(cfg))
    torch.manual_seed(0)
    sizes = [(96, 128), (128, 70)]
    frames = torch.zeros(2, 3, 128, 128, dtype=torch.uint8)
    expected = []
    for i, (h, w) in enumerate(sizes):
        image = torch.randint(0, 256, (3, h, w), dtype=torch.uint8)
        frames[i, :, :h, :w] = image
        expected.append(seg.sam.preprocess(image.float()[None])[0])  # segment_anything: mean/std, then pad
    assert torch.allclose(seg.normalize(frames, torch.tensor(sizes)), torch.stack(expected), atol=1e-5)

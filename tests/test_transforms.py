import os

import numpy as np
import pytest
import torch
from conftest import make_config, train_set
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from ppcr.data.shards import decode_sample, iter_tar_samples, load_manifest
from ppcr.data.stream import EvalStream, ShardSet, prepare
from ppcr.data.transforms import Preprocessor, hflip, swap_left_right, xywh_to_norm_cxcywh

PRE = Preprocessor(mllm_image_size=32, sam_image_size=64)


@pytest.mark.parametrize(
    "text,expected",
    [
        ("the square left of the red circle", "the square right of the red circle"),
        ("the leftmost star", "the rightmost star"),
        ("the oval on the Right", "the oval on the Left"),
        ("LEFT", "RIGHT"),
        ("the leftover cake at the top", "the leftover cake at the top"),
        ("the man's left-hand glove", "the man's right-hand glove"),
    ],
)
def test_swap_left_right(text, expected):
    assert swap_left_right(text) == expected


def test_hflip_mirrors_image_mask_box_and_words():
    image = torch.zeros((3, 10, 20), dtype=torch.uint8)
    mask = torch.zeros((10, 20), dtype=torch.uint8)
    mask[2:5, 1:4] = 1  # x in [1, 4)
    image[:, mask == 1] = 255
    img2, mask2, box2, text = hflip(image, mask, [1, 2, 3, 3], "the box on the left")
    ys, xs = torch.nonzero(mask2, as_tuple=True)
    assert (int(xs.min()), int(xs.max()) + 1) == (16, 19) and box2 == [16, 2, 3, 3]
    assert int((img2[0] == 255).sum()) == int(mask2.sum()) == 9 and text == "the box on the right"


def test_preprocess_resizes_longest_side_and_pads():
    image = torch.full((3, 30, 60), 200, dtype=torch.uint8)  # wide: longest side 60 -> 64, height 32
    mask = torch.zeros((30, 60), dtype=torch.uint8)
    mask[:, 30:] = 1
    out = PRE(image, mask, [30, 0, 30, 30])
    assert out["original_size"] == (30, 60) and out["input_size"] == (32, 64)
    x = out["sam_image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.uint8  # SAM's mean/std come on the device
    assert (x[:, :32] == 200).all() and (x[:, 32:] == 0).all()  # the image, then padding below it
    m = out["sam_mask"]
    assert m.shape == (64, 64) and m[:32, 32:].all() and not m[:32, :32].any() and not m[32:].any()
    assert torch.equal(out["mask"], mask)
    assert torch.allclose(out["box"], torch.tensor([0.75, 0.5, 0.5, 1.0]))
    assert out["mllm_image"].shape == (3, 32, 32) and out["mllm_image"].dtype == torch.uint8


def test_box_normalisation_clamps_into_the_unit_square():
    assert torch.allclose(xywh_to_norm_cxcywh([-1, 0, 12, 10], 10, 10), torch.tensor([0.5, 0.5, 1.0, 1.0]))


def test_training_and_evaluation_share_the_preprocessing(tiny_shards):
    cfg = make_config(tiny_shards)
    pre = Preprocessor.from_config(cfg.model)
    shard = load_manifest(tiny_shards)["splits"]["val"]["shards"][0]
    sample = decode_sample(next(iter_tar_samples(tiny_shards / shard["name"])))
    direct = pre(sample["image"], sample["mask"], sample["meta"]["bbox"])
    batch = next(iter(EvalStream(ShardSet.open(tiny_shards.parent, train_set(tiny_shards, "val")), pre, 1, 0, 1)))
    assert torch.equal(batch["sam_images"][0], direct["sam_image"])
    assert torch.equal(batch["mllm_images"][0], direct["mllm_image"])
    assert torch.equal(batch["boxes"][0], direct["box"]) and torch.equal(batch["masks"][0], direct["mask"])
    flipped = prepare(sample, 0, True, pre)
    assert torch.equal(flipped["mask"], direct["mask"].flip(-1))
    assert torch.isclose(flipped["box"][0], 1 - direct["box"][0], atol=1e-5)


def test_resampling_matches_sams_resize_and_a_pil_bicubic_within_one_level(tiny_shards):
    shard = load_manifest(tiny_shards)["splits"]["train"]["shards"][0]
    image = decode_sample(next(iter_tar_samples(tiny_shards / shard["name"])))["image"]
    out = Preprocessor(mllm_image_size=48, sam_image_size=128)(image)
    hwc = image.permute(1, 2, 0).numpy()
    sam = ResizeLongestSide(128).apply_image(hwc)  # segment_anything's own transform, through PIL
    ih, iw = out["input_size"]
    assert sam.shape[:2] == (ih, iw)
    mine = out["sam_image"][:, :ih, :iw].permute(1, 2, 0).numpy().astype(int)
    assert np.abs(mine - sam.astype(int)).max() <= 1
    pil = np.asarray(Image.fromarray(hwc).resize((48, 48), Image.BICUBIC)).astype(int)
    assert np.abs(out["mllm_image"].permute(1, 2, 0).numpy().astype(int) - pil).max() <= 1


def test_pil_decoder_gives_torchcodecs_pixels_on_shard_members(tiny_shards):
    """The fallback decoder (a torch TorchCodec does not load with) must not change what a model sees:
    every JPEG and mask PNG of a shard decodes to the same tensor both ways."""
    from ppcr.data import transforms

    if transforms.IMAGE_DECODER != "torchcodec":
        pytest.skip(f"TorchCodec does not load here ({transforms.IMAGE_DECODER})")
    tar = sorted(tiny_shards.glob("train-*.tar"))[0]
    raws = list(iter_tar_samples(tar))
    assert raws
    for raw in raws:
        for member, gray in (("jpg", False), ("mask.png", True)):
            ours, theirs = transforms._decode_pil(raw[member], gray), transforms._decode(raw[member], gray)
            assert ours.dtype == torch.uint8 and ours.shape == theirs.shape and torch.equal(ours, theirs), member


def test_pil_decoder_refuses_broken_data_as_value_error(tiny_shards):
    """Shard reading turns RuntimeError/ValueError into SampleError; PIL's OSError must arrive as one."""
    from ppcr.data import transforms

    raw = next(iter_tar_samples(sorted(tiny_shards.glob("train-*.tar"))[0]))
    for broken in (b"", b"not an image", raw["jpg"][: len(raw["jpg"]) // 3]):
        with pytest.raises(ValueError, match="does not decode"):
            transforms._decode_pil(broken)


def test_decoding_falls_back_to_pil_where_torchcodec_does_not_load(tiny_shards):
    """In a process where TorchCodec cannot be imported (as with a torch it was not built for), ppcr
    still decodes shards, with PIL, and says why once."""
    import subprocess
    import sys

    tar = sorted(tiny_shards.glob("train-*.tar"))[0]
    code = (
        "import sys, warnings; sys.modules['torchcodec'] = None\n"  # import torchcodec -> ImportError
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from ppcr.data import transforms\n"
        "from ppcr.data.shards import decode_sample, iter_tar_samples\n"
        f"s = decode_sample(next(iter_tar_samples({str(tar)!r})))\n"
        "print(transforms.IMAGE_DECODER); print([str(x.message) for x in w if 'PIL' in str(x.message)])\n"
        "print(tuple(s['image'].shape), s['image'].dtype, int(s['mask'].sum()) > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr
    decoder, warned, sample = out.stdout.splitlines()
    assert decoder.startswith("pil: TorchCodec unusable with torch") and "No module named 'torchcodec" in decoder
    assert "images decode with PIL instead" in warned
    assert sample.startswith("(3, ") and "torch.uint8 True" in sample

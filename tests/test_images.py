"""A user's image as a viewer shows it (ppcr.data.images): EXIF orientation, odd modes, size limits."""

import numpy as np
import pytest
from PIL import Image

from ppcr.data.images import ImageError, load_image


def exif_rotated_jpeg(path, orientation=6):
    """A 40 x 60 (h x w) stored image whose EXIF tag says: turn it 90 degrees clockwise to view."""
    stored = np.zeros((40, 60, 3), np.uint8)
    stored[:, :30] = (250, 0, 0)  # left half red as stored: the top half once turned
    im = Image.fromarray(stored)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif, quality=95)
    return stored


def test_exif_orientation_is_applied_and_said(tmp_path):
    exif_rotated_jpeg(tmp_path / "phone.jpg")
    loaded = load_image(tmp_path / "phone.jpg")
    assert loaded.pixels.shape == (60, 40, 3)  # turned: what a viewer shows
    assert loaded.pixels[5, 20, 0] > 200 and loaded.pixels[55, 20, 0] < 50  # red on top after the turn
    assert any("EXIF orientation (6)" in n for n in loaded.notes)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "plain.jpg")
    assert load_image(tmp_path / "plain.jpg").notes == []


def test_sixteen_bit_grey_scales_by_its_range(tmp_path):
    values = np.linspace(0, 65535, 50 * 30).reshape(50, 30).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "depth.png")
    loaded = load_image(tmp_path / "depth.png")
    assert loaded.pixels.shape == (50, 30, 3) and loaded.pixels.dtype == np.uint8
    assert loaded.pixels[0, 0, 0] == 0 and loaded.pixels[-1, -1, 0] == 255  # not clipped to 255 at value 255
    assert 120 <= loaded.pixels[25, 0, 0] <= 135
    assert any("16-bit" in n for n in loaded.notes)


def test_grey_and_transparent_images_become_rgb(tmp_path):
    Image.fromarray(np.full((10, 12), 77, np.uint8)).save(tmp_path / "grey.png")
    grey = load_image(tmp_path / "grey.png")
    assert grey.pixels.shape == (10, 12, 3) and (grey.pixels == 77).all() and grey.notes

    rgba = np.zeros((10, 12, 4), np.uint8)
    rgba[..., 2] = 200
    rgba[:, :6, 3] = 255  # left half opaque blue, right half fully transparent
    Image.fromarray(rgba).save(tmp_path / "cutout.png")
    cut = load_image(tmp_path / "cutout.png")
    assert tuple(cut.pixels[0, 0]) == (0, 0, 200) and tuple(cut.pixels[0, 11]) == (255, 255, 255)
    assert any("transparency" in n for n in cut.notes)


def test_missing_broken_and_too_large_images_are_refused_with_the_reason(tmp_path):
    with pytest.raises(ImageError, match="image not found"):
        load_image(tmp_path / "nothing.jpg")
    (tmp_path / "fake.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "fake.jpg")
    good = tmp_path / "cut.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(good)
    (tmp_path / "truncated.jpg").write_bytes(good.read_bytes()[:300])
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(tmp_path / "truncated.jpg")
    Image.new("1", (9000, 8000)).save(tmp_path / "huge.png")  # 72 MP, a small file
    with pytest.raises(ImageError, match=r"9000 x 8000 px \(72 MP\); images up to 64 MP"):
        load_image(tmp_path / "huge.png")


def test_a_pil_image_or_an_array_is_taken_as_a_file_is(tmp_path):
    exif_rotated_jpeg(tmp_path / "phone.jpg")
    with Image.open(tmp_path / "phone.jpg") as im:
        loaded = load_image(im)  # a PIL image a user opened: its EXIF orientation applies too
    assert np.array_equal(loaded.pixels, load_image(tmp_path / "phone.jpg").pixels)
    assert loaded.pixels.shape == (60, 40, 3) and any("EXIF orientation (6)" in n for n in loaded.notes)
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    assert np.array_equal(load_image(rgb).pixels, rgb) and load_image(rgb).notes == []
    depth = load_image(np.full((4, 5), 65535, np.uint16))
    assert (depth.pixels == 255).all() and "16-bit grey scaled to 8 bits" in depth.notes
    assert (load_image(np.full((4, 5), 0.5)).pixels == 128).all()  # a float grey in [0, 1]
    with pytest.raises(ImageError, match=r"image array of shape \(4, 5, 2\) and dtype uint8: give"):
        load_image(np.zeros((4, 5, 2), np.uint8))
    with pytest.raises(ImageError, match="a float grey must lie in"):
        load_image(np.full((4, 5), 3.0))
    with pytest.raises(ImageError, match=r"the PIL image is 9000 x 8000 px \(72 MP\)"):
        load_image(Image.new("1", (9000, 8000)))

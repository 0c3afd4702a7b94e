"""Image inputs: paths, PIL images and arrays; EXIF orientation; odd modes; broken files."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gclip.errors import ImageError
from gclip.io.images import load_image


def _exif_rotated(tmp_path, rgb):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise when displayed
    Image.fromarray(rgb).save(path, exif=exif, quality=100)
    return path


def test_exif_orientation_is_applied(tmp_path, rgb_image):
    out = load_image(_exif_rotated(tmp_path, rgb_image))
    assert out.shape == (83, 61, 3)  # width and height swapped as displayed


@pytest.mark.parametrize(
    ("mode", "make"),
    [
        ("L", lambda a: Image.fromarray(a[..., 0])),
        ("RGBA", lambda a: Image.fromarray(np.dstack([a, np.full(a.shape[:2], 128, np.uint8)]))),
        ("P", lambda a: Image.fromarray(a).convert("P")),
        ("I;16", lambda a: Image.fromarray(a[..., 0].astype(np.uint16) * 257)),
        ("CMYK", lambda a: Image.fromarray(a).convert("CMYK")),
        ("1", lambda a: Image.fromarray(a[..., 0] > 127)),
    ],
)
def test_modes_become_rgb_uint8(tmp_path, rgb_image, mode, make):
    img = make(rgb_image)
    assert img.mode == mode
    path = tmp_path / f"x.{'tif' if mode == 'CMYK' else 'png'}"
    img.save(path)
    for source in (img, path):
        out = load_image(source)
        assert out.shape == (61, 83, 3) and out.dtype == np.uint8
    if mode in ("L", "I;16"):
        assert np.array_equal(load_image(path)[..., 1], rgb_image[..., 0])


@pytest.mark.parametrize(
    ("array", "expected_shape"),
    [
        (np.zeros((5, 6, 3), np.uint8), (5, 6, 3)),
        (np.zeros((5, 6), np.uint8), (5, 6, 3)),
        (np.zeros((5, 6, 4), np.uint8), (5, 6, 3)),
        (np.full((5, 6, 3), 65535, np.uint16), (5, 6, 3)),
    ],
)
def test_arrays(array, expected_shape):
    out = load_image(array)
    assert out.shape == expected_shape and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing.jpg", "no such file"),
        (lambda p: (p / "empty.jpg").write_bytes(b"") and p / "empty.jpg" or p / "empty.jpg", "empty file"),
        (lambda p: (p / "text.jpg").write_text("hello") and p / "text.jpg", "cannot decode image"),
        (lambda p: np.zeros((4, 4, 3), np.float32), "dtype float32"),
        (lambda p: np.zeros((4, 4, 2), np.uint8), "shape"),
        (lambda p: np.zeros((0, 4, 3), np.uint8), "zero size"),
    ],
)
def test_bad_images_raise_one_line(tmp_path, make, message):
    with pytest.raises(ImageError, match=message) as info:
        load_image(make(tmp_path))
    assert "\n" not in str(info.value)


def test_truncated_and_oversized(tmp_path, rgb_image):
    Image.fromarray(rgb_image).save(tmp_path / "full.jpg")
    data = (tmp_path / "full.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="cut.jpg: cannot decode"):
        load_image(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match="above the limit"):
        load_image(tmp_path / "full.jpg", max_pixels=100)

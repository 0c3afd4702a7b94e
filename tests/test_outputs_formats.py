"""Output formats: COCO RLE (numpy encoder vs pycocotools), per-class records, label PNGs, overlays, legends."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gclip import SegmentationResult
from gclip.io.outputs import (
    _counts_to_string,
    class_colours,
    legend_entries,
    legend_font,
    legend_image,
    legend_text,
    overlay_image,
    palette,
    read_label_png,
    rle_counts,
    rle_decode,
    rle_encode,
    rle_records,
    write_label_png,
    write_legend,
    write_overlay,
    write_rle_json,
)


def _masks() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    masks = [np.zeros((5, 7), bool), np.ones((3, 4), bool), np.eye(6, dtype=bool), np.zeros((1, 1), bool)]
    for _ in range(40):
        h, w = rng.integers(1, 60, 2)
        masks.append(rng.random((h, w)) < rng.random())
    big = np.zeros((300, 400), bool)
    big[20:250, 30:390] = True  # long runs: multi-character counts
    masks.append(big)
    return masks


@pytest.mark.parametrize("mask", _masks(), ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_rle_round_trip_and_numpy_encoder(mask):
    text = _counts_to_string(rle_counts(mask))
    assert np.array_equal(rle_decode({"size": list(mask.shape), "counts": text}), mask)
    assert np.array_equal(rle_decode({"size": list(mask.shape), "counts": rle_counts(mask)}), mask)
    assert np.array_equal(rle_decode(rle_encode(mask)), mask)
    assert sum(rle_counts(mask)) == mask.size


@pytest.mark.parametrize("mask", _masks()[:12], ids=lambda m: f"{m.shape[0]}x{m.shape[1]}-{int(m.sum())}")
def test_numpy_rle_equals_pycocotools(mask):
    mask_utils = pytest.importorskip("pycocotools.mask")
    theirs = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    assert _counts_to_string(rle_counts(mask)) == theirs["counts"].decode("ascii")
    assert np.array_equal(mask_utils.decode({"size": list(mask.shape), "counts": rle_encode(mask)["counts"]}), mask)


def test_rle_records_describe_each_class(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.zeros((20, 30), np.int32)
    labels[2:9, 5:12] = 2
    labels[15:, 25:] = 3
    probs = rng.random((4, 20, 30)).astype(np.float32)
    result = SegmentationResult(labels, ["a", "b", "c", "d"], probs=probs)
    records = {r["category_name"]: r for r in rle_records(result)}
    assert set(records) == {"a", "c", "d"}  # "b" is absent
    c = records["c"]
    assert c["category_id"] == 2 and c["area"] == 49 and c["bbox"] == [5, 2, 7, 7]
    assert c["mean_probability"] == pytest.approx(float(probs[2][labels == 2].mean()), abs=1e-4)
    assert records["d"]["bbox"] == [25, 15, 5, 5]
    for r in records.values():
        assert np.array_equal(rle_decode(r["segmentation"]), labels == r["category_id"])
    path = write_rle_json(result, tmp_path / "x.rle.json", image="x.jpg")
    data = json.loads(path.read_text())
    assert (data["height"], data["width"]) == (20, 30) and len(data["annotations"]) == 3
    assert rle_records(SegmentationResult(labels, ["a", "b", "c", "d"]))[0]["mean_probability"] is None


def test_label_png_8_and_16_bit(tmp_path):
    small = np.arange(12, dtype=np.int32).reshape(3, 4)
    big = small * 100  # up to 1100 classes: 16-bit
    assert np.array_equal(read_label_png(write_label_png(small, tmp_path / "s.png")), small)
    assert np.array_equal(read_label_png(write_label_png(big, tmp_path / "b.png")), big)


def test_label_png_unlabeled_pixels_round_trip_and_no_class_is_black(tmp_path):
    from PIL import Image

    labels = np.array([[0, 1, -1], [2, -1, 0]], dtype=np.int32)
    path = write_label_png(labels, tmp_path / "u.png")
    assert np.array_equal(read_label_png(path), labels)
    with Image.open(path) as img:
        assert img.mode == "P" and np.asarray(img)[0, 2] == 255  # unlabeled: 255 in 8-bit files
        colours = np.array(img.getpalette()[:768]).reshape(256, 3)
    assert colours[:3].any(axis=1).all() and not colours[255].any()  # classes coloured, unlabeled black
    big = np.where(labels < 0, -1, labels * 300)
    assert np.array_equal(read_label_png(write_label_png(big, tmp_path / "b.png")), big)  # 16-bit: 65535
    with Image.open(write_label_png(labels, tmp_path / "bg.png", background=True)) as img:
        assert img.getpalette()[:3] == [0, 0, 0]  # a background class 0 is black, as in VOC's files
    with pytest.raises(ValueError, match="-1: unlabeled"):
        write_label_png(labels - 1, tmp_path / "bad.png")


def test_class_colours_are_never_black_without_a_background():
    assert class_colours(1000).any(axis=1).all()
    assert not class_colours(21, background=True)[0].any() and class_colours(21, background=True)[1:].any(axis=1).all()
    assert np.array_equal(class_colours(5, background=True), palette(5))


def test_overlay_is_the_photo_size_and_colours_the_first_class(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "supervision", None)  # the plain alpha blend
    image = np.full((30, 40, 3), 200, np.uint8)
    labels = np.zeros((30, 40), np.int32)
    labels[:, 20:] = 2
    labels[:5, :5] = -1
    img = overlay_image(image, labels, ["cat", "dog", "sky"], alpha=0.5)
    assert img.size == (40, 30)  # no legend strip: the legend is its own image
    arr = np.asarray(img)
    colours = class_colours(3)
    for x in (10, 25):  # the first class is coloured like any other, not darkened
        expected = np.round(image[10, x] * 0.5 + colours[labels[10, x]] * 0.5).astype(np.uint8)
        assert np.array_equal(arr[10, x], expected)
    assert arr[10, 10].mean() > 100 and np.array_equal(arr[0, 0], image[0, 0])  # unlabeled: the photo
    with_background = np.asarray(overlay_image(image, labels, ["background", "dog", "sky"], background=True))
    assert np.array_equal(with_background[10, 10], image[10, 10])  # a background class is left uncoloured
    path = write_overlay(image, labels, ["cat", "dog", "sky"], tmp_path / "o.png")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="differ in size"):
        overlay_image(image, labels[:10], ["cat", "dog", "sky"])


def test_legend_rows_read_name_space_percentage_and_draw_non_ascii(tmp_path):
    from PIL import ImageDraw, ImageFont

    labels = np.zeros((10, 10), np.int32)
    labels[:, 6:] = 1
    labels[0, :] = -1
    entries = legend_entries(labels, ["café", "ёлка"])
    assert [(n, round(f, 2)) for n, _, f in entries] == [("café", 0.54), ("ёлка", 0.36), ("unlabeled", 0.1)]
    assert entries[0][1] != (0, 0, 0) and entries[-1][1] == (0, 0, 0)
    one = legend_image(np.zeros((4, 4), np.int32), ["cat", "dog"])
    three = legend_image(labels, ["café", "ёлка"])
    assert three.height > one.height  # one row per entry
    assert write_legend(labels, ["café", "ёлка"], tmp_path / "x.legend.png").is_file()
    font = legend_font()
    assert isinstance(font, ImageFont.FreeTypeFont)
    probe = ImageDraw.Draw(one)

    def ink(text: str) -> bytes:
        return bytes(font.getmask(text))

    missing = ink("\ue000")  # a private-use code point: no font has it, it draws the "missing" box
    for char in "éёΩж":
        assert ink(char) != missing, char
    assert legend_text("cat", 0.12) == "cat 12.0%"
    assert probe.textlength("cat 12.0%", font=font) > probe.textlength("cat12.0%", font=font)  # a drawn space


def test_supervision_overlay_matches_the_plain_blend(monkeypatch):
    pytest.importorskip("supervision")
    import sys

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    labels = rng.integers(-1, 4, (24, 32)).astype(np.int32)  # -1: unlabeled
    names = ["a", "b", "c", "d"]
    drawn = [np.asarray(overlay_image(image, labels, names, 0.4, bg)).astype(int) for bg in (False, True)]
    monkeypatch.setitem(sys.modules, "supervision", None)
    plain = [np.asarray(overlay_image(image, labels, names, 0.4, bg)).astype(int) for bg in (False, True)]
    for d, p in zip(drawn, plain):
        assert d.shape == p.shape and np.abs(d - p).max() <= 1
    assert np.array_equal(drawn[1][labels <= 0], image[labels <= 0])  # background and unlabeled: the photo

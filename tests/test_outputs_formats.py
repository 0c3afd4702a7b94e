"""Output formats: COCO RLE (numpy encoder vs pycocotools), per-class records, overlays with a legend."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gclip import SegmentationResult
from gclip.io.outputs import (
    _counts_to_string,
    overlay_image,
    palette,
    read_label_png,
    rle_counts,
    rle_decode,
    rle_encode,
    rle_records,
    write_label_png,
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


def test_overlay_blends_and_adds_a_legend(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "supervision", None)  # the plain alpha blend
    image = np.full((30, 40, 3), 200, np.uint8)
    labels = np.zeros((30, 40), np.int32)
    labels[:, 20:] = 2
    img = overlay_image(image, labels, ["cat", "dog", "sky"], alpha=0.5)
    assert img.width >= 40 and img.height > 30
    arr = np.asarray(img)
    colours = palette()
    expected = np.round(image[0, 25] * 0.5 + colours[2] * 0.5).astype(np.uint8)
    assert np.array_equal(arr[0, 25], expected) and np.array_equal(arr[0, 5], np.round(image[0, 5] * 0.5))
    one_class = overlay_image(image, np.zeros((30, 40), np.int32), ["cat", "dog", "sky"])
    assert one_class.height < img.height  # one legend row instead of two
    path = write_overlay(image, labels, ["cat", "dog", "sky"], tmp_path / "o.png")
    assert path.is_file() and not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(ValueError, match="differ in size"):
        overlay_image(image, labels[:10], ["cat", "dog", "sky"])


def test_supervision_overlay_matches_the_plain_blend(monkeypatch):
    pytest.importorskip("supervision")
    import sys

    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (24, 32)).astype(np.int32)
    names = ["a", "b", "c", "d"]
    drawn = np.asarray(overlay_image(image, labels, names, alpha=0.4)).astype(int)
    monkeypatch.setitem(sys.modules, "supervision", None)
    plain = np.asarray(overlay_image(image, labels, names, alpha=0.4)).astype(int)
    assert drawn.shape == plain.shape and np.abs(drawn - plain).max() <= 1

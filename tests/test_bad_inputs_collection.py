"""A malformed-input corpus: each bad file is one line in the summary, the others are segmented, no traceback."""

from __future__ import annotations

import io
import json
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from collection_helpers import CLASSES, CLI_SETTINGS, synthetic_image
from conftest import TINY
from gclip.cli import main
from gclip.io.images import load_image
from gclip.io.outputs import read_label_png


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _huge_png() -> bytes:
    """A valid PNG header declaring 100000 x 100000 pixels (a decompression bomb), with almost no data."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def _jpeg(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def make_corpus(root):
    """``(bad names, good names -> expected (H, W))``."""
    rgb = Image.fromarray(synthetic_image(3, (48, 64)))
    full = _jpeg(rgb)
    (root / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image\n")
    (root / "huge.png").write_bytes(_huge_png())
    Image.new("RGB", (1, 1), (10, 200, 30)).save(root / "one_pixel.png")
    rgba = np.dstack([synthetic_image(4, (30, 20)), np.full((30, 20), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    rgb.convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray(synthetic_image(5, (25, 35))[..., 0].astype(np.uint16) * 257).save(root / "deep16.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (root / "rotated.jpg").write_bytes(_jpeg(rgb, exif=exif.tobytes()))
    bad = ["empty.jpg", "huge.png", "text.jpg", "truncated.jpg"]
    good = {"one_pixel": (1, 1), "rgba": (30, 20), "cmyk": (48, 64), "deep16": (25, 35), "rotated": (64, 48)}
    return bad, good


@pytest.mark.parametrize(
    "name,message",
    [
        ("truncated.jpg", "truncated"),
        ("empty.jpg", "empty file"),
        ("text.jpg", "cannot identify"),
        ("huge.png", "decompression bomb"),
        ("missing.jpg", "no such file"),
    ],
)
def test_load_image_gives_one_line_errors(tmp_path, name, message):
    from gclip.errors import ImageError

    make_corpus(tmp_path)
    with pytest.raises(ImageError, match=message) as info:
        load_image(tmp_path / name)
    assert "\n" not in str(info.value) and name in str(info.value)


def test_corpus_through_the_cli(tmp_path, tiny_checkpoint, capfd):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    bad, good = make_corpus(corpus)
    out = tmp_path / "out"
    argv = [
        "segment",
        str(corpus),
        "--classes",
        ",".join(CLASSES),
        "--out",
        str(out),
        "--format",
        "png,overlay,rle,manifest",
        "--model",
        TINY,
        "--pretrained",
        str(tiny_checkpoint),
        "--device",
        "cpu",
        "--workers",
        "2",
        "--no-progress",
        *CLI_SETTINGS,
    ]
    code = main(argv)
    err = capfd.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    failed_lines = [line for line in err.splitlines() if line.startswith("gclip: failed: ")]
    assert sorted(line.split(": ")[2].rsplit("/", 1)[-1] for line in failed_lines) == bad
    assert f"{len(good)} segmented, 0 already done, {len(bad)} failed of {len(good) + len(bad)}" in err
    for key, size in good.items():
        assert read_label_png(out / f"{key}.png").shape == size, key
    records = {json.loads(line)["key"]: json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()}
    assert sorted(k for k, r in records.items() if "error" in r) == sorted(b.rsplit(".", 1)[0] for b in bad)
    # Bad images are retried on a rerun (and fail again); good ones are skipped.
    assert main(argv) == 1
    assert f"0 segmented, {len(good)} already done, {len(bad)} failed" in capfd.readouterr().err

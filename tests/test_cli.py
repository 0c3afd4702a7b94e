"""`gclip segment` and `python -m gclip`: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import TINY
from gclip.cli import main
from gclip.io.outputs import read_label_png


def _write(tmp_path, rgb):
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    return tmp_path / "photo.jpg"


def test_segment_writes_palettized_png_and_json(tmp_path, tiny_checkpoint, rgb_image, capsys):
    image = _write(tmp_path, rgb_image)
    code = main(
        [
            "segment",
            str(image),
            "--classes",
            "cat,dog,sky",
            "--model",
            TINY,
            "--pretrained",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--crop",
            "32",
            "--stride",
            "16",
            "--short-side",
            "40",
            "--method",
            "naclip",
        ]
    )
    assert code == 0
    with Image.open(tmp_path / "out" / "photo.png") as png:
        assert png.mode == "P" and png.size == (83, 61)
    labels = read_label_png(tmp_path / "out" / "photo.png")
    record = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert record["class_names"] == ["cat", "dog", "sky"] and record["size"] == [61, 83]
    assert record["settings"]["method"] == "naclip" and record["settings"]["crop"] == 32
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert sum(record["present"].values()) == pytest.approx(1.0, abs=1e-4)
    assert not list((tmp_path / "out").glob(".*tmp"))


def test_segment_goes_on_past_bad_images(tmp_path, tiny_checkpoint, rgb_image, capsys):
    image = _write(tmp_path, rgb_image)
    (tmp_path / "broken.jpg").write_text("not an image")
    code = main(
        [
            "segment",
            str(tmp_path / "broken.jpg"),
            str(image),
            "--classes-file",
            str(_classes(tmp_path)),
            "--model",
            TINY,
            "--pretrained",
            str(tiny_checkpoint),
            "--out",
            str(tmp_path / "out"),
            "--method-options",
            '{"emerging_blocks": [0]}',
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "broken.jpg: cannot decode image" in err and "1 segmented, 0 already done, 1 failed" in err
    assert (tmp_path / "out" / "photo.png").is_file() and not (tmp_path / "out" / "broken.png").exists()


def _classes(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("cat, kitten\ndog\n")
    return path


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--classes", "a,a"], "names 'a' twice"),
        (["--classes", "a,b", "--method", "nope"], "unknown method 'nope'"),
        (["--classes", "a,b", "--method-options", "{bad"], "--method-options is not valid JSON"),
        (["--classes", "a,b", "--crop", "32", "--stride", "64"], "stride"),
        (["--classes", "a,b", "--model", "ViT-Q-1"], "unknown model 'ViT-Q-1'"),
    ],
)
def test_usage_errors_exit_2_with_one_line(tmp_path, tiny_checkpoint, capsys, args, message):
    base = ["segment", "x.jpg", "--out", str(tmp_path), "--model", TINY, "--pretrained", str(tiny_checkpoint)]
    assert main(base + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gclip: error:") and message in err and "\n" not in err


@pytest.mark.heavy
def test_python_dash_m_reports_a_bad_checkpoint_without_traceback(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 64)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gclip",
            "segment",
            "x.jpg",
            "--classes",
            "a,b",
            "--pretrained",
            str(bad),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gclip: error: cannot read checkpoint")
    assert "--pretrained" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


@pytest.mark.heavy
def test_real_photo_with_local_random_vitb16(tmp_path, sample_data, vitb16_checkpoint):
    photo = sorted((sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages").glob("*.jpg"))[0]
    templates = tmp_path / "templates.txt"  # 3 templates instead of 80: the text tower dominates CPU time here
    templates.write_text("a photo of a {c}.\na bad photo of a {c}.\na photo of the {c}.\n")
    code = main(
        [
            "segment",
            str(photo),
            "--classes",
            "person,dog,cat,car,sky,grass",
            "--model",
            "ViT-B-16",
            "--pretrained",
            str(vitb16_checkpoint),
            "--quick-gelu",
            "--out",
            str(tmp_path / "out"),
            "--templates",
            str(templates),
        ]
    )
    assert code == 0
    with Image.open(photo) as original, Image.open(tmp_path / "out" / f"{photo.stem}.png") as png:
        assert png.size == original.size and png.mode == "P"
        assert np.asarray(png).max() < 6

"""Outputs that cannot be written: one line and a non-zero exit code, no partial file, and a rerun resumes."""

from __future__ import annotations

import errno
import json
import tempfile

import numpy as np
import pytest
from PIL import Image

from collection_helpers import CLI_SETTINGS, write_images
from conftest import TINY
from gclip.cli import main
from gclip.io.outputs import read_label_png


def _args(inputs, out, checkpoint) -> list[str]:
    return [
        "segment",
        str(inputs),
        "--out",
        str(out),
        "--classes",
        "cat,dog,sky",
        "--model",
        TINY,
        "--pretrained",
        str(checkpoint),
        "--format",
        "png,overlay,manifest",
        "--workers",
        "0",
        "--no-progress",
        *CLI_SETTINGS,
    ]


def _one_error_line(err: str) -> str:
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("gclip: error: ")
    return lines[0]


def test_out_is_a_file_is_one_line_before_the_model_loads(tmp_path, capsys):
    write_images(tmp_path / "in", ["a.png"])
    (tmp_path / "out").write_text("keep me")
    # A missing checkpoint: the output folder must be checked before the model is loaded.
    code = main(_args(tmp_path / "in", tmp_path / "out", tmp_path / "missing.pt"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(tmp_path / "out") in line and "is a file" in line
    assert (tmp_path / "out").read_text() == "keep me"


def test_unwritable_out_is_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch):
    # Tests run as root, whom permissions do not stop: refuse file creation in the folder as a read-only mount would.
    write_images(tmp_path / "in", ["a.png"])
    out = tmp_path / "out"
    out.mkdir()
    real_mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):  # noqa: A002 - tempfile's own name
        if dir is not None and str(dir).startswith(str(out)):
            raise PermissionError(errno.EACCES, "Permission denied", str(dir))
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    code = main(_args(tmp_path / "in", out, tmp_path / "missing.pt"))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(out) in line and "Permission denied" in line
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("error", [errno.ENOSPC, errno.EACCES])
def test_a_write_failing_mid_run_is_one_line_and_a_rerun_resumes(tmp_path, tiny_checkpoint, capsys, monkeypatch, error):
    """A full disk (or a folder turned read-only) at the second image's overlay, as PIL reports it: the files
    already written stay whole, the half-written one is removed, and a rerun finishes the run as a clean run does."""
    write_images(tmp_path / "in", ["a.png", "b.png", "c.png"])
    out = tmp_path / "out"
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        if ".b.overlay.png." in str(fp):
            with open(fp, "wb") as f:
                f.write(b"\x89PNG partial")
            raise OSError(error, "No space left on device" if error == errno.ENOSPC else "Permission denied")
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", full_disk)
    code = main(_args(tmp_path / "in", out, tiny_checkpoint))
    line = _one_error_line(capsys.readouterr().err)
    assert code == 2 and str(out / "b.overlay.png") in line and ("No space" in line or "Permission" in line)
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    assert not (out / "b.overlay.png").exists() and (out / "a.overlay.png").is_file()
    monkeypatch.setattr(Image.Image, "save", real_save)

    assert main(_args(tmp_path / "in", out, tiny_checkpoint)) == 0
    assert "2 segmented, 1 already done" in capsys.readouterr().err
    assert main(_args(tmp_path / "in", tmp_path / "clean", tiny_checkpoint)) == 0

    def records(folder):
        lines = (folder / "manifest.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]

    assert records(out) == records(tmp_path / "clean")
    for key in "abc":
        assert np.array_equal(read_label_png(out / f"{key}.png"), read_label_png(tmp_path / "clean" / f"{key}.png"))
        assert (out / f"{key}.overlay.png").read_bytes() == (tmp_path / "clean" / f"{key}.overlay.png").read_bytes()

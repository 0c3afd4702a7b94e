"""Kill-and-resume: a run killed with SIGKILL mid-way, then resumed, ends byte-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gclip
from collection_helpers import CLASSES, CLI_SETTINGS, write_images
from conftest import HERE, TINY
from gclip.cli import main

N_IMAGES = 24
_RUNNER = "import sys, open_clip; open_clip.add_model_config(sys.argv[1]); from gclip.cli import main; "
_RUNNER += "sys.exit(main(sys.argv[2:]))"


def _argv(inputs: Path, out: Path, checkpoint: Path) -> list[str]:
    return [
        "segment",
        str(inputs),
        "--classes",
        ",".join(CLASSES),
        "--out",
        str(out),
        "--format",
        "png,overlay,rle,json,manifest",
        "--model",
        TINY,
        "--pretrained",
        str(checkpoint),
        "--device",
        "cpu",
        "--images-per-batch",
        "3",
        "--no-progress",
        *CLI_SETTINGS,
    ]


def _tree(out: Path) -> dict[str, bytes]:
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    manifest = [json.loads(line) for line in files.pop("manifest.jsonl").decode().splitlines()]
    for record in manifest:
        record.pop("seconds")  # wall time: the only field that differs between two runs
    files["manifest.jsonl"] = json.dumps(manifest).encode()
    return files


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_sigkill_then_resume_is_byte_identical(tmp_path, tiny_checkpoint):
    inputs = tmp_path / "in"
    write_images(inputs, [f"{d}/{n:02d}.jpg" for d in ("a", "b") for n in range(N_IMAGES // 2)], size=(40, 52))
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    assert main(_argv(inputs, reference, tiny_checkpoint)) == 0

    env = {**os.environ, "PYTHONPATH": str(Path(gclip.__file__).parents[1])}
    cmd = [sys.executable, "-c", _RUNNER, str(HERE / "configs"), *_argv(inputs, resumed, tiny_checkpoint)]
    log = tmp_path / "killed.log"
    with open(log, "wb") as stderr:
        # Its own process group, so the kill takes the decoding workers too (as a preempted job's would).
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + 120
    manifest = resumed / "manifest.jsonl"  # one line per complete image

    def complete() -> int:
        return manifest.read_bytes().count(b"\n") if manifest.is_file() else 0

    while complete() < N_IMAGES // 4 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL, log.read_text()[-2000:]
    written = len(list(resumed.rglob("*.rle.json")))
    assert 0 < written < N_IMAGES, f"the run was killed mid-way ({written} images written)"
    print(f"killed after {written} of {N_IMAGES} images")

    assert main(_argv(inputs, resumed, tiny_checkpoint)) == 0
    assert not [p for p in resumed.rglob("*") if p.name.endswith(".tmp")]
    ref, res = _tree(reference), _tree(resumed)
    assert sorted(ref) == sorted(res)
    assert [name for name in ref if ref[name] != res[name]] == []
    assert len(ref) == 4 * N_IMAGES + 1

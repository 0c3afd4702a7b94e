"""Decode workers end with the run that started them, however it ends (``kill -9`` included)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from collection_helpers import write_images
from conftest import HERE, TINY

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc")

CLI = """
import sys
import open_clip
open_clip.add_model_config(sys.argv[1])
from gclip.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _stat(pid: int) -> tuple[str, int, int] | None:
    """``(state, parent pid, start time)`` of a live process, or ``None`` when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[19])


def _children(pid: int) -> dict[int, int]:
    """``{child pid: start time}`` of the live children of ``pid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None and stat[1] == pid and stat[0] != "Z":
                found[int(entry.name)] = stat[2]
    return found


def _alive(pids: dict[int, int]) -> list[int]:
    """Those of ``pids`` still running (same start time, not a zombie)."""
    alive = []
    for pid, start in pids.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == start and stat[0] != "Z":
            alive.append(pid)
    return alive


def _gone_within(pids: dict[int, int], seconds: float) -> list[int]:
    """Wait up to ``seconds`` for the processes to end; the ones still alive then."""
    deadline = time.monotonic() + seconds
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _alive(pids)


def test_kill_9_of_a_run_leaves_no_decode_worker(tmp_path, tiny_checkpoint):
    # Images big enough that a decoded one does not fit a pipe's buffer, and a model slow enough (many small
    # windows) that the workers have decoded ahead when the run is killed: they are then blocked writing to it.
    write_images(tmp_path / "in", [f"{k:02d}.jpg" for k in range(16)], size=(300, 400))
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), "--out", str(out), "--classes", "cat,dog", "--model", TINY]
    args += ["--pretrained", str(tiny_checkpoint), "--format", "png,overlay", "--workers", "2"]
    args += ["--images-per-batch", "1", "--crop", "32", "--stride", "16", "--no-progress"]
    run = subprocess.Popen(
        [sys.executable, "-c", CLI, str(HERE / "configs"), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    workers: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and run.poll() is None:
            workers.update(_children(run.pid))
            if len(workers) >= 2 and list(out.glob("*.png")):  # workers exist and the model is running
                break
            time.sleep(0.1)
        assert run.poll() is None, run.stderr.read().decode()[-2000:] if run.stderr else ""
        assert len(workers) >= 2, "the run started no decode workers"
        time.sleep(1.0)  # the workers decode ahead of the model
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        assert _gone_within(workers, 20) == [], "decode workers outlived the killed run"
    finally:
        for pid in _alive(workers):
            os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
        run.wait(timeout=30)


FORKED_WATCHER = """
import os, sys, time
from gclip.engines.workers import die_with_parent
parent = os.getpid()
child = os.fork()
if child == 0:
    die_with_parent(parent, use_prctl=False, interval=0.1)
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""


def test_the_fallback_without_prctl_also_ends_the_worker():
    """Where ``prctl`` is unavailable, a thread that watches the parent's pid ends the worker."""
    run = subprocess.Popen([sys.executable, "-c", FORKED_WATCHER], stdout=subprocess.PIPE, text=True)
    worker: dict[int, int] = {}
    try:
        pid = int(run.stdout.readline())  # type: ignore[union-attr]
        stat = _stat(pid)
        assert stat is not None and stat[1] == run.pid
        worker = {pid: stat[2]}
        time.sleep(0.5)
        assert _alive(worker) == [pid]  # alive while its parent lives
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
        assert _gone_within(worker, 20) == []
    finally:
        for pid in _alive(worker):
            os.kill(pid, signal.SIGKILL)
        if run.poll() is None:
            run.kill()
        run.wait(timeout=30)


def _negate(x: int) -> int:
    if x == 3:
        raise ValueError("three")
    return -x


def _failed(x: int, e: Exception) -> str:
    return f"{x}: {e}"


@pytest.mark.parametrize("workers", [0, 2])
def test_map_in_workers_keeps_order_and_reports_failures(workers):
    from gclip.engines.workers import map_in_workers

    batches = list(map_in_workers(_negate, list(range(7)), _failed, batch_size=3, workers=workers))
    assert batches == [[0, -1, -2], ["3: three", -4, -5], [-6]]


START_METHOD = """
import multiprocessing, sys
from gclip.engines.workers import map_in_workers
from test_worker_lifetime import _failed, _negate
if __name__ == "__main__":
    multiprocessing.set_start_method(sys.argv[1])
    print(list(map_in_workers(_negate, [1, 2, 4], _failed, batch_size=2, workers=2)))
"""


@pytest.mark.heavy
def test_workers_started_by_a_fork_server_run(tmp_path):
    """A fork server, not the caller, is then the workers' parent: they bind their life to it (it ends with the
    caller) instead of taking it for a dead caller."""
    script = tmp_path / "run.py"
    script.write_text(START_METHOD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run(
        [sys.executable, str(script), "forkserver"], capture_output=True, text=True, timeout=240, env=env
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split("\n")[0] == "[[-1, -2], [-4]]"

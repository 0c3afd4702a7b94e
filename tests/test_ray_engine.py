"""The Ray engine on a local Ray instance (2 CPUs) writes the same label maps as the local engine."""

from __future__ import annotations

import json

import numpy as np
import pytest

import gclip
from collection_helpers import CLASSES, SETTINGS, write_images
from gclip.io.outputs import read_label_png

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def test_ray_engine_matches_local_engine(tiny_model, tmp_path, local_ray):
    write_images(tmp_path / "in", ["a/x.jpg", "b/x.jpg", "b/y.png", "c.png", "d.png"])
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    seg = gclip.Segmenter(tiny_model, method="gclip", classes=CLASSES, **SETTINGS)
    formats = "png,rle,overlay,manifest"
    local = gclip.segment_folder(seg, tmp_path / "in", tmp_path / "local", formats, workers=0, progress=False)
    spec = gclip.SegmenterSpec.from_segmenter(seg)
    on_ray = gclip.segment_folder(
        spec, tmp_path / "in", tmp_path / "ray", formats, engine="ray", images_per_batch=2, concurrency=1
    )
    assert (
        (on_ray.done, [p for p, _ in on_ray.failed])
        == (local.done, [p for p, _ in local.failed])
        == (5, [str(tmp_path / "in" / "broken.jpg")])
    )
    keys = ["a/x", "b/x", "b/y", "c", "d"]
    for key in keys:
        assert np.array_equal(
            read_label_png(tmp_path / "ray" / f"{key}.png"), read_label_png(tmp_path / "local" / f"{key}.png")
        )
        rle_ray = json.loads((tmp_path / "ray" / f"{key}.rle.json").read_text())["annotations"]
        rle_local = json.loads((tmp_path / "local" / f"{key}.rle.json").read_text())["annotations"]
        assert [a["segmentation"] for a in rle_ray] == [a["segmentation"] for a in rle_local]
    records = [json.loads(line) for line in (tmp_path / "ray" / "manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in records] == ["a/x", "b/x", "b/y", "broken", "c", "d"]
    again = gclip.segment_folder(spec, tmp_path / "in", tmp_path / "ray", formats, engine="ray")
    assert (again.done, again.skipped, len(again.failed)) == (0, 5, 1)


def test_an_actors_error_reaches_the_user_as_one_line():
    """Ray wraps an actor's exception in one that carries the remote traceback as its text (and is also an instance of
    the original class): the run reports the original one-line error, or one line of what Ray says."""
    from ray.exceptions import ActorDiedError, RayTaskError

    from gclip.engines.ray_engine import actor_error
    from gclip.errors import GclipError, OutputError

    line = "out/a.png: cannot write (No space left on device); the same command resumes the run"
    remote = "Traceback (most recent call last):\n  File 'writer.py', line 9\ngclip.errors.OutputError: " + line
    wrapped = RayTaskError("SegmentActor.__call__", remote, OutputError(line)).as_instanceof_cause()
    assert isinstance(wrapped, GclipError) and "\n" in str(wrapped)  # what reached the CLI before
    error = actor_error(wrapped)
    assert isinstance(error, OutputError) and str(error) == line
    outer = RuntimeError("ray data: a task failed")
    outer.__cause__ = wrapped
    assert str(actor_error(outer)) == line
    died = actor_error(ActorDiedError())
    assert isinstance(died, GclipError) and "\n" not in str(died) and str(died).startswith("a Ray worker failed: ")

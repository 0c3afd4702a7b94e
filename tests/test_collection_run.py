"""Segmenting a collection: every format checked against the predictions, resume, overwrite, stale files."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import gclip
from collection_helpers import CLASSES, SETTINGS, synthetic_image, write_images
from gclip.diagnostics.bench import StageTimer
from gclip.engines import InputItem, Manifest, OutputWriter, collect_inputs, plan_run
from gclip.engines.local import _Reader
from gclip.io.outputs import read_label_png, rle_decode

ALL = "png,overlay,legend,rle,json,manifest"


@pytest.fixture(scope="module")
def seg(tiny_model):
    return gclip.Segmenter(tiny_model, method="gclip", classes=CLASSES, **SETTINGS)


def _check_outputs(seg, out, items):
    """Every format of every item agrees with ``seg.predict`` on the same image."""
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["key"] for r in manifest] == sorted(i.key for i in items)
    by_key = {r["key"]: r for r in manifest}
    for item in items:
        expected = seg.predict(item.path, return_probs=True)
        labels = read_label_png(out / f"{item.key}.png")
        assert np.array_equal(labels, expected.labels), item.key
        rle = json.loads((out / f"{item.key}.rle.json").read_text())
        decoded = np.full(expected.size, -1)
        for ann in rle["annotations"]:
            mask = rle_decode(ann["segmentation"])
            assert ann["area"] == mask.sum() and ann["category_name"] == CLASSES[ann["category_id"]]
            mean = expected.probs[ann["category_id"]][mask].mean()
            assert ann["mean_probability"] == pytest.approx(mean, abs=2e-4)
            decoded[mask] = ann["category_id"]
        assert np.array_equal(decoded, expected.labels)
        record = by_key[item.key]
        assert record["size"] == list(expected.size) and record["method"] == "gclip"
        assert record["classes"] == pytest.approx(expected.class_fractions(), abs=1e-6)
        with Image.open(out / f"{item.key}.overlay.png") as overlay:
            assert overlay.size == expected.size[::-1]  # the photo's size; the legend is its own file
        with Image.open(out / f"{item.key}.legend.png") as legend:
            assert legend.height > 16 * len(expected.class_fractions())
        assert json.loads((out / f"{item.key}.json").read_text())["present"].keys() == record["classes"].keys()


def test_every_format_matches_the_predictions(seg, tmp_path):
    write_images(tmp_path / "in", ["a/x.jpg", "b/x.jpg", "b/c/y.png", "z.png"])
    summary = gclip.segment_folder(seg, tmp_path / "in", tmp_path / "out", ALL, workers=2, images_per_batch=3)
    assert (summary.done, summary.skipped, summary.failed) == (4, 0, [])
    items = collect_inputs([tmp_path / "in"])
    _check_outputs(seg, tmp_path / "out", items)
    assert not list((tmp_path / "out").rglob("*.tmp"))


def test_real_photos(seg, sample_data, tmp_path):
    photos = sorted((sample_data / "VOCdevkit").rglob("*.jpg"))[:3]
    assert photos, "the sample has VOC photos"
    big = gclip.Segmenter(seg.model, method="gclip", classes=CLASSES, short_side=64, crop=64, stride=48)
    summary = gclip.segment_folder(big, photos, tmp_path / "out", ALL, workers=0, progress=False)
    assert summary.done == 3 and not summary.failed
    _check_outputs(big, tmp_path / "out", collect_inputs(photos))


def test_rerun_skips_complete_images_and_overwrite_redoes(seg, tmp_path):
    write_images(tmp_path / "in", [f"{n}.png" for n in range(5)])
    out = tmp_path / "out"
    first = gclip.segment_folder(seg, tmp_path / "in", out, "png,manifest", workers=0, progress=False)
    assert first.done == 5
    (out / "3.png").unlink()
    (out / ".1.png.abc123.tmp").write_bytes(b"partial")  # left by a killed run
    (out / ".other.png.abc123.tmp").write_bytes(b"not ours")  # another shard's temporary: kept
    again = gclip.segment_folder(seg, tmp_path / "in", out, "png,manifest", workers=0, progress=False)
    assert (again.done, again.skipped) == (1, 4)
    assert not (out / ".1.png.abc123.tmp").exists() and (out / ".other.png.abc123.tmp").exists()
    forced = gclip.segment_folder(seg, tmp_path / "in", out, "png,manifest", workers=0, overwrite=True)
    assert (forced.done, forced.skipped) == (5, 0)
    assert len((out / "manifest.jsonl").read_text().splitlines()) == 5
    changed = gclip.Segmenter(seg.model, method="clearclip", classes=CLASSES, **SETTINGS)
    assert gclip.segment_folder(changed, tmp_path / "in", out, "png,manifest", workers=0).done == 5


def test_a_rerun_with_nothing_to_do_does_not_load_the_model(tmp_path, tiny_checkpoint, monkeypatch):
    import dataclasses
    import os
    import shutil

    from conftest import TINY
    from gclip.engines import SegmenterSpec

    write_images(tmp_path / "in", [f"{n}.png" for n in range(3)])
    weights = tmp_path / "tiny.pt"
    shutil.copy(tiny_checkpoint, weights)
    spec = SegmenterSpec(TINY, str(weights), device="cpu", classes=CLASSES, settings=dict(SETTINGS))
    loads = []
    build = SegmenterSpec.build
    monkeypatch.setattr(SegmenterSpec, "build", lambda self: loads.append(1) or build(self))

    def run(spec, formats="png,manifest"):
        return gclip.segment_folder(spec, tmp_path / "in", tmp_path / "out", formats, workers=0, progress=False)

    assert (run(spec).done, len(loads)) == (3, 1)
    assert (run(spec).skipped, len(loads)) == (3, 1)  # all done with the same recipe: no model load
    assert (run(spec, "png").skipped, len(loads)) == (3, 1)  # no manifest: the files alone, as before
    (tmp_path / "out" / "1.png").unlink()
    assert (run(spec).done, len(loads)) == (1, 2)
    changed = dataclasses.replace(spec, settings={**SETTINGS, "stride": 24})
    assert (run(changed).done, len(loads)) == (3, 3)  # changed settings still recompute
    assert (run(dataclasses.replace(spec, classes=CLASSES[::-1])).done, len(loads)) == (3, 4)
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the weights file touched
    assert (run(spec).done, len(loads)) == (3, 5)  # back to the first settings
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 2 * 10**9))  # touched again, same weights:
    assert (run(spec).done, len(loads)) == (0, 6)  # loaded, the outputs are still valid, and now recorded so
    assert (run(spec).skipped, len(loads)) == (3, 6)


def test_manifest_drops_cut_lines_and_duplicates(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"key": "b", "v": 1}\n{"key": "a", "v": 1}\n{"key": "b", "v": 2}\n{"key": "c", "v"')
    manifest = Manifest(path)
    assert manifest.compact() == {"a": {"key": "a", "v": 1}, "b": {"key": "b", "v": 2}}
    manifest.append({"key": "c", "v": 3})
    manifest.close()
    assert [json.loads(line)["key"] for line in path.read_text().splitlines()] == ["a", "b", "c"]


def test_with_thresholds_the_settings_hash_knows_where_they_send_pixels(seg):
    """Outputs made when prob_thd sent uncertain pixels to the first class are not taken for today's."""
    from gclip.engines.run import _description

    assert "background" not in _description(seg)  # no threshold: the labels do not depend on it
    thresholded = gclip.Segmenter(seg.model, method="gclip", classes=CLASSES, prob_thd=0.3, **SETTINGS)
    assert _description(thresholded)["background"] is False
    thresholded.set_classes(["background", *CLASSES])
    assert _description(thresholded)["background"] is True


def test_plan_run_needs_the_manifest_record(seg, tmp_path):
    item = InputItem(str(tmp_path / "x.png"), "x")
    writer = OutputWriter(tmp_path / "out", ("png", "manifest"), {"model": "m"})
    writer.paths(item)["png"].parent.mkdir(parents=True)
    writer.paths(item)["png"].write_bytes(b"png")  # file written, killed before its manifest line
    manifest = Manifest(tmp_path / "out" / "manifest.jsonl")
    assert plan_run(writer, [item], False, manifest) == [item]
    manifest.append({"key": "x", "settings_hash": writer.hash})
    assert plan_run(writer, [item], False, manifest) == []


def test_iter_segment_and_the_worker_preparer(seg, tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "c.jpg").write_text("not an image")
    results = list(gclip.iter_segment(seg, tmp_path, images_per_batch=2, workers=0))
    assert [r.item.key for r in results] == ["a", "b", "c"]
    assert [r.ok for r in results] == [True, True, False] and "c.jpg" in results[2].error
    assert np.array_equal(results[0].result.labels, seg.predict(synthetic_image(0)).labels)
    # What spawn/forkserver workers receive: the preparer without the model, still able to prepare.
    seg.timer = StageTimer()
    light = pickle.loads(pickle.dumps(_Reader(seg.preprocessor, keep_image=True)))
    seg.timer = None
    assert not any(isinstance(v, torch.nn.Module) for v in vars(light.preprocessor).values())
    loaded = light(results[1].item)
    assert loaded.error is None and np.array_equal(loaded.image, synthetic_image(1))
    assert np.array_equal(seg.infer([loaded.prepared])[0].labels, results[1].result.labels)


FORK_AFTER_OPENCV_THREADS = """
import sys
import cv2
import numpy as np
cv2.setNumThreads(4)
cv2.resize(np.zeros((600, 800, 3), np.uint8), (300, 400))  # the caller's own OpenCV work: a running pool
import open_clip
open_clip.add_model_config(sys.argv[1])
import gclip
seg = gclip.Segmenter(gclip.load_model("gclip-tiny-test", None), classes=["a", "b"], short_side=48, crop=32, stride=16)
results = list(gclip.iter_segment(seg, sys.argv[2], images_per_batch=1, workers=2))
print(sum(r.ok for r in results))
"""


def test_forked_workers_do_not_hang_on_a_running_opencv_thread_pool(tmp_path):
    """A forked copy of a running OpenCV thread pool hangs at first use: the pool is stopped before forking."""
    import subprocess
    import sys

    from conftest import HERE

    write_images(tmp_path, ["a.png", "b.png", "c.png"], size=(60, 80))
    run = subprocess.run(
        [sys.executable, "-c", FORK_AFTER_OPENCV_THREADS, str(HERE / "configs"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.split()[-1] == "3"

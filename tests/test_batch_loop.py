"""The batch loop every bulk run shares: a batch that fails is retried image by image, failures are one line."""

from __future__ import annotations

import numpy as np
import pytest

import gclip
from collection_helpers import CLASSES, SETTINGS, synthetic_image, write_images
from gclip.engines import infer_batch, iter_items, one_line_error
from gclip.errors import ImageError


@pytest.fixture(scope="module")
def seg(tiny_model):
    return gclip.Segmenter(tiny_model, method="gclip", classes=CLASSES, **SETTINGS)


def _failing_on(seg, monkeypatch, key):
    real = seg.infer
    calls = []

    def infer(prepared, return_probs=False):
        calls.append([p.key for p in prepared])
        if any(p.key == key for p in prepared):
            raise RuntimeError("out of memory\nsecond line")
        return real(prepared, return_probs)

    monkeypatch.setattr(seg, "infer", infer)
    return calls


def test_a_failing_batch_is_retried_image_by_image(seg, monkeypatch):
    prepared = [seg.prepare(synthetic_image(k), key=name) for k, name in enumerate("abc")]
    expected = [seg.predict(synthetic_image(k)).labels for k in range(3)]
    calls = _failing_on(seg, monkeypatch, "b")
    out = infer_batch(seg, prepared, ["a.jpg", "b.jpg", "c.jpg"])
    assert calls == [["a", "b", "c"], ["a"], ["b"], ["c"]]
    assert out[1] == "b.jpg: RuntimeError: out of memory"
    for k in (0, 2):
        assert np.array_equal(out[k].labels, expected[k])


def test_the_local_engine_reports_the_image_the_model_fails_on(seg, monkeypatch, tmp_path):
    paths = write_images(tmp_path, ["a.png", "b.png", "c.png"])
    items = gclip.engines.collect_inputs([tmp_path])
    _failing_on(seg, monkeypatch, "b")
    results = list(iter_items(seg, items, images_per_batch=3, workers=0))
    assert [r.ok for r in results] == [True, False, True]
    assert results[1].error == f"{paths[1]}: RuntimeError: out of memory"


def test_one_line_error_keeps_an_image_error_that_names_its_file():
    assert one_line_error(ImageError("/x/a.jpg: truncated"), "/x/a.jpg") == "/x/a.jpg: truncated"
    assert one_line_error(ImageError("truncated"), "s.tar:a.jpg", "s.tar") == "s.tar:a.jpg: truncated"
    assert one_line_error(ValueError(), "a.jpg") == "a.jpg: ValueError: ValueError"

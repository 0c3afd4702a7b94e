"""The engine (batched windows, fused attention, tiled/streamed reduction) against the plain reference loop."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import gclip
from conftest import method_matrix, tiny_second_models
from gclip.inference.canvas import BandCanvas
from gclip.inference.postprocess import StreamingReduction, reduce_logits
from gclip.inference.reference import reference_labels, reference_merged_logits
from gclip.methods.gclip import Gclip

CLASSES = ["cat", "dog, puppy", "sky", "tree", "road"]
SETTINGS = [
    dict(short_side=0, crop=32, stride=16, batch_size=4),
    dict(short_side=40, crop=24, stride=16, padding="none", prob_thd=0.3, area_thd=0.2),
    dict(short_side=56, crop=0, pamr_steps=2, pamr_dilations=(1, 2)),
]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(61, 83, 3), (40, 37, 3)]]


@pytest.mark.parametrize("settings", SETTINGS, ids=["sliding", "thresholds-nopad", "whole-pamr"])
@pytest.mark.parametrize("method", method_matrix(gclip.list_methods()))
def test_engine_equals_reference_loop(tiny_model, images, method, settings):
    options = tiny_second_models(method)  # corrclip: SAM's generator makes its masks (arrays: no mask files)
    seg = gclip.Segmenter(tiny_model, method=method, classes=CLASSES, method_options=options, **settings)
    results = seg.predict_batch(images)
    prepared = [seg.prepare(img) for img in images]
    for img, result, merged, item in zip(images, results, seg.merged_logits(prepared), prepared):
        np.testing.assert_array_equal(result.labels, reference_labels(seg, img))
        torch.testing.assert_close(merged, reference_merged_logits(seg, item), rtol=0, atol=1e-4)


@pytest.mark.parametrize("fusion", ["mean", "per_head"])
@pytest.mark.parametrize("impl", ["sdpa", "looped"])
def test_gclip_fused_attention_equals_explicit_maps(tiny_model, fusion, impl):
    seg = gclip.Segmenter(tiny_model, method="gclip")
    crops = torch.randn(3, 3, 40, 48, generator=torch.Generator().manual_seed(0))
    plain = Gclip(fusion=fusion, fusion_weights=[0.7, 0.3], _impl="maps")
    from gclip.inference.forward import dense_features

    fast = dataclasses.replace(plain, _impl=impl)
    torch.testing.assert_close(
        dense_features(seg.vit, fast, crops), dense_features(seg.vit, plain, crops), rtol=0, atol=1e-5
    )


@pytest.mark.parametrize("short_side", [0, 44])
def test_streamed_canvas_equals_whole_canvas(tiny_model, images, short_side, monkeypatch):
    """Portrait (rows streamed) and landscape (columns streamed) images, with and without the final resize."""
    seg = gclip.Segmenter(tiny_model, method="clearclip", classes=CLASSES, short_side=short_side, crop=24, stride=10)
    plain = seg.predict_batch(images, return_probs=True)
    seg.stream_min_elements = 0
    axes = []

    class Spy(BandCanvas):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            axes.append(self.axis)

    monkeypatch.setattr(gclip.inference.segmenter, "BandCanvas", Spy)
    streamed = seg.predict_batch(images, return_probs=True)
    assert axes == [1, 0]  # the 83x61 landscape image by columns, the 37x40 portrait one by rows
    for a, b in zip(plain, streamed):
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.probs, b.probs, rtol=0, atol=1e-5)
    seg.stream_min_elements = 0
    labels_only = seg.predict_batch(images)
    for a, b in zip(plain, labels_only):
        np.testing.assert_array_equal(a.labels, b.labels)


@pytest.mark.parametrize("axis", [0, 1])
def test_band_canvas_out_of_order_windows_grow_the_ring(axis):
    torch.manual_seed(0)
    (h, w), q = ((30, 20) if axis == 0 else (20, 30)), 3
    boxes = [(y, y + 10, x, x + 10) for y in range(0, h, 10) for x in range(0, w, 10)]
    ups = {box: torch.randn(q, 10, 10) for box in boxes}
    merged = torch.zeros(q, h, w)
    for box in boxes:
        y1, y2, x1, x2 = box
        merged[:, y1:y2, x1:x2] += ups[box]
    reducer = StreamingReduction((h, w), (h, w), [0, 1, 2], return_probs=True, axis=axis)
    canvas = BandCanvas(q, (h, w), boxes, reducer, "cpu", axis=axis)
    for box in reversed(boxes):  # last first: nothing is final until the first row (column) arrives
        canvas.add(box, ups[box])
    assert canvas.capacity >= (h, w)[axis]
    out = canvas.reducer_result()
    ref = reduce_logits(merged, (h, w), [0, 1, 2], return_probs=True)
    assert torch.equal(out.labels, ref.labels)
    torch.testing.assert_close(out.probs, ref.probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "src, size", [((13, 17), (40, 51)), ((40, 51), (13, 17)), ((20, 20), (20, 20)), ((7, 9), (7, 30))]
)
@pytest.mark.parametrize("prob_thd", [0.0, 0.4])
@pytest.mark.parametrize("axis", [0, 1])
def test_tiled_and_streamed_reduction_equal_full_resolution(src, size, prob_thd, axis):
    torch.manual_seed(0)
    logits = torch.randn(5, *src) * 0.1
    q2c = [0, 1, 1, 2, 3]
    full = torch.nn.functional.interpolate(logits[None], size=size, mode="bilinear")[0]
    probs = torch.softmax(full * 50.0, dim=0)
    class_probs = torch.stack([probs[0], probs[1:3].max(0).values, probs[3], probs[4]])
    top, labels = class_probs.max(0)
    labels[top < prob_thd] = 0
    tiled = reduce_logits(logits, size, q2c, prob_thd=prob_thd, return_probs=True, tile_elements=40)
    torch.testing.assert_close(tiled.probs, class_probs, rtol=0, atol=1e-5)
    assert torch.equal(tiled.labels, labels)
    stream = StreamingReduction(src, size, q2c, prob_thd=prob_thd, tile_elements=40, axis=axis, return_probs=True)
    rng = np.random.default_rng(0)
    line = 0
    while line < src[axis]:
        n = int(rng.integers(1, 4))
        stream.feed(logits.narrow(1 + axis, line, min(n, src[axis] - line)))
        line += n
    out = stream.result()
    assert torch.equal(out.labels, labels)
    assert torch.equal(out.labels, tiled.labels)
    torch.testing.assert_close(out.probs, tiled.probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize(("max_elements", "n_pieces"), [(1, 7), (40 * 30, 7), (3 * 40 * 30, 3), (10**9, 1)])
def test_window_upsample_in_class_chunks_is_exact(max_elements, n_pieces):
    """Upsampling a window a few classes at a time gives bit-identical values to one interpolate call."""
    from gclip.inference.canvas import WindowUpsample

    logits = torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(0))
    whole = torch.nn.functional.interpolate(logits[None], size=(40, 30), mode="bilinear")[0][:, 3:37, 2:29]
    lazy = WindowUpsample(logits, (40, 30), (3, 34, 2, 27), max_elements)
    pieces = list(lazy.chunks())
    assert len(pieces) == n_pieces
    assert torch.equal(torch.cat([p for _, p in pieces]), whole)
    assert [q0 for q0, _ in pieces] == sorted(q0 for q0, _ in pieces)

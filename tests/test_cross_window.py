"""Cross-window methods: the engine gives a method with ``window_mode = "cross"`` every window of an image in one pass
(whatever the batch size), never another image's, and the reference loop agrees with it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch

import gclip
from gclip.inference.reference import reference_labels, reference_merged_logits
from gclip.methods import BlockChange, Method, attend

CLASSES = ["cat", "dog, puppy", "sky"]


@dataclass
class AllWindowsKeys(Method):
    """A GLA-CLIP-like toy: each window's queries attend to the keys and values of every window of its image."""

    name = "test_all_windows_keys"
    protocol = "clearclip"
    window_mode = "cross"
    seen: list = field(default_factory=list, repr=False, compare=False)

    def blocks(self, vit, trace):
        def attention(q, k, v):
            self.seen.append([w.box for w in trace.extras.get("windows", [])] or [None] * q.shape[0])
            b, h, n, d = k.shape
            keys = k.transpose(0, 1).reshape(1, h, b * n, d).expand(b, -1, -1, -1)
            values = v.transpose(0, 1).reshape(1, h, b * n, d).expand(b, -1, -1, -1)
            return attend(q, keys, values)

        return {vit.depth - 1: BlockChange(attention=attention, residual=False, ffn=False)}


@dataclass
class EachWindowAlone(AllWindowsKeys):
    window_mode = "crop"


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(5)
    return [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(61, 83, 3), (40, 37, 3)]]


@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_window_of_an_image_in_one_pass_and_the_reference_agrees(tiny_model, images, batch_size):
    method = AllWindowsKeys()
    seg = gclip.Segmenter(
        tiny_model, method=method, classes=CLASSES, short_side=0, crop=32, stride=16, batch_size=batch_size
    )
    results = seg.predict_batch(images)
    passes = [boxes for boxes in method.seen]
    _, plans, _ = seg._plan([seg.prepare(img) for img in images])
    assert sorted(map(sorted, passes)) == sorted(sorted(w.box for w in plan) for plan in plans)  # one pass an image
    assert [len(p) for p in plans] == [15, 4] and len(passes) == 2
    for img, result in zip(images, results):
        np.testing.assert_array_equal(result.labels, reference_labels(seg, img))
        item = seg.prepare(img)
        torch.testing.assert_close(seg.merged_logits([item])[0], reference_merged_logits(seg, item), rtol=0, atol=1e-4)
    alone = [seg.predict(img).labels for img in images]  # another image's windows never enter a pass
    assert all(np.array_equal(a, r.labels) for a, r in zip(alone, results))


def test_the_windows_do_see_each_other(tiny_model, images):
    together = gclip.Segmenter(tiny_model, method=AllWindowsKeys(), classes=CLASSES, short_side=0, crop=32, stride=16)
    apart = gclip.Segmenter(
        tiny_model, method=EachWindowAlone(), classes=CLASSES, short_side=0, crop=32, stride=16, batch_size=1
    )
    item = together.prepare(images[0])
    a, b = together.merged_logits([item])[0], apart.merged_logits([item])[0]
    assert (a - b).abs().max() > 1e-3  # with one window a pass, the same attention sees one window's keys only

"""CLIPtrase's label refinement in the engine (its per-window context). Its protocol: test_centre_crop; parity with
the authors' code: test_fidelity and test_pipeline_fidelity."""

from __future__ import annotations

import numpy as np
import pytest

from gclip import Segmenter
from gclip.errors import ConfigError


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.heavy)])
def test_label_contexts_reach_the_label_step_as_in_the_reference_loop(tiny_model, compiled):
    """A method's per-window context (CLIPtrase's affinity) crosses the batched, optionally compiled, engine to
    its label step: the engine's labels equal the plain loop's, and the refinement changed them."""
    from gclip.inference.reference import reference_labels

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    settings = dict(short_side=48, crop=0, logit_scale=100.0)
    options = {"dbscan_eps": 1.2, "dbscan_min_samples": 3}
    seg = Segmenter(tiny_model, method="cliptrase", method_options=options, **settings)
    plain = Segmenter(tiny_model, method="cliptrase", **settings)
    for s in (seg, plain):
        s.set_classes(["a", "b", "c", "d"])
    if compiled:
        seg.compile()
    results = seg.predict_batch(images)
    changed = 0
    for image, result, unrefined in zip(images, results, plain.predict_batch(images)):
        assert (result.labels == reference_labels(seg, image)).all()
        changed += int((result.labels != unrefined.labels).sum())
    assert changed > 0
    sliding = Segmenter(tiny_model, method="cliptrase", method_options={"dbscan_eps": 0.05}, crop=16, stride=8)
    sliding.set_classes(["a", "b"])
    with pytest.raises(ConfigError, match="whole-image mode"):
        sliding.predict(images[0])

"""The Segmenter end to end on the tiny model: sizes, inputs, batching equivalences, settings, probabilities."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import crop_methods, method_matrix, tiny_second_models
from gclip.errors import ClassesError, ConfigError
from gclip.inference.segmenter import Segmenter
from gclip.inference.windows import tile
from gclip.methods import list_methods
from gclip.methods.corrclip import PAD_VALUE

SMALL = {"short_side": 48, "crop": 32, "stride": 16}


@pytest.fixture
def make(tiny_model):
    def build(method="gclip", classes=("cat", "dog", "sky"), **settings):
        options = tiny_second_models(method)  # corrclip: SAM's generator makes its masks (arrays: no mask files)
        return Segmenter(
            tiny_model, method=method, classes=list(classes), method_options=options, **{**SMALL, **settings}
        )

    return build


@pytest.mark.parametrize("method", method_matrix(list_methods()))
def test_labels_at_original_size(make, rgb_image, method):
    result = make(method).predict(rgb_image)
    assert result.labels.shape == (61, 83) and result.labels.dtype == np.int32
    assert result.class_names == ["cat", "dog", "sky"]
    assert 0 <= result.labels.min() and result.labels.max() <= 2
    assert result.probs is None


@pytest.mark.parametrize("method", method_matrix(crop_methods()))
def test_batched_windows_equal_one_window_at_a_time(make, rgb_image, method):
    other = np.ascontiguousarray(rgb_image[:50, :70])
    batched = make(method, batch_size=64)
    single = make(method, batch_size=1)
    prepared = [batched.prepare(rgb_image), batched.prepare(other)]
    a, b = batched.merged_logits(prepared), single.merged_logits(prepared)
    for x, y in zip(a, b):
        assert (x - y).abs().max() <= 1e-5
    together = batched.predict_batch([rgb_image, other])
    alone = [single.predict(rgb_image), single.predict(other)]
    assert all(np.array_equal(t.labels, s.labels) for t, s in zip(together, alone))


def test_corrclip_windows_of_an_image_together_equal_one_at_a_time(make, rgb_image):
    """CorrCLIP's windows share one pass (their region tokens padded to the largest count): each window's logits
    must not depend on the others'. (Whole-image methods ignore ``batch_size``; Trident's windows do depend on each
    other, through DINO's mean similarity over the image, as in its authors' code.)"""
    seg = make("corrclip", crop=24, stride=12)
    item = seg.prepare(rgb_image)
    windows = tile(item.image[None], 24, 12, seg.method.window_multiple(seg.vit))
    instance = seg.method.instance_mask(seg.vit, item.original, item.key, tuple(item.size))
    resized = torch.nn.functional.interpolate(instance[None, None].float(), windows.size).to(instance.dtype)
    masks = windows.cut(resized[0, 0], PAD_VALUE)
    assert len(windows.boxes) > 2
    stage = lambda _: contextlib.nullcontext()  # noqa: E731
    text = seg.query_embeddings()
    together = seg.method._window_logits(seg.vit, windows.crops, masks, text, stage)
    alone = [seg.method._window_logits(seg.vit, c[None], m[None], text, stage)[0] for c, m in zip(windows.crops, masks)]
    torch.testing.assert_close(together, torch.stack(alone), rtol=0, atol=1e-5)


def test_same_result_from_path_pil_and_array(make, rgb_image, tmp_path):
    Image.fromarray(rgb_image).save(tmp_path / "x.png")
    seg = make()
    results = [seg.predict(src).labels for src in (rgb_image, Image.fromarray(rgb_image), tmp_path / "x.png")]
    assert np.array_equal(results[0], results[1]) and np.array_equal(results[0], results[2])


def test_probabilities_and_synonyms(make, rgb_image):
    seg = make(classes=("cat, kitten", "dog", "sky, clouds"))
    result = seg.predict(rgb_image, return_probs=True)
    assert result.probs.shape == (3, 61, 83)
    assert np.array_equal(result.probs.argmax(0), result.labels)
    total = result.probs.sum(0)  # class probabilities are maxima over synonyms of one softmax: sum <= 1
    assert (total <= 1 + 1e-5).all() and (total > 0).all()


def test_prob_thd_sets_the_background_class_or_leaves_pixels_unlabeled(make, rgb_image):
    """A first class named background gets the uncertain pixels; a user's own first class never does."""
    with_background = make(classes=("Background", "cat", "dog"), prob_thd=1.0)
    assert with_background.classes.background and (with_background.predict(rgb_image).labels == 0).all()
    result = make(prob_thd=1.0).predict(rgb_image)
    assert not result.background and (result.labels == -1).all()
    assert result.class_fractions() == {} and result.unlabeled_fraction == 1.0
    streamed = make(prob_thd=1.0)
    streamed.stream_min_elements = 1  # the streamed canvas's reduction: the same
    assert (streamed.predict(rgb_image).labels == -1).all()


def test_whole_image_and_unpadded_windows(make, rgb_image):
    for settings in ({"crop": 0}, {"padding": "none"}, {"short_side": 0}, {"pamr_steps": 2, "pamr_dilations": (1,)}):
        assert make(**settings).predict(rgb_image).labels.shape == (61, 83)


def test_windows_cover_all_pixels_in_the_canvas(make, rgb_image):
    seg = make()
    prepared = seg.prepare(rgb_image)
    sizes, plans, _ = seg._plan([prepared])
    assert sizes[0] == tuple(prepared.image.shape[-2:])
    covered = torch.zeros(sizes[0])
    for win in plans[0]:
        y1, y2, x1, x2 = win.target
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1
    assert torch.isfinite(seg.merged_logits([prepared])[0]).all()


def test_whole_image_mode_resizes_patch_logits_once_to_the_original_size(make, rgb_image):
    """crop=0 (ClearCLIP/SCLIP/NACLIP "whole"): no padding, the patch logits go straight to the original size."""
    import torch.nn.functional as F

    from gclip.inference.forward import dense_logits

    seg = make(crop=0, short_side=40)
    prepared = seg.prepare(rgb_image)
    merged = seg.merged_logits([prepared])[0]
    assert merged.shape[-2:] == (61, 83)
    patch = dense_logits(seg.vit, seg.method, prepared.image[None], seg._queries)
    expected = F.interpolate(patch, size=(61, 83), mode="bilinear")[0]
    torch.testing.assert_close(merged, expected, rtol=0, atol=1e-6)


def test_classes_required_and_settings_checked(tiny_model, rgb_image):
    seg = Segmenter(tiny_model, method="clearclip")
    with pytest.raises(ClassesError, match="no classes set"):
        seg.predict(rgb_image)
    with pytest.raises(ConfigError, match="unknown setting 'windw'"):
        Segmenter(tiny_model, windw=3)
    with pytest.raises(ConfigError, match="stride"):
        Segmenter(tiny_model, crop=32, stride=64)


def test_describe_lists_everything(make):
    info = make("gclip").describe()
    assert info["method"] == "gclip" and info["crop"] == 32 and info["templates"] == 80
    assert "emerging_blocks" in info["method_options"]


GRAPH_BREAKS = {
    "cass": "scipy's Hungarian assignment and Ward clustering run on the CPU, between graphs",
    "rfclip": "scipy's complete-linkage clustering of the text runs on the CPU, between graphs",
    "freecp": "OpenCV finds each class map's boxes (contours) on the CPU, between graphs",
}


@pytest.mark.parametrize("method", method_matrix(crop_methods()))  # the per-window forward
def test_compiled_forward_pads_partial_batches_and_compiles_once_per_window_shape(make, rgb_image, method):
    """A counting backend stands in for inductor (no C++ build here): same outputs, one graph per window shape."""
    graphs = []

    def counting_backend(gm, example_inputs):
        shapes = [tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)]  # (a SymInt has none)
        graphs.append(shapes[0] if shapes else ())
        return gm.forward

    torch._dynamo.reset()
    eager = make(method, batch_size=4)
    compiled = make(method, batch_size=4)
    compiled.compile(backend=counting_backend)
    other = np.ascontiguousarray(rgb_image[:40, :50])
    first = None
    for image in (rgb_image, other, rgb_image):  # 8, then 4 windows (32 x 32 crops), batches of 4 and a partial one
        a, b = compiled.predict(image, return_probs=True), eager.predict(image, return_probs=True)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
        assert np.array_equal(a.labels, b.labels)
        first = len(graphs) if first is None else first
    assert compiled._compiled is not None
    if method in GRAPH_BREAKS:
        assert len(graphs) == first, graphs  # its breaks are fixed: no recompilation on the later batches
    elif compiled.method.cross_window:
        assert graphs == []  # runs eagerly: a compiled batch's blank padding windows would be among the windows seen
    else:
        assert len(graphs) == 1, graphs  # no graph break, no recompilation

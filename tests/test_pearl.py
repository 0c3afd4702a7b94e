"""PEARL in the engine: its whole-image path against the per-crop engine plus its propagation, the per-crop path
compiled, and the pieces of its attention and propagation. Parity with the authors' code: test_fidelity and
test_pipeline_fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.methods import get_method
from gclip.methods.pearl import laplacian, laplacian_propagation, polar_factor

SMALL = {"short_side": 48, "crop": 32, "stride": 16, "padding": "none"}


def test_window_mode_follows_the_propagation():
    assert get_method("pearl").whole_image
    assert not get_method("pearl", propagation=False).whole_image
    with pytest.raises(ConfigError, match="pearl"):
        get_method("pearl", align_solver="qr")
    with pytest.raises(ConfigError, match="prop_grid"):
        get_method("pearl", prop_grid=0)


WHOLE = {"short_side": 40, "padding": "none"}


@pytest.mark.parametrize(
    "settings, engine",
    [(SMALL, SMALL), ({**WHOLE, "crop": 0}, {**WHOLE, "crop": 2048, "stride": 2048}), ({**WHOLE, "crop": 2048}, None)],
)
def test_whole_image_path_is_the_crop_engine_then_the_propagation(tiny_model, rgb_image, settings, engine):
    """With the propagation, the image's logits are the per-crop engine's unpadded windows, merged, resized to the
    image and propagated with the model input resized alike. The whole image (``crop 0``) is the authors' one window
    resized twice, which the per-crop engine gives with one window as large as any image (its ``crop 0`` resizes
    once)."""
    whole = Segmenter(tiny_model, method="pearl", classes=["cat", "dog", "sky"], **settings)
    crops = Segmenter(
        tiny_model,
        method="pearl",
        method_options={"propagation": False},
        classes=["cat", "dog", "sky"],
        **(engine or settings),
    )
    item = whole.prepare(rgb_image)
    got = whole.merged_logits([item])[0]
    merged = crops.merged_logits([item])[0]
    size = tuple(item.size)
    logits = F.interpolate(merged[None], size=size, mode="bilinear")
    image = F.interpolate(item.image[None], size=size, mode="bilinear")
    expected = whole.method.propagate(image, logits, whole.query_embeddings())[0]
    assert got.shape == (3, *size)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert (got - logits[0]).abs().max() > 1e-4  # the propagation changed them


@pytest.mark.heavy  # dynamo tracing: about 3 s
def test_without_propagation_it_compiles_once_per_window_shape(tiny_model, rgb_image):
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(tuple(example_inputs[0].shape) if example_inputs else ())
        return gm.forward

    torch._dynamo.reset()
    options = {"propagation": False}
    eager = Segmenter(tiny_model, method="pearl", method_options=options, classes=["a", "b"], batch_size=4, **SMALL)
    compiled = Segmenter(tiny_model, method="pearl", method_options=options, classes=["a", "b"], batch_size=4, **SMALL)
    compiled.compile(backend=counting_backend)
    for image in (rgb_image, np.ascontiguousarray(rgb_image[:40, :50])):
        a, b = compiled.predict(image, return_probs=True), eager.predict(image, return_probs=True)
        np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    assert len(graphs) == 1, graphs


def test_polar_factor_is_the_procrustes_rotation():
    """For a well-conditioned M the Newton-Schulz iterations converge to U Vᵀ of its SVD."""
    g = torch.Generator().manual_seed(0)
    q1, _ = torch.linalg.qr(torch.randn(2, 8, 8, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(2, 8, 8, generator=g, dtype=torch.float64))
    m = q1 @ torch.diag_embed(torch.linspace(1.0, 2.0, 8, dtype=torch.float64).expand(2, 8)) @ q2
    u, _, vh = torch.linalg.svd(m)
    r = polar_factor(m, iters=30, eps=0.0)
    torch.testing.assert_close(r, u @ vh, rtol=0, atol=1e-8)
    torch.testing.assert_close(r.transpose(-1, -2) @ r, torch.eye(8, dtype=torch.float64).expand(2, 8, 8))


def test_laplacian_is_symmetric_and_kills_constants():
    g = torch.Generator().manual_seed(1)
    w_h, w_v = torch.rand(1, 1, 6, 6, generator=g), torch.rand(1, 1, 5, 7, generator=g)
    x, y = torch.randn(1, 2, 6, 7, generator=g), torch.randn(1, 2, 6, 7, generator=g)
    assert abs(float((laplacian(x, w_h, w_v) * y).sum() - (x * laplacian(y, w_h, w_v)).sum())) < 1e-5
    assert laplacian(torch.ones(1, 2, 6, 7), w_h, w_v).abs().max() == 0
    assert float((laplacian(x, w_h, w_v) * x).sum()) >= 0


def test_propagation_keeps_constant_logits_and_smooths_others():
    g = torch.Generator().manual_seed(2)
    image = torch.randn(1, 3, 40, 48, generator=g)
    text = F.normalize(torch.randn(4, 16, generator=g), dim=-1)
    flat = torch.tensor([0.3, 0.1, -0.2, 0.0]).view(1, 4, 1, 1).expand(1, 4, 40, 48)
    torch.testing.assert_close(laplacian_propagation(image, flat, text, grid=8), flat)
    noisy = torch.randn(1, 4, 40, 48, generator=g)
    out = laplacian_propagation(image, noisy, text, grid=40)  # no pooling
    assert out.shape == noisy.shape
    grad = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert grad(out) < 0.7 * grad(noisy)
    unchanged = laplacian_propagation(image, noisy, text, grid=40, iters=0)
    torch.testing.assert_close(unchanged, noisy)

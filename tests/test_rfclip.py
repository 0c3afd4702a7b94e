"""RF-CLIP: its denoising and refocusing against direct readings of the authors' steps, the complete-linkage text
clusters against scipy, the engine against the reference loop with both global sources, and its errors. Parity
with the authors' code: test_fidelity (rfclip*.npy) and test_pipeline_fidelity (pipeline/rfclip*.npz)."""

from __future__ import annotations

import dataclasses
import types

import numpy as np
import pytest
import torch

from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.inference.reference import reference_labels
from gclip.methods import get_method
from gclip.methods.cass import text_clusters
from gclip.methods.rfclip import SINK_CHANNELS, WholeImageCls, refocused

pytest.importorskip("scipy")


def fake_vit(width: int, prefix: int = 1):
    vit = types.SimpleNamespace(width=width, prefix_tokens=prefix)
    vit.patches = lambda tokens: tokens[:, prefix:]
    return vit


def test_denoise_blends_only_the_distraction_patches_with_their_zero_padded_neighbourhood():
    """The authors' steps written out: per patch, channels shifted to be non-negative over their sum; a patch whose
    largest share on the channels exceeds sigma / width takes ``(1 - a) x + a`` (its 3 x 3 mean, zeros outside)."""
    rng = np.random.default_rng(0)
    grid, width = (3, 4), 16
    x = torch.from_numpy(rng.standard_normal((1, 1 + 12, width), dtype=np.float32))
    x[0, 1 + 5, 3] = 40.0  # patch (1, 1) spikes on channel 3
    x[0, 1 + 11, 7] = 40.0  # patch (2, 3), a corner of the grid, on channel 7
    method = get_method("rfclip", sink_channels=[3, 7], denoise_sigma=5.0, denoise_alpha=0.4)
    got = method.denoise(fake_vit(width), x, grid)
    planes = x[0, 1:].T.reshape(width, *grid)
    mean = torch.nn.functional.conv2d(planes[:, None], torch.full((1, 1, 3, 3), 1 / 9), padding=1)[:, 0]
    mean = mean.reshape(width, -1).T
    expected = x.clone()
    for patch in (5, 11):
        expected[0, 1 + patch] = 0.6 * x[0, 1 + patch] + 0.4 * mean[patch]
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.equal(got[0, 0], x[0, 0])  # the CLS token is never denoised
    assert torch.equal(get_method("rfclip", sink_channels=[]).denoise(fake_vit(width), x, grid), x)


def test_refocused_moves_the_sink_columns_weight_to_the_other_patches():
    rng = np.random.default_rng(1)
    logits = torch.from_numpy(rng.standard_normal((1, 2, 6, 6), dtype=np.float32))
    logits[0, 0, :, 3] += 4.0  # head 0: column 3 (patch 2) draws most of the attention
    maps = torch.softmax(logits, dim=-1)
    got = refocused(maps, threshold=0.3, beta=0.6, p=1)
    assert torch.equal(got[0, 1], maps[0, 1])  # head 1 has no sink: unchanged
    assert torch.equal(got[0, 0, 0], maps[0, 0, 0]) and torch.equal(got[0, 0, :, 0], maps[0, 0, :, 0])  # CLS
    rows = maps[0, 0, 1:, 1:]
    others = rows.clone()
    others[:, 2] = 0
    expected = rows.clone()
    expected[:, 2] *= 0.6
    expected += (0.4 * rows[:, 2:3]) * others / (others.sum(-1, keepdim=True) + 1e-8)
    assert torch.allclose(got[0, 0, 1:, 1:], expected, atol=1e-7)
    assert torch.allclose(got.sum(-1), torch.ones(1, 2, 6), atol=1e-6)  # rows still sum to one


def test_text_clusters_complete_linkage_equal_scikit_learn_and_scipy():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.metrics.pairwise import cosine_distances

    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    z = linkage(squareform(cosine_distances(text), checks=False), method="complete")
    for threshold in (0.1, 0.99, 1.0, 1.05):
        expected = fcluster(z, t=threshold, criterion="distance") - 1
        assert text_clusters(torch.from_numpy(text), threshold, "complete").tolist() == expected.tolist()
    assert len(set(text_clusters(torch.from_numpy(text), 1.0, "complete").tolist())) < 10  # the golden's groups


def test_sink_channels_by_width_and_errors():
    method = get_method("rfclip")
    assert method.channels(fake_vit(768)) == SINK_CHANNELS[768]
    assert method.channels(fake_vit(1024)) == SINK_CHANNELS[1024]
    with pytest.warns(UserWarning, match="no distraction channels are known for width 48"):
        assert method.channels(fake_vit(48)) == ()
    with pytest.raises(ConfigError, match="sink_channels must be channels 0..63") as info:
        get_method("rfclip", sink_channels=[3, 64]).channels(fake_vit(64))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="global_source"):
        get_method("rfclip", global_source="both")


@pytest.mark.parametrize("source", ["image", "crop"])
def test_rfclip_engine_equals_the_reference_loop(tiny_model, rgb_image, source):
    options = {"sink_channels": [1, 5, 9], "denoise_sigma": 1.5, "global_source": source, "refocus": True}
    seg = Segmenter(tiny_model, method="rfclip", method_options=options, short_side=40, crop=32, stride=16)
    seg.set_classes(["cat", "dog", "grass"])
    got = seg.predict(rgb_image)
    assert got.labels.shape == rgb_image.shape[:2]
    assert np.array_equal(got.labels, reference_labels(seg, rgb_image))


def test_rfclip_global_source_image_takes_the_whole_image_once(tiny_model, rgb_image, monkeypatch):
    options = {"sink_channels": [1, 5, 9], "denoise_sigma": 1.5}
    seg = Segmenter(tiny_model, method="rfclip", method_options=options, short_side=40, crop=32, stride=16)
    seg.set_classes(["cat", "dog", "grass"])
    calls = []
    original = WholeImageCls.__call__

    def counted(self, vit, image):
        calls.append(tuple(image.shape))
        return original(self, vit, image)

    monkeypatch.setattr(WholeImageCls, "__call__", counted)
    seg.predict_batch([rgb_image, rgb_image[:30]])
    assert len(calls) == 2 and all(c[0] == 1 for c in calls)  # once per image, on its whole model input
    crop = Segmenter(
        tiny_model, method=dataclasses.replace(seg.method, global_source="crop"), short_side=40, crop=32, stride=16
    )
    crop.set_classes(["cat", "dog", "grass"])
    assert not np.allclose(seg.predict(rgb_image, True).probs, crop.predict(rgb_image, True).probs)


@pytest.mark.golden
def test_the_golden_variants_exercise_denoising_and_refocusing(vitb16_checkpoint, monkeypatch):
    """Why goldens.toml has `rfclip_sigma19` and `rfclip_refocus`: on the golden crop the random weights bring no
    patch to the default denoising threshold (sigma 5) and no column to the default refocusing threshold (0.1);
    the variants' thresholds (1.9, 0.006) denoise some patches and refocus some heads."""
    from gclip.backbones.models import load_model
    from gclip.backbones.openclip import DenseViT
    from gclip.inference.forward import dense_features
    from gclip.methods import rfclip

    vit = DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    shares, columns = [], []
    method = get_method("rfclip", refocus=True, refocus_threshold=0.006)
    original_denoise, original_refocused = type(method).denoise, rfclip.refocused

    def denoise(self, vit, x, grid):
        feat = vit.patches(x)
        shifted = feat - feat.amin(dim=-1, keepdim=True)
        share = shifted / shifted.sum(dim=-1, keepdim=True)
        shares.append(share[..., list(SINK_CHANNELS[768])].amax(dim=-1) * feat.shape[-1])
        return original_denoise(self, vit, x, grid)

    def spy(maps, threshold, beta, p):
        columns.append(maps[..., p:, p:].sum(dim=-2) / maps.shape[-1])
        return original_refocused(maps, threshold, beta, p)

    monkeypatch.setattr(type(method), "denoise", denoise)
    monkeypatch.setattr(rfclip, "refocused", spy)
    dense_features(vit, method, image)
    share = torch.stack([s.flatten() for s in shares])
    assert share.max() < 5.0 and (share > 1.9).sum() > 10
    column = torch.stack([c.flatten() for c in columns])
    assert column.max() < 0.1 and (column > 0.006).sum() > 10

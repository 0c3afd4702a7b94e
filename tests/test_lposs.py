"""LPOSS and LPOSS+ against the authors' code (vladan-stojnic/LPOSS @ e489a74; tests/data/fidelity/README.md): the
patch propagation of one window, of all windows of an image jointly, and the pixel propagation, on the shared random
ViT-B/16, the random DINO ViT-B/16 (``golden_dino16``) and the 10 random text embeddings."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import gclip
from conftest import tiny_second_models
from gclip.backbones.models import load_model
from gclip.backbones.openclip import DenseViT
from gclip.errors import ConfigError
from gclip.inference.windows import tile
from gclip.methods import get_method
from gclip.methods.lposs import conjugate_gradient, patch_propagation, pixel_propagation, rgb_to_lab

GOLDEN = Path(__file__).parent / "data" / "fidelity"
SLOW = bool(os.environ.get("GCLIP_SLOW"))


def no_stage(name):
    return contextlib.nullcontext()


@pytest.fixture(scope="module")
def vitb16(vitb16_checkpoint):
    return DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)


@pytest.fixture(scope="module")
def inputs():
    """The golden crop as 0..1 pixels and as CLIP's normalised input (tests/test_fidelity.py's ``pixel_input``),
    and the text."""
    pixels = torch.from_numpy(np.random.default_rng(1).random((1, 3, 448, 448), dtype=np.float32) * 255)
    mean = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    return pixels / 255.0, (pixels - mean) / std, torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def initial(vitb16, inputs, golden_dino16):
    """DINO features and initial logits of the crop as one window."""
    return get_method("lposs", proxy=golden_dino16).initial_logits(vitb16, inputs[1], inputs[2])


def centres(grid: int = 28, patch: int = 16) -> torch.Tensor:
    side = torch.arange(grid) * patch + patch // 2
    return torch.stack(torch.meshgrid(side, side, indexing="ij"), -1).reshape(-1, 2)


@pytest.mark.golden
@pytest.mark.parametrize(
    ("golden", "options", "atol"),
    [
        ("lposs_patches", {"k": 784}, 1e-4),  # every patch a neighbour: no kNN selection (README: near-ties)
        ("lposs_patches_k784_g1_s0", {"k": 784, "gamma": 1.0, "sigma": 0.0, "alpha": 0.5}, 1e-4),
        ("lposs_patches_k400", {}, 1e-3),  # the defaults: one neighbour of row 688 is a random-weight near-tie
    ],
)
def test_patch_propagation_matches_the_authors(initial, golden, options, atol, golden_dino16):
    feats, logits = initial
    method = get_method("lposs", proxy=golden_dino16, **options)
    out = patch_propagation(feats.reshape(784, -1), centres(), logits.permute(0, 2, 3, 1).reshape(784, 10), method)
    got = out.float().reshape(28, 28, 10).permute(2, 0, 1)[None].numpy()
    expected = np.load(GOLDEN / f"{golden}.npy")
    assert np.abs(got - expected).max() <= atol
    assert np.abs(got - logits.numpy()).max() > 0.05  # the propagation does change the logits


@pytest.mark.golden
def test_the_windows_of_an_image_propagate_jointly(vitb16, inputs, golden_dino16):
    """Windows 224 / 112 over the crop (9 windows, 1764 patches, all neighbours), merged: the authors'
    ``slide_inference`` output at pixel level, strided by 8."""
    method = get_method("lposs", proxy=golden_dino16, k=1764)
    out = method.image_logits(vitb16, tile(inputs[1], 224, 112, 16), None, inputs[2], no_stage)
    expected = np.load(GOLDEN / "lposs_slide.npy")
    assert np.abs(out[None, :, ::8, ::8].numpy() - expected).max() <= 1e-4


def test_pixel_propagation_matches_the_authors():
    """LPOSS+'s pixel step with the authors' own input (their patch propagation upsampled) on a 112 x 112 corner of
    the crop, r 13, tau 0.01: values up to 36 (the propagation scales by up to 1 / (1 - alpha))."""
    pixels = torch.from_numpy(np.random.default_rng(1).random((1, 3, 448, 448), dtype=np.float32) * 255)[0] / 255.0
    patches = torch.from_numpy(np.load(GOLDEN / "lposs_patches.npy"))
    up = torch.nn.functional.interpolate(patches, size=(448, 448), mode="bilinear", align_corners=False)[0]
    out = pixel_propagation(pixels[:, :112, :112], up[:, :112, :112], 13, 0.01, 0.95, 10, 1e-6)
    expected = np.load(GOLDEN / "lposs__pixels.npy")[0]
    assert np.abs(out.numpy() - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


@pytest.mark.golden
@pytest.mark.slow
@pytest.mark.skipif(not SLOW, reason="LPOSS+ on the whole 448 x 448 crop (GCLIP_SLOW=1 runs it)")
def test_lposs_plus_matches_the_authors(vitb16, inputs, golden_dino16):
    """The crop as one window (k 784), then the pixel propagation over its 448 x 448 pixels: the authors'
    ``whole_inference`` with ``pixel_refine``; values up to 50, within 1e-4 of that scale (README)."""
    method = get_method("lposs", proxy=golden_dino16, k=784, pixel_refine=True)
    out = method.image_logits(vitb16, tile(inputs[1], 0, 0, 16), None, inputs[2], no_stage)
    expected = np.load(GOLDEN / "lposs_plus.npy")
    assert np.abs(out[None, :, ::8, ::8].numpy() - expected).max() <= 1e-4 * np.abs(expected).max()


def test_rgb_to_lab_known_colours():
    rgb = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]).T[:, :, None]
    lab = rgb_to_lab(rgb)[..., 0].T
    expected = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [53.24, 80.09, 67.20], [32.30, 79.19, -107.86]])
    torch.testing.assert_close(lab, expected, atol=0.05, rtol=0)


def test_conjugate_gradient_per_column():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((20, 20))
    a = torch.from_numpy(a @ a.T + 20 * np.eye(20))
    b = torch.from_numpy(rng.standard_normal((20, 3)))
    b[:, 1] = 0
    x = conjugate_gradient(lambda v: a @ v, b, 40, 1e-12)
    torch.testing.assert_close(x[:, [0, 2]], torch.linalg.solve(a, b[:, [0, 2]]))
    assert (x[:, 1] == 0).all()  # a zero right-hand side stays zero (no 0/0)
    one = conjugate_gradient(lambda v: a @ v, b, 1, 1e-12)
    stopped = conjugate_gradient(lambda v: a @ v, b, 40, 10.0)  # every column stops after its first step
    torch.testing.assert_close(stopped, one)


def test_bad_options_are_one_line_errors():
    for options in ({"k": 0}, {"tau": 0.0}, {"r": 0}, {"proxy_features": "x"}):
        with pytest.raises(ConfigError):
            get_method("lposs", **options)


@pytest.mark.parametrize("pixel_refine", [False, True])
def test_lposs_segments_through_the_engine(tiny_model, pixel_refine):
    options = {**tiny_second_models("lposs"), "pixel_refine": pixel_refine}
    seg = gclip.Segmenter(
        tiny_model,
        method="lposs",
        method_options=options,
        classes=["cat", "dog", "sky"],
        short_side=0,
        crop=32,
        stride=16,
    )
    image = np.random.default_rng(3).integers(0, 256, size=(50, 70, 3), dtype=np.uint8)
    result = seg.predict(image, return_probs=True)
    assert result.labels.shape == (50, 70) and np.isfinite(result.probs).all()
    assert seg.method.window_mode == "image"

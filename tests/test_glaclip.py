"""GLA-CLIP in the engine: its options and one-line errors, all windows of an image in one pass (and the difference
that makes), its reduction to ProxyCLIP's rule on one window, and its cross-window attention against the authors'
code on 3 x 3 windows. Parity on one window and on the photos: test_fidelity and test_pipeline_fidelity."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_second_models
from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.inference.forward import dense_logits
from gclip.inference.reference import reference_merged_logits
from gclip.methods import get_method
from gclip.methods.glaclip import GlaClip

CLASSES = ["cat", "dog, puppy", "sky"]
SMALL = {"short_side": 48, "crop": 32, "stride": 16, "padding": "symmetric"}
GOLDEN = Path(__file__).parent / "data" / "fidelity"


def test_defaults_are_the_authors_run():
    """predict.sh's flags over cfg.py's and eval.py's defaults (initial_crit_pos: the argument default, as the script
    never passes its variable)."""
    method = get_method("glaclip")
    assert method.cross_window and method.protocol == "glaclip"
    assert method.options() == {
        "proxy": "dino_vitb8",
        "proxy_checkpoint": None,
        "beta": 1.2,
        "gamma": 3.0,
        "proxy_anchor": True,
        "anchor_iters": 2,
        "anchor_threshold": 0.55,
        "token_norm": True,
        "dynamic_beta": True,
        "beta_alpha": 0.3,
        "dynamic_gamma": True,
        "gamma_alpha": 30.0,
        "temperature": 1.0,
        "cutting": 0.0,
    }


@pytest.mark.parametrize(
    "options, match",
    [
        ({"anchor_iters": -1}, "anchor_iters"),
        ({"anchor_iters": 1.5}, "anchor_iters"),
        ({"anchor_iters": True}, "anchor_iters"),
        ({"anchor_threshold": 1.0}, "anchor_threshold"),
        ({"anchor_threshold": -1.5}, "anchor_threshold"),
        ({"temperature": 0.0}, "temperature"),
        ({"gamma": 0.0}, "gamma"),
        ({"gamma_alpha": -1.0}, "gamma_alpha"),
    ],
)
def test_bad_options_are_one_line_errors(options, match):
    with pytest.raises(ConfigError, match=match) as err:
        get_method("glaclip", **options)
    assert "\n" not in str(err.value) and str(err.value).startswith("glaclip")


@dataclass
class EachWindowAlone(GlaClip):
    """The same attention with one window a pass (``window_mode = "crop"``): keys and values of its own window only."""

    window_mode = "crop"


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 256, size=(61, 83, 3), dtype=np.uint8)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_one_pass_an_image_sees_all_its_windows_and_the_reference_agrees(tiny_model, image, batch_size, monkeypatch):
    options = tiny_second_models("glaclip")
    seg = Segmenter(
        tiny_model, method="glaclip", method_options=options, classes=CLASSES, batch_size=batch_size, **SMALL
    )
    item = seg.prepare(image)
    _, plans, _ = seg._plan([item])
    seen = []
    attend = GlaClip.attend_across
    monkeypatch.setattr(GlaClip, "attend_across", lambda self, f, v: seen.append(f.shape[0]) or attend(self, f, v))
    got = seg.merged_logits([item])[0]
    assert seen == [len(plans[0])] and len(plans[0]) == 8  # all 8 windows in one pass, whatever the batch size
    torch.testing.assert_close(got, reference_merged_logits(seg, item), rtol=0, atol=1e-4)


def test_the_windows_attend_across_each_other(tiny_model, image):
    """Together each window's queries see every window's keys and values (and β counts the windows): the logits differ
    from the same attention run one window at a time."""
    options = tiny_second_models("glaclip")
    together = Segmenter(tiny_model, method="glaclip", method_options=options, classes=CLASSES, **SMALL)
    apart = Segmenter(tiny_model, method=EachWindowAlone(**options), classes=CLASSES, batch_size=1, **SMALL)
    item = together.prepare(image)
    assert (together.merged_logits([item])[0] - apart.merged_logits([item])[0]).abs().max() > 1e-3


def test_one_window_without_anchor_and_dynamic_norm_is_proxyclip(tiny_model, image):
    """Keys of one window, no anchor, ProxyCLIP's global mean, fixed β and γ: ProxyCLIP's attention (the cut at
    ``min(row max, 0)`` masks what ProxyCLIP's ``< 0`` masks while the row maximum is positive)."""
    from gclip.backbones.openclip import DenseViT

    proxy = tiny_second_models("glaclip")["proxy"]
    vit = DenseViT(tiny_model.visual)
    crops = torch.from_numpy(np.random.default_rng(3).standard_normal((2, 3, 32, 32), dtype=np.float32))
    width = tiny_model.visual.output_dim
    text = torch.nn.functional.normalize(torch.randn(3, width, generator=torch.Generator().manual_seed(4)), dim=-1)
    static = {"proxy_anchor": False, "token_norm": False, "dynamic_beta": False, "dynamic_gamma": False}
    for i in range(2):  # each crop its own pass: a single window
        one = crops[i : i + 1]
        gla = dense_logits(vit, get_method("glaclip", proxy=proxy, beta=0.9, gamma=2.5, **static), one, text)
        ref = dense_logits(vit, get_method("proxyclip", proxy=proxy, beta=0.9, gamma=2.5), one, text)
        torch.testing.assert_close(gla, ref, rtol=0, atol=1e-5)
    anchored = dense_logits(vit, get_method("glaclip", proxy=proxy), crops[:1], text)
    assert (anchored - ref).abs().max() > 1e-4  # the defaults are not ProxyCLIP's rule


@pytest.mark.golden
def test_cross_window_attention_matches_the_authors(vitb16_checkpoint, golden_dino):
    """The authors' forward_feature on the golden input cut into 3 x 3 windows of 224 / 112 (h_grids = w_grids = 3),
    as forward_kv_expansion cuts them (glaclip_windows.npy, README), against gclip's one pass over the nine; and not
    what the nine windows give one at a time."""
    from gclip.backbones.models import load_model
    from gclip.backbones.openclip import DenseViT

    vit = DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))
    crops = torch.cat([image[..., y : y + 224, x : x + 224] for y in (0, 112, 224) for x in (0, 112, 224)])
    method = get_method("glaclip", proxy=golden_dino, anchor_threshold=0.68, beta_alpha=0.0)
    got = dense_logits(vit, method, crops, text).numpy()
    expected = np.load(GOLDEN / "glaclip_windows.npy")
    assert got.shape == expected.shape == (9, 10, 28, 28)
    assert np.abs(got - expected).max() <= 1e-4
    alone = dense_logits(vit, dataclasses.replace(method), crops[4:5], text).numpy()
    assert np.abs(alone[0] - expected[4]).max() > 1e-2  # the centre window alone sees none of the others

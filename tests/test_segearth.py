"""SegEarth-OV: its SimFeatUp upsampler against the authors' code, its checkpoint errors, its xBD preset, the engine.

The crop goldens without the upsampler are in goldens.toml (tests/test_fidelity.py), the pipeline in pipelines.toml.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import gclip
from gclip.backbones.models import load_model
from gclip.backbones.openclip import DenseViT
from gclip.errors import WeightsError
from gclip.evaluation.protocols import resolve_preset
from gclip.inference.forward import dense_logits
from gclip.inference.reference import reference_labels, reference_merged_logits
from gclip.methods import get_method, methods_with_option
from gclip.methods.segearth import random_upsampler_state

GOLDEN = Path(__file__).parent / "data" / "fidelity"


def upsampler_checkpoint(path: Path, feat_dim: int = 512, seed: int = 0) -> str:
    """A random ``jbu_one`` checkpoint in SimFeatUp's layout (Lightning's ``state_dict``, ``upsampler.`` keys)."""
    torch.save({"state_dict": random_upsampler_state(feat_dim, seed)}, path)
    return str(path)


@pytest.mark.golden
def test_upsampled_crop_logits_match_the_authors(vitb16_checkpoint, tmp_path):
    """segearth_up.npy: the authors' forward_feature with feature_up=True on the top-left 224 x 224 of the shared
    input (README), every 4th pixel; gclip's logits on the same crop, and far from the bilinear resize."""
    vit = DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    crop = image[..., :224, :224]
    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))
    method = get_method("segearth", upsampler_checkpoint=upsampler_checkpoint(tmp_path / "jbu.ckpt"))
    method.check_resources("cpu", torch.float32)
    got = dense_logits(vit, method, crop, text)
    assert got.shape == (1, 10, 224, 224)
    expected = np.load(GOLDEN / "segearth_up.npy")
    assert np.abs(got[..., ::4, ::4].numpy() - expected).max() <= 1e-4
    plain = dense_logits(vit, get_method("segearth"), crop, text)
    bilinear = torch.nn.functional.interpolate(plain, size=(224, 224), mode="bilinear")[..., ::4, ::4]
    assert np.abs(bilinear.numpy() - expected).max() > 5e-3  # the upsampler does more than a resize


@pytest.mark.parametrize("content", [None, "not a checkpoint", "clip"])
def test_a_bad_upsampler_checkpoint_is_one_line(tmp_path, content):
    path = tmp_path / "jbu.ckpt"
    if content == "clip":  # a tensor state dict, but not an upsampler
        torch.save({"state_dict": {"upsampler.visual.proj": torch.zeros(2, 2)}}, path)
    elif content is not None:
        path.write_text(content)
    method = get_method("segearth", upsampler_checkpoint=str(path))
    with pytest.raises(WeightsError) as info:
        method.check_resources("cpu", torch.float32)
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_upsampler_checkpoint_mismatch_names_the_architecture(tmp_path):
    state = random_upsampler_state(64)
    state["upsampler.up.extra"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "jbu.ckpt")
    with pytest.raises(WeightsError, match="jbu_one"):
        get_method("segearth", upsampler_checkpoint=str(tmp_path / "jbu.ckpt")).check_resources("cpu", torch.float32)


def test_the_upsampler_checkpoint_is_a_command_line_option():
    assert methods_with_option("upsampler_checkpoint") == ["segearth"]


def test_xbd_runs_without_the_cls_term_as_the_authors_config():
    assert resolve_preset("segearth", "xbd").method_options == {"cls_token_lambda": 0.0}
    assert resolve_preset("segearth", "loveda").method_options == {}  # the method's default, -0.3
    assert get_method("segearth").cls_token_lambda == -0.3
    assert resolve_preset("clearclip", "xbd").method_options == {}  # a method without the option ignores it


@pytest.mark.parametrize("settings", [dict(short_side=0, crop=32, stride=16), dict(short_side=40, crop=24, stride=16)])
def test_engine_with_the_upsampler_equals_the_reference_loop(tiny_model, tmp_path, settings):
    width = tiny_model.visual.output_dim
    options = dict(upsampler_checkpoint=upsampler_checkpoint(tmp_path / "jbu.ckpt", width))
    seg = gclip.Segmenter(tiny_model, method="segearth", classes=["a", "b, c", "d"], method_options=options, **settings)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, size=shape, dtype=np.uint8) for shape in [(61, 83, 3), (40, 37, 3)]]
    prepared = [seg.prepare(img) for img in images]
    for img, result, merged, item in zip(images, seg.predict_batch(images), seg.merged_logits(prepared), prepared):
        np.testing.assert_array_equal(result.labels, reference_labels(seg, img))
        torch.testing.assert_close(merged, reference_merged_logits(seg, item), rtol=0, atol=1e-4)

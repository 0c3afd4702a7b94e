"""Trident: its SAM steps against segment-anything's own modules, the authors' input alignment, the whole-image
engine path and its errors. Parity with the authors' code: test_pipeline_fidelity."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_second_models
from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.inference.preprocess import Prepared
from gclip.inference.reference import reference_labels
from gclip.methods.trident import aligned_shape, sam_guidance, sam_input, sam_last_attention, sam_pixels

pytest.importorskip("segment_anything")


def test_aligned_shape_is_the_authors_resize():
    assert aligned_shape(448, 597, 16, 336) == (464, 608)  # long side to 608, short side 456 -> 464
    assert aligned_shape(448, 592, 16, 336) == (448, 592)  # aligned: unchanged
    assert aligned_shape(300, 301, 16, 336) == (336, 336)  # at least the crop


def test_sam_input_is_the_predictors_input():
    from segment_anything.predictor import SamPredictor

    from conftest import make_tiny_full_sam

    sam = make_tiny_full_sam()
    original = np.random.default_rng(0).integers(0, 256, (45, 70, 3), dtype=np.uint8)
    x, size = sam_input(sam_pixels(original, 8), 64)
    import cv2

    predictor = SamPredictor(sam)
    predictor.set_image(cv2.resize(original, (72, 48)))  # the authors' cv2 resize to patch multiples first
    assert size == predictor.input_size
    with torch.no_grad():
        assert torch.allclose(
            sam.image_encoder.neck(_encoder_tokens(sam.image_encoder, x)), predictor.features, atol=1e-5
        )


def _encoder_tokens(encoder, x):
    x = encoder.patch_embed(x) + encoder.pos_embed
    for blk in encoder.blocks:
        x = blk(x)
    return x.permute(0, 3, 1, 2)


def test_sam_last_attention_rebuilds_the_last_block():
    from conftest import make_tiny_sam

    encoder = make_tiny_sam()
    x = torch.randn(1, 3, 64, 64)
    seen = {}
    encoder.blocks[-1].register_forward_hook(lambda mod, inp, out: seen.update(inp=inp[0], out=out))
    with torch.no_grad():
        encoder(x)
        attn, v = sam_last_attention(encoder, x)
        last = encoder.blocks[-1]
        b, heads, h, w, d = v.shape
        mixed = (attn.reshape(b * heads, h * w, h * w) @ v.reshape(b * heads, h * w, d)).view(b, heads, h, w, d)
        y = seen["inp"] + last.attn.proj(mixed.permute(0, 2, 3, 1, 4).reshape(b, h, w, -1))
        y = y + last.mlp(last.norm2(y))
    assert torch.allclose(attn.sum(-1), torch.ones(1, heads, h * w), atol=1e-5)
    assert torch.allclose(y, seen["out"], atol=1e-5)


def test_sam_guidance_keeps_similar_values_and_renormalises():
    attn = torch.full((1, 1, 4, 4), 0.25)
    v = torch.tensor([[1.0, 0], [1, 0.1], [0, 1], [0.1, 1]]).view(1, 1, 2, 2, 2)
    guide = sam_guidance(attn, v, (2, 2), cos_fac=1.2, refine_neg_cos=True)
    assert torch.allclose(guide.sum(-1), torch.ones(4))
    assert guide[0, 2] == 0 and guide[0, 0] > 0  # token 0 keeps its like (1) and drops the unlike (2, 3)


@pytest.mark.parametrize("halves", [False, True])
def test_trident_engine_equals_its_reference(tiny_model, rgb_image, halves):
    seg = Segmenter(
        tiny_model,
        method="trident",
        method_options={**tiny_second_models("trident"), "split_halves": halves},
        short_side=40,
        crop=32,
        stride=16,
    )
    seg.set_classes(["cat", "dog", "grass"])
    got = seg.predict(rgb_image, return_probs=True)
    assert got.labels.shape == rgb_image.shape[:2] and np.isfinite(got.probs).all()
    assert np.array_equal(got.labels, reference_labels(seg, rgb_image))
    logits = seg.merged_logits([seg.prepare(rgb_image)])[0]
    assert logits.shape[0] == 3 and logits.shape[-2:] != rgb_image.shape[:2]  # on SAM's grid, resized later


def test_trident_errors_are_one_line(tiny_model, rgb_image):
    options = tiny_second_models("trident")
    seg = Segmenter(tiny_model, method="trident", method_options=options, short_side=40, crop=30, stride=16)
    seg.set_classes(["a", "b"])
    with pytest.raises(ConfigError, match="multiples of the patch"):
        seg.predict(rgb_image)
    seg = Segmenter(tiny_model, method="trident", method_options=options, short_side=40, crop=32, stride=16)
    seg.set_classes(["a", "b"])
    bare = Prepared(seg.prepare(rgb_image).image, rgb_image.shape[:2])
    with pytest.raises(ConfigError, match="decoded pixels"):
        seg.infer([bare])


def test_only_trident_keeps_the_decoded_pixels(tiny_model, rgb_image):
    assert Segmenter(tiny_model, method="trident").prepare(rgb_image).original is not None
    assert Segmenter(tiny_model, method="clearclip").prepare(rgb_image).original is None


def test_trident_images_are_independent_and_leave_the_model_alone(tiny_model, rgb_image):
    before = {k: v.clone() for k, v in tiny_model.clip.state_dict().items()}
    options = tiny_second_models("trident")
    seg = Segmenter(tiny_model, method="trident", method_options=options, short_side=40, crop=32, stride=16)
    seg.set_classes(["cat", "dog", "grass"])
    other = np.ascontiguousarray(rgb_image[:, ::-1])
    both = seg.predict_batch([rgb_image, other], return_probs=True)
    for image, result in zip((rgb_image, other), both):
        alone = seg.predict(image, return_probs=True)
        assert np.array_equal(alone.labels, result.labels) and np.allclose(alone.probs, result.probs)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.clip.state_dict().items())

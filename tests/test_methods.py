"""Every registered method: shapes, batching, options; GCLIP's fusion and suppression against independent code."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import crop_methods, make_tiny, tiny_second_models
from gclip.backbones.openclip import DenseViT
from gclip.errors import ConfigError
from gclip.inference.forward import dense_features
from gclip.methods import get_method, list_methods
from gclip.methods.gclip import default_emerging_blocks, suppress_channel

torch.set_grad_enabled(False)


CROP_METHODS = crop_methods()  # a whole-image method (Trident) is tested in its own file


@pytest.fixture(scope="module")
def deep_model():
    return make_tiny(layers=5, seed=1)


def test_registry_finds_every_method_module():
    """Registration is automatic: every module of gclip/methods (but the private ones, the base and GCLIP's
    auto-configuration beside GCLIP) registers one method."""
    from pathlib import Path

    import gclip.methods

    modules = {p.stem for p in Path(gclip.methods.__file__).parent.glob("*.py")} - {"__init__", "base", "pieces"}
    modules = {m for m in modules if not m.startswith("_")}
    assert set(list_methods()) == modules
    assert list_methods()[:6] == ["clip", "maskclip", "sclip", "clearclip", "naclip", "gclip"]


@pytest.mark.parametrize("method", CROP_METHODS)
def test_dense_features_shape_and_finite(deep_model, method):
    m, vit = get_method(method, **tiny_second_models(method)), DenseViT(deep_model.visual)
    feats = dense_features(vit, m, torch.randn(2, 3, 40, 24))
    expected = (10, 6) if m.name in ("proxyclip", "glaclip") else (5, 3)  # on the second model's grid (patch 4)
    assert m.output_grid(vit, (40, 24)) == expected
    assert feats.shape == (2, *expected, 32)
    assert torch.isfinite(feats).all()


@pytest.mark.parametrize("method", CROP_METHODS)
def test_batch_equals_one_at_a_time(deep_model, method):
    vit, m = DenseViT(deep_model.visual), get_method(method, **tiny_second_models(method))
    images = torch.randn(3, 3, 32, 32)
    together = dense_features(vit, m, images)
    alone = torch.cat([dense_features(vit, m, images[i : i + 1]) for i in range(3)])
    if m.cross_window:  # a pass is the windows of one image, and they see each other
        assert (together - alone).abs().max() > 1e-3
    else:
        assert (together - alone).abs().max() <= 1e-5


@pytest.mark.parametrize("method", CROP_METHODS)
def test_methods_never_modify_the_model(deep_model, method):
    before = {k: v.clone() for k, v in deep_model.state_dict().items()}
    m = get_method(method, **tiny_second_models(method))
    dense_features(DenseViT(deep_model.visual), m, torch.randn(1, 3, 32, 32))
    after = deep_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


SAME_FEATURES = {("freecp", "gem"): "FreeCP's dense features are its base's (GEM by default); it purifies class maps"}


def test_methods_differ_from_each_other(deep_model):
    vit, images = DenseViT(deep_model.visual), torch.randn(1, 3, 32, 32)
    feats = {m: dense_features(vit, get_method(m, **tiny_second_models(m)), images) for m in CROP_METHODS}
    for a, b in SAME_FEATURES:
        assert torch.equal(feats[a], feats[b]), (a, b)
    for a in feats:
        for b in feats:
            if a < b and feats[a].shape == feats[b].shape and (a, b) not in SAME_FEATURES:  # (a second model's grid)
                assert not torch.allclose(feats[a], feats[b], atol=1e-4), (a, b)


@pytest.mark.parametrize(
    ("depth", "expected"), [(12, [6, 7]), (24, [12, 13]), (32, [16, 17]), (2, [0]), (3, [1]), (5, [2, 3])]
)
def test_default_emerging_blocks(depth, expected):
    assert default_emerging_blocks(depth) == expected


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"emerging_blocks": [9]}, "within 0..3"),
        ({"emerging_blocks": []}, "non-empty"),
        ({"fusion_weights": [1.0]}, "needs 3 positive weights"),
        ({"fusion": "max"}, "fusion must be one of 'mean', 'per_head', got 'max'"),  # checked when built
        ({"cs_blocks": [4]}, "cs_blocks"),
    ],
)
def test_gclip_bad_options_say_what_is_wrong(deep_model, options, message):
    with pytest.raises(ConfigError, match=message):
        dense_features(DenseViT(deep_model.visual), get_method("gclip", **options), torch.randn(1, 3, 16, 16))


def test_unknown_method_or_option():
    with pytest.raises(ConfigError, match="unknown method 'foo'"):
        get_method("foo")
    with pytest.raises(ConfigError, match="has no option 'window'"):
        get_method("clearclip", window=3)


def test_suppress_channel_on_a_known_matrix():
    weight = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.0, 0.0], [0.0, 2.0]])  # row norms 5, 1, 1, 2
    new, channel, ratio = suppress_channel(weight, "mean")
    assert channel == 0 and ratio == pytest.approx(5 / (4 / 3))
    assert new[0].norm().item() == pytest.approx(4 / 3)
    assert torch.equal(new[1:], weight[1:]) and torch.equal(weight[0], torch.tensor([3.0, 4.0]))
    assert suppress_channel(weight, "median")[0][0].norm().item() == pytest.approx(1.0)


def _independent_gclip(model, images, emerging, cs_blocks, weights, per_head):
    """GCLIP written out directly on a suppressed deep copy of the model, in float64."""
    model = copy.deepcopy(model).double()
    visual = model.visual
    for i in cs_blocks:
        w = visual.transformer.resblocks[i].mlp.c_proj.weight
        norms = w.norm(dim=1)
        c = int(norms.argmax())
        w[c] *= torch.cat([norms[:c], norms[c + 1 :]]).mean() / norms[c]
    x = visual.conv1(images.double())
    b, d, gh, gw = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([visual.class_embedding.expand(b, 1, d), x], 1) + visual.positional_embedding  # native grid
    x = visual.ln_pre(x)
    blocks = visual.transformer.resblocks
    heads = blocks[0].attn.num_heads
    inputs = {}
    for i in range(len(blocks) - 1):
        inputs[i] = x
        x = blocks[i](x)

    def split(t):
        return t.reshape(b, -1, heads, d // heads).transpose(1, 2)

    def qkv(block, t):
        y = block.ln_1(t)
        return [split(z) for z in (y @ block.attn.in_proj_weight.T + block.attn.in_proj_bias).chunk(3, -1)]

    def softmax_map(a, c):
        return torch.softmax(a @ c.transpose(-1, -2) / (d // heads) ** 0.5, -1)

    q, _, v = qkv(blocks[-1], x)
    maps = [softmax_map(q, q)] + [softmax_map(*qkv(blocks[i], inputs[i])[:2]) for i in emerging]
    total = sum(weights)
    if per_head:
        fused = sum(w / total * m for w, m in zip(weights, maps))
        out = (fused @ v).transpose(1, 2).reshape(b, -1, d)
    else:
        fused = sum(w / total * m.mean(1) for w, m in zip(weights, maps))
        out = fused @ v.transpose(1, 2).reshape(b, -1, d)
    out = blocks[-1].attn.out_proj(out)
    return (visual.ln_post(out[:, 1:]) @ visual.proj).reshape(b, gh, gw, -1)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"emerging_blocks": [1, 2], "fusion_weights": [2.0, 1.0, 1.0]},
        {"emerging_blocks": [0, 3], "fusion": "per_head", "cs_blocks": [1, 2, 3]},
        {"emerging_blocks": [2], "channel_suppression": False},
    ],
)
def test_gclip_equals_independent_computation(deep_model, options):
    images = torch.randn(2, 3, 32, 32)  # the native 4x4 grid: no resampling involved
    method = get_method("gclip", **options)
    vit = DenseViT(deep_model.visual)
    ours = dense_features(vit, method, images).double()
    emerging = method.blocks_for(vit)
    weights = options.get("fusion_weights", [1.0] * (1 + len(emerging)))
    expected = _independent_gclip(
        deep_model, images, emerging, method.suppressed_blocks(vit), weights, options.get("fusion") == "per_head"
    )
    assert (ours - expected).abs().max() < 1e-4


def test_gclip_suppresses_after_the_last_emerging_block(deep_model):
    vit = DenseViT(deep_model.visual)
    assert get_method("gclip").suppressed_blocks(vit) == [3]  # depth 5: emerging [2, 3], CS 3..3
    assert get_method("gclip", emerging_blocks=[1]).suppressed_blocks(vit) == [1, 2, 3]
    assert get_method("gclip", channel_suppression=False).suppressed_blocks(vit) == []


def test_dihclip_keeps_the_lowest_entropy_heads_per_window():
    """DIH-CLIP's Selective Head Attention: per window, the heads whose whole-map entropy is among the ``topk_sha``
    lowest, heads tied with the last kept one kept too (the authors' ``metrics[i] in sorted_metrics[:k]``)."""
    from gclip.methods.dihclip import DihClip

    uniform = torch.full((3, 3), 1 / 3)
    sharp = torch.eye(3)
    half = torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [0.5, 0.0, 0.5]])
    maps = torch.stack([torch.stack([uniform, sharp, half, uniform]), torch.stack([half, uniform, uniform, sharp])])
    two = DihClip(topk_sha=2)
    assert two.selected_heads(maps).tolist() == [[False, True, True, False], [True, False, False, True]]
    assert DihClip(topk_sha=1).selected_heads(maps).tolist() == [[False, True, False, False], [False] * 3 + [True]]
    tied = torch.stack([torch.stack([sharp, half, half, uniform])])
    assert two.selected_heads(tied).tolist() == [[True, True, True, False]]  # the 2nd lowest is tied: 3 kept
    assert DihClip(topk_sha=9).selected_heads(maps).all()
    assert DihClip(_heads=((), (3,))).selected_heads(maps, 1).tolist() == [[False, False, False, True]] * 2
    vit = DenseViT(make_tiny(layers=3).visual)
    with pytest.raises(ConfigError, match="topk_sha"):
        dense_features(vit, get_method("dihclip", topk_sha=0), torch.randn(1, 3, 16, 16))


def test_dihclip_selection_is_per_window(deep_model):
    vit, m = DenseViT(deep_model.visual), get_method("dihclip", topk_sha=1)
    images = torch.randn(3, 3, 32, 32)
    together = dense_features(vit, m, images)
    alone = torch.cat([dense_features(vit, m, images[i : i + 1]) for i in range(3)])
    if m.cross_window:  # a pass is the windows of one image, and they see each other
        assert (together - alone).abs().max() > 1e-3
    else:
        assert (together - alone).abs().max() <= 1e-5
    assert (together - dense_features(vit, get_method("dihclip"), images)).abs().max() > 1e-3  # a choice is made

"""The dense walk reproduces open_clip's own modules; position-embedding resampling; both attention blocks."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from conftest import crop_methods, make_tiny, tiny_second_models
from gclip.backbones.openclip import DenseViT, resample_pos_embed
from gclip.inference.forward import dense_features
from gclip.methods import Trace, get_method
from gclip.methods.pieces import run_block


def _tiny(block_type: str | None = None) -> torch.nn.Module:
    return make_tiny(seed=3, block_type=block_type)


@pytest.fixture(scope="module")
def tiny_vit():
    return DenseViT(_tiny().visual)


def test_shape_facts_come_from_the_model(tiny_vit):
    assert (tiny_vit.patch_size, tiny_vit.width, tiny_vit.depth, tiny_vit.heads) == (8, 64, 2, 4)


@torch.no_grad()
def test_walk_and_clip_last_block_equal_open_clip_forward(tiny_vit):
    images = torch.randn(2, 3, 32, 32)
    x, grid = tiny_vit.embed(images)
    assert grid == (4, 4)
    for i in range(tiny_vit.depth - 1):  # the walk of blocks 0..L-2 (the engine's, for a method without changes)
        x = run_block(tiny_vit, i, x, None, Trace(grid))
    tokens = tiny_vit.block(tiny_vit.depth - 1, x)  # the unchanged last block: what vanilla CLIP reads
    # the manual last block equals open_clip's own module (nn.MultiheadAttention inside)
    reference = tiny_vit.blocks[-1](x)
    assert torch.allclose(tokens, reference, atol=1e-5)
    # and the CLS token through ln_post/proj is open_clip's image embedding
    cls = tiny_vit.visual.ln_post(tokens[:, 0]) @ tiny_vit.visual.proj
    assert torch.allclose(cls, tiny_vit.visual(images), atol=1e-5)
    # and the clip method's features are those tokens' patches, projected
    feats = tiny_vit.project(tiny_vit.patches(tokens)).reshape(2, 4, 4, -1)
    torch.testing.assert_close(dense_features(tiny_vit, get_method("clip"), images), feats, rtol=0, atol=1e-5)


@torch.no_grad()
def test_qkv_attention_equals_multihead_attention(tiny_vit):
    x, _ = tiny_vit.embed(torch.randn(1, 3, 32, 40))
    block = tiny_vit.blocks[0]
    q, k, v = tiny_vit.qkv(0, x)
    ours = tiny_vit.out_proj(0, F.scaled_dot_product_attention(q, k, v))
    y = block.ln_1(x)
    theirs = block.attn(y, y, y, need_weights=False)[0]
    assert torch.allclose(ours, theirs, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("method", crop_methods())
def test_custom_attention_block_gives_the_same_features(method):
    """open_clip's newer custom Attention block holds the same parameters: same outputs."""
    mha, custom = _tiny(), _tiny("custom")
    assert type(custom.visual.transformer.resblocks[0].attn).__name__ == "Attention"
    from gclip.inference.forward import dense_features

    images = torch.randn(1, 3, 40, 32)
    m = get_method(method, **tiny_second_models(method))
    a = dense_features(DenseViT(mha.visual), m, images)
    b = dense_features(DenseViT(custom.visual), m, images)
    assert torch.allclose(a, b, atol=1e-5)


@torch.no_grad()
def test_tower_with_head_scale_and_inner_norm():
    """``scale_heads`` / ``scale_attn_inner`` towers: every attention output goes through the block's own per-head
    scale and inner norm, so the walk equals open_clip's modules and GCLIP's CPU and GPU formulations agree."""
    model = make_tiny(layers=3, scale_heads=True, scale_attn_inner=True)
    vit = DenseViT(model.visual)
    attn = vit.blocks[0].attn
    assert attn.head_scale is not None and not torch.allclose(attn.head_scale, torch.ones_like(attn.head_scale))
    assert not isinstance(attn.ln_inner, torch.nn.Identity)
    images = torch.randn(2, 3, 32, 40)
    x, _ = vit.embed(images)
    for i in range(vit.depth):
        handle = _no_module_attention(vit.blocks[i])
        try:
            ours = vit.block(i, x)
        finally:
            handle.remove()
        torch.testing.assert_close(ours, vit.blocks[i](x), rtol=1e-5, atol=1e-5)
        x = ours
    from gclip.inference.forward import dense_features

    feats = {
        impl: dense_features(vit, dataclasses.replace(get_method("gclip", emerging_blocks=[0, 1]), _impl=impl), images)
        for impl in ("looped", "sdpa", "maps")
    }
    torch.testing.assert_close(feats["looped"], feats["maps"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(feats["sdpa"], feats["maps"], rtol=1e-5, atol=1e-5)


def test_resample_keeps_native_grid_and_cls():
    pos = torch.randn(1 + 14 * 14, 8)
    assert resample_pos_embed(pos, (14, 14)) is pos
    out = resample_pos_embed(pos, (28, 21))
    assert out.shape == (1 + 28 * 21, 8)
    assert torch.equal(out[0], pos[0])


def test_resample_uses_the_plus_point_one_scale_rule():
    """Sampling follows scale_factor=(g+0.1)/G (not size=g), rows first: compare with an independent bicubic."""
    side, grid = 4, (6, 5)
    pos = torch.randn(1 + side * side, 3, dtype=torch.float64)
    out = resample_pos_embed(pos, grid)[1:].reshape(*grid, 3)

    def cubic(t: float) -> float:
        a, t = -0.75, abs(t)
        if t <= 1:
            return (a + 2) * t**3 - (a + 3) * t**2 + 1
        if t < 2:
            return a * t**3 - 5 * a * t**2 + 8 * a * t - 4 * a
        return 0.0

    def weights(n_out: int) -> torch.Tensor:
        w = torch.zeros(n_out, side, dtype=torch.float64)
        for i in range(n_out):
            src = (i + 0.5) * side / (n_out + 0.1) - 0.5
            base = int(torch.floor(torch.tensor(src)))
            for j in range(base - 1, base + 3):
                w[i, min(max(j, 0), side - 1)] += cubic(src - j)
        return w

    grid_pos = pos[1:].reshape(side, side, 3)
    expected = torch.einsum("ia,abc,jb->ijc", weights(grid[0]), grid_pos, weights(grid[1]))
    assert torch.allclose(out, expected, atol=1e-6)


def _no_module_attention(block: torch.nn.Module):
    def refuse(*_args, **_kwargs):
        raise AssertionError("the attention module was called")

    return block.attn.register_forward_pre_hook(refuse)


@torch.no_grad()
@pytest.mark.parametrize("block_type", [None, "custom"])
def test_run_block_computes_the_block_without_the_attention_module(block_type):
    """The walk's own block (SDPA on q/k/v) equals open_clip's module, with and without a c_proj override."""
    vit = DenseViT(_tiny(block_type).visual)
    x, _ = vit.embed(torch.randn(2, 3, 32, 40))
    block = vit.blocks[0]
    expected = block(x)
    weight = torch.randn_like(block.mlp.c_proj.weight)
    expected_cs = torch.func.functional_call(block, {"mlp.c_proj.weight": weight}, (x,))
    handle = _no_module_attention(block)
    try:
        got = vit.run_block(0, x)
        got_cs = vit.run_block(0, x, {"mlp.c_proj.weight": weight})
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got_cs, expected_cs, rtol=1e-5, atol=1e-5)
    assert not torch.equal(got, got_cs)


@torch.no_grad()
def test_run_block_reproduces_custom_attention_options():
    """qk_norm, per-head scale, inner/attention/MLP norms and layer scale of open_clip's custom block."""
    from open_clip.transformer import CustomResidualAttentionBlock

    vit = DenseViT(_tiny("custom").visual)
    torch.manual_seed(0)
    block = CustomResidualAttentionBlock(
        64, 4, ls_init_value=0.5, qk_norm=True, scale_heads=True, scale_attn_inner=True, scale_attn=True, scale_fc=True
    ).eval()
    for p in block.parameters():
        p.add_(0.1 * torch.randn_like(p))
    vit.blocks[0] = block
    x, _ = vit.embed(torch.randn(1, 3, 32, 32))
    expected = block(x)
    handle = _no_module_attention(block)
    try:
        got = vit.run_block(0, x)
    finally:
        handle.remove()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


@torch.no_grad()
def test_run_block_falls_back_to_the_module_for_options_it_does_not_reproduce_and_other_overrides():
    vit = DenseViT(_tiny().visual)
    block = vit.blocks[0]
    block.attn = torch.nn.MultiheadAttention(64, 4, add_bias_kv=True, batch_first=True).eval()  # bias_k: not ours
    x, _ = vit.embed(torch.randn(1, 3, 32, 32))
    calls = []
    handle = block.attn.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        torch.testing.assert_close(vit.run_block(0, x), block(x), rtol=0, atol=0)
        assert len(calls) == 2  # ours and the reference both went through the module
        calls.clear()
        plain = DenseViT(_tiny().visual)
        bias = torch.randn_like(plain.blocks[0].mlp.c_fc.bias)
        expected = torch.func.functional_call(plain.blocks[0], {"mlp.c_fc.bias": bias}, (x,))
        torch.testing.assert_close(plain.run_block(0, x, {"mlp.c_fc.bias": bias}), expected, rtol=0, atol=0)
    finally:
        handle.remove()

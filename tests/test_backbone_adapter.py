"""The backbone adapter: open_clip's ViT through the interface, the one fingerprint, and the second adapter
(:class:`gclip.backbones.TimmViT`: timm's ViT, here without a CLS token and with register tokens) that the methods
run on without any change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gclip.backbones import Backbone, DenseViT, TimmViT, backbone_for, fingerprint
from gclip.errors import ConfigError, WeightsError
from gclip.inference.forward import dense_features
from gclip.methods import get_method

torch.set_grad_enabled(False)


def timm_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, **kwargs)
    with torch.no_grad():  # every norm and layer scale away from its init, so that a skipped one shows
        for name, p in model.named_parameters():
            if p.dim() == 1 and "fc" not in name and "qkv" not in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


TOWERS = {
    "registers_no_cls": dict(class_token=False, reg_tokens=2, global_pool="avg"),
    "cls_registers_positioned": dict(reg_tokens=4),
    "no_embed_class": dict(reg_tokens=4, no_embed_class=True),
    "dinov2_like": dict(reg_tokens=4, no_embed_class=True, init_values=1e-1, qk_norm=True),
    "inner_norms": dict(scale_attn_norm=True, scale_mlp_norm=True, pre_norm=True, embed_norm_layer=nn.LayerNorm),
    "no_pos_embed": dict(pos_embed="none", class_token=False, global_pool="avg"),
    "res_post": dict(block_fn="ResPostBlock", init_values=0.5),
    "swiglu": dict(mlp_layer="SwiGLU", reg_tokens=1),
}


def tower(name: str) -> nn.Module:
    kwargs = dict(TOWERS[name])
    if kwargs.get("block_fn") == "ResPostBlock":
        from timm.models.vision_transformer import ResPostBlock

        kwargs["block_fn"] = ResPostBlock
    if kwargs.get("mlp_layer") == "SwiGLU":
        from timm.layers import SwiGLU

        kwargs["mlp_layer"] = SwiGLU
    return timm_vit(**kwargs)


@pytest.mark.parametrize("name", sorted(TOWERS))
def test_the_timm_adapter_walks_as_its_tower_does(name):
    """The unmodified walk is timm's ``forward_features``; the walk taken apart (q/k/v, attention, out_proj,
    residual, FFN) is the block."""
    model = tower(name)
    vit = backbone_for(model)
    assert isinstance(vit, TimmViT) and vit.prefix_tokens == model.num_prefix_tokens
    images = torch.randn(2, 3, 32, 32)
    x, grid = vit.embed(images)
    for i in range(vit.depth):
        apart = vit.block(i, x, attention=sdpa)
        x = vit.block(i, x)
        torch.testing.assert_close(apart, x, rtol=0, atol=1e-5)
    torch.testing.assert_close(vit.final_norm(x), model.forward_features(images), rtol=0, atol=1e-5)
    assert grid == (4, 4) == vit.native_grid and vit.patches(x).shape == (2, 16, 32)
    torch.testing.assert_close(vit.project(vit.patches(x)), model.forward_features(images)[:, vit.prefix_tokens :])


@pytest.mark.parametrize("name", ["cls_registers_positioned", "dinov2_like", "registers_no_cls"])
def test_the_timm_adapter_resamples_its_position_embedding_as_timm_does(name):
    """At another grid, ``pos_rule="antialias"`` is timm's own ``dynamic_img_size`` resampling (prefix rows kept)."""
    model = timm_vit(dynamic_img_size=True, **TOWERS[name])
    vit = TimmViT(model)
    images = torch.randn(1, 3, 40, 56)
    x, grid = vit.embed(images, "antialias")
    for i in range(vit.depth):
        x = vit.block(i, x)
    torch.testing.assert_close(vit.final_norm(x), model.forward_features(images), rtol=0, atol=1e-5)
    assert grid == (5, 7) and vit.pos_embed(grid, "antialias") is vit.pos_embed((5, 7), "antialias")  # cached
    assert vit.pos_embed(grid, "sclip").shape == (vit.pos_prefix + 35, 32)
    assert vit.pos_embed(grid, "sclip") is not vit.pos_embed(grid, "antialias")


def test_the_timm_adapter_changes_blocks_as_methods_ask():
    model = tower("dinov2_like")
    vit = TimmViT(model, projection=torch.eye(32)[:, :8])
    x, _ = vit.embed(torch.randn(1, 3, 32, 32))
    zero = torch.zeros_like(vit.ffn_out_weight(0))
    no_ffn = x + vit.attn_residual(0, vit.out_proj(0, sdpa(*vit.qkv(0, x))))
    torch.testing.assert_close(vit.block(0, x, overrides={"ffn_out_weight": zero}), no_ffn + vit.ffn(0, no_ffn, zero))
    torch.testing.assert_close(
        vit.block(0, x, overrides={"mlp.fc2.weight": zero}), vit.block(0, x, sdpa, True, True, {"ffn_out_weight": zero})
    )
    attn_only = vit.block(0, x, attention=sdpa, residual=False, ffn=False)
    assert attn_only.shape == x.shape and not torch.allclose(attn_only, no_ffn)
    with pytest.raises(ValueError, match="only 'ffn_out_weight'"):
        vit.block(0, x, attention=sdpa, overrides={"norm1.weight": torch.ones(32)})
    assert vit.project(torch.randn(1, 16, 32)).shape == (1, 16, 8) and vit.mean == (0.485, 0.456, 0.406)
    assert vit.fingerprint() == fingerprint(model) and vit.ffn_module(1) is model.blocks[1].mlp


@pytest.mark.parametrize("method", ["clip", "maskclip", "sclip", "clearclip", "naclip", "gclip", "resclip"])
def test_methods_run_unchanged_on_a_tower_without_cls_and_with_registers(method):
    """No CLS token, two register tokens: the patch grid comes out right; the unmodified walk is the tower's."""
    model = tower("registers_no_cls")
    vit = backbone_for(model)
    images = torch.randn(2, 3, 32, 32)
    feats = dense_features(vit, get_method(method), images)
    assert feats.shape == (2, 4, 4, 32) and torch.isfinite(feats).all()
    if method == "clip":
        expected = model.forward_features(images)[:, vit.prefix_tokens :].reshape(2, 4, 4, 32)
        torch.testing.assert_close(feats, expected, rtol=0, atol=1e-5)


def test_a_method_reading_the_cls_token_refuses_a_tower_without_one():
    vit = TimmViT(timm_vit(class_token=False, reg_tokens=1, global_pool="avg"))
    with pytest.raises(ConfigError, match="no CLS token"):
        dense_features(vit, get_method("cliptrase"), torch.randn(1, 3, 32, 32))
    with pytest.raises(ConfigError, match="pm='SOM' reads the CLS token's attention"):
        dense_features(vit, get_method("sfp"), torch.randn(1, 3, 32, 32))


def test_open_clip_vit_is_a_backbone(tiny_model):
    vit = backbone_for(tiny_model.visual, tiny_model.mean, tiny_model.std)
    assert isinstance(vit, DenseViT) and isinstance(vit, Backbone)
    assert (vit.prefix_tokens, vit.has_cls, vit.mean) == (1, True, tuple(tiny_model.mean))
    x, grid = vit.embed(torch.randn(1, 3, 32, 40))
    assert vit.patches(x).shape[1] == grid[0] * grid[1] and torch.equal(vit.cls(x), x[:, 0])
    tokens = torch.randn(1, 5, vit.width)
    torch.testing.assert_close(vit.project(tokens), tiny_model.visual.ln_post(tokens) @ tiny_model.visual.proj)
    assert vit.native_grid == (tiny_model.visual.grid_size[0], tiny_model.visual.grid_size[1])


def test_backbone_for_refuses_an_unknown_tower_in_one_line():
    with pytest.raises(
        WeightsError, match=r"^Linear: no dense-walk adapter for this image tower \(open_clip and timm ViTs only\)$"
    ):
        backbone_for(nn.Linear(2, 2))
    from timm.models.vision_transformer import ParallelScalingBlock

    with pytest.raises(
        WeightsError, match=r"^timm ViT block ParallelScalingBlock: no dense-walk adapter for this block layout$"
    ):
        backbone_for(timm_vit(block_fn=ParallelScalingBlock))


def test_one_fingerprint_follows_the_weights():
    a, b = nn.Linear(256, 64), nn.Linear(256, 64)  # 16,384 weights: every 4th one is sampled
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.weight[17, 3] += 1e-3  # one value, off the sampled stride (index 4355): the sum still moves
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(nn.Linear(256, 64)) != fingerprint(a)


@pytest.mark.parametrize("name", ["cls_registers_positioned", "dinov2_like", "registers_no_cls"])
def test_second_models_walk_through_the_same_adapter(name):
    """A second model's walk is its :class:`TimmViT`'s: timm's own forward at the native grid and, resampled by the
    spec's rule, at another (CLS and register positions kept, or none)."""
    from gclip.backbones.second_models import SecondModel, SecondModelSpec

    model = timm_vit(dynamic_img_size=True, **TOWERS[name]).requires_grad_(False)
    second = SecondModel("tiny", SecondModelSpec("tiny", pos_rule="antialias", mean=(0.5,) * 3, std=(0.5,) * 3), model)
    assert isinstance(second.vit, TimmViT) and second.vit.module is model and second.vit.mean == (0.5,) * 3
    for size in ((32, 32), (40, 56)):
        images = torch.randn(1, 3, *size)
        tokens = model.forward_features(images)[:, model.num_prefix_tokens :]
        expected = tokens.transpose(1, 2).reshape(1, 32, size[0] // 8, size[1] // 8)
        torch.testing.assert_close(second.features(images), expected, rtol=0, atol=1e-5)
        q, k, v, grid = second.last_qkv(images)
        assert q.shape == k.shape == v.shape == (1, 2, grid[0] * grid[1], 16)
    second.warm((40, 56))
    assert second.pos_embed((40, 56)) is second.vit.pos_embed((5, 7), "antialias")
    assert second.fingerprint == second.vit.fingerprint()


def test_sams_encoder_is_an_adapter_of_the_same_family():
    """SAM's image encoder (windowed blocks, relative positions, a convolutional neck) through SamViT: the unmodified
    walk and the neck are the module's forward, the global block taken apart (its own attention with the relative
    positions) is the block, and a windowed block refuses a method's attention in one line."""
    from conftest import make_tiny_sam
    from gclip.backbones.sam_vit import SamViT

    torch.manual_seed(0)
    encoder = make_tiny_sam()
    with torch.no_grad():
        for name, p in encoder.named_parameters():  # the relative-position tables start at zero: give them values
            if "rel_pos" in name:
                p.normal_()
        vit = SamViT(encoder)
        assert isinstance(vit, Backbone) and (vit.prefix_tokens, vit.has_cls) == (0, False)
        images = torch.randn(2, 3, 64, 64)
        x, grid = vit.embed(images)
        assert grid == (8, 8) and x.shape == (2, 64, 32)
        for i in range(vit.depth):
            x = vit.block(i, x)
        out = vit.project(x).transpose(1, 2).reshape(2, -1, *grid)
        assert torch.equal(out, encoder(images))
        tokens, _ = vit.embed(images)
        tokens = vit.block(0, tokens)
        last = vit.depth - 1
        same = vit.block(last, tokens)
        apart = vit.block(last, tokens, overrides={"ffn_out_weight": vit.ffn_out_weight(last)})  # the path taken apart
        torch.testing.assert_close(apart, same, rtol=0, atol=1e-5)
        q, k, _ = vit.qkv(last, tokens)
        plain = vit.block(last, tokens, attention=lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
        assert not torch.allclose(plain, same, atol=1e-3)  # the relative positions are in the block's own attention
        with pytest.raises(ConfigError, match="attends within 4x4 windows"):
            vit.block(0, vit.embed(images)[0], residual=False)
    with pytest.raises(ConfigError, match="square inputs"):
        vit.embed(torch.randn(1, 3, 48, 64))
    from gclip.backbones.second_models import SecondModel, SecondModelSpec

    second = SecondModel("tiny_sam", SecondModelSpec("vit_b", None, input_size=64, family="sam"), encoder)
    assert isinstance(second.vit, SamViT)
    crops = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        resized = F.interpolate(crops, size=(64, 64), mode="bilinear", align_corners=False)
        assert torch.equal(second.features(crops), encoder(resized))

"""The backbone adapter: open_clip's ViT through the interface, the one fingerprint, and a second adapter (a timm
ViT without a CLS token and with register tokens, written here) that the methods run on without any change."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gclip.backbones import Backbone, DenseViT, backbone_for, fingerprint
from gclip.errors import ConfigError, WeightsError
from gclip.inference.forward import dense_features
from gclip.methods import get_method

torch.set_grad_enabled(False)


class TimmViT(Backbone):
    """A test adapter for timm's ``VisionTransformer`` (fused q/k/v, optional CLS, register tokens, no projection)."""

    def __init__(self, model: nn.Module) -> None:
        self.module = model
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.width, self.depth = int(model.embed_dim), len(model.blocks)
        self.heads = int(model.blocks[0].attn.num_heads)
        self.prefix_tokens, self.has_cls = int(model.num_prefix_tokens), bool(model.has_class_token)
        self.mean = self.std = (0.5, 0.5, 0.5)

    def embed(self, images, pos_rule="sclip"):
        x = self.module.patch_embed(images)
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        return self.module.norm_pre(self.module._pos_embed(x)), grid

    def qkv(self, index, x):
        attn = self.module.blocks[index].attn
        b, n, _ = x.shape
        qkv = attn.qkv(self.pre_norm(index, x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def out_proj(self, index, heads_out):
        attn = self.module.blocks[index].attn
        if heads_out.dim() == 4:
            b, h, n, d = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(b, n, h * d)
        return attn.proj(attn.norm(heads_out))

    def attn_residual(self, index, attn_out):
        return self.module.blocks[index].ls1(attn_out)

    def ffn(self, index, x, out_weight=None):
        blk = self.module.blocks[index]
        y = blk.mlp.norm(blk.mlp.act(blk.mlp.fc1(blk.norm2(x))))
        y = F.linear(y, blk.mlp.fc2.weight if out_weight is None else out_weight, blk.mlp.fc2.bias)
        return blk.ls2(y)

    def ffn_out_weight(self, index):
        return self.module.blocks[index].mlp.fc2.weight

    def ffn_module(self, index):
        return self.module.blocks[index].mlp

    def pre_norm(self, index, x):
        return self.module.blocks[index].norm1(x)

    def final_norm(self, tokens):
        return self.module.norm(tokens)

    def projection(self, tokens):
        return tokens


def timm_vit(**kwargs) -> nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=3, num_heads=2, num_classes=0, **kwargs
    ).eval()


@pytest.mark.parametrize("tokens", [dict(class_token=False, reg_tokens=2, global_pool="avg"), dict(reg_tokens=4)])
def test_a_second_adapter_walks_as_its_tower_does(tokens):
    model = timm_vit(**tokens)
    vit = TimmViT(model)
    images = torch.randn(2, 3, 32, 32)
    x, grid = vit.embed(images)
    for i in range(vit.depth):
        x = vit.block(i, x)
    torch.testing.assert_close(vit.final_norm(x), model.forward_features(images), rtol=0, atol=1e-5)
    assert grid == (4, 4) and vit.patches(x).shape == (2, 16, 32)


@pytest.mark.parametrize("method", ["clip", "maskclip", "sclip", "clearclip", "naclip", "gclip", "resclip"])
def test_methods_run_unchanged_on_a_tower_without_cls_and_with_registers(method):
    """No CLS token, two register tokens: the patch grid comes out right; the unmodified walk is the tower's."""
    model = timm_vit(class_token=False, reg_tokens=2, global_pool="avg")
    vit = TimmViT(model)
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
        WeightsError, match=r"^Linear: no dense-walk adapter for this image tower \(open_clip ViTs only\)$"
    ):
        backbone_for(nn.Linear(2, 2))


def test_one_fingerprint_follows_the_weights():
    a, b = nn.Linear(256, 64), nn.Linear(256, 64)  # 16,384 weights: every 4th one is sampled
    b.load_state_dict(a.state_dict())
    assert fingerprint(a) == fingerprint(b)
    with torch.no_grad():
        b.weight[17, 3] += 1e-3  # one value, off the sampled stride (index 4355): the sum still moves
    assert fingerprint(a) != fingerprint(b)
    assert fingerprint(nn.Linear(256, 64)) != fingerprint(a)

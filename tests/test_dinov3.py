"""DINOv3 (timm ``Eva`` with DINOv3's rotary embedding, a CLS and 4 register tokens) and DINOv2 with registers as
second models (issue 20, item 6): checkpoints in the authors' layouts and in timm's, the walk against timm's own
forward block by block at the native and at another grid, the four methods with a second model on a tiny DINOv3, and
the gated weights' one-line error.

The authors' layouts are made here from timm's state dicts by the inverse of timm's converters (written in the tests
only): DINOv3's (``timm.models.eva.checkpoint_filter_fn``) and DINOv2's (``timm.models.vision_transformer``'s
``_convert_dinov2``)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import TINY_DINOV3, make_tiny_dinov3, tiny_second_models
from gclip import Segmenter
from gclip.backbones import second_models as proxy
from gclip.backbones.timm_eva import TimmEva
from gclip.errors import ConfigError, WeightsError
from gclip.testing import random_state_dict

torch.set_grad_enabled(False)


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def to_dinov3_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """timm's Eva names -> facebookresearch/dinov3's (the inverse of timm's converter): ``reg_token`` is
    ``storage_tokens``, ``gamma_1``/``gamma_2`` are ``ls1.gamma``/``ls2.gamma``; a fused ``qkv.bias`` (zero here: the
    released ViT-S/B/L hold zero ones) with its ``bias_mask`` (k masked); the rope's ``periods`` (bf16, as the released
    files hold them) and the pre-training ``mask_token``, which the converter drops."""
    out: dict[str, torch.Tensor] = {}
    width = state["cls_token"].shape[-1]
    for key, value in state.items():
        key = key.replace("reg_token", "storage_tokens").replace("gamma_1", "ls1.gamma").replace("gamma_2", "ls2.gamma")
        out[key] = value
        if key.endswith("attn.qkv.weight"):
            out[key.replace("weight", "bias")] = torch.zeros(3 * width)
            out[key.replace("weight", "bias_mask")] = torch.cat(
                [torch.ones(width), torch.zeros(width), torch.ones(width)]
            )
    out["mask_token"] = torch.zeros(1, width)
    out["rope_embed.periods"] = torch.arange(1, width // 16 + 1, dtype=torch.bfloat16)
    return out


def _register(name: str, path, build=make_tiny_dinov3) -> str:
    proxy.register_second_model(name, proxy.SecondModelSpec(name, build=build, checkpoint=str(path)))
    return name


def test_dinov3_entries_are_timms_dinov3_evas_and_gated():
    import timm

    for name, arch in [("dinov3_vits16", "small"), ("dinov3_vitb16", "base"), ("dinov3_vitl16", "large")]:
        spec = proxy.SECOND_MODELS[name]
        assert spec.arch == f"vit_{arch}_patch16_dinov3" and spec.tag is None and spec.gated == proxy.DINOV3_WEIGHTS
        model = timm.create_model(spec.arch, num_classes=0, depth=1)  # the same code at any depth
        assert type(model.rope).__name__ == "RotaryEmbeddingDinoV3" and model.num_prefix_tokens == 5
        assert isinstance(TimmEva(model), TimmEva)


def test_dinov3_without_a_file_is_one_line_naming_the_flag(monkeypatch, tiny_model):
    """No weights folder, cache or download is tried (each would fail the test); the error says where to get them."""

    def no(*a, **k):
        raise AssertionError("no download or lookup for gated weights")

    monkeypatch.setattr(proxy, "find_weights", no)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", no)
    with pytest.raises(WeightsError) as e:
        proxy.load_second_model("dinov3_vitb16")
    message = str(e.value)
    assert "\n" not in message and "--proxy-checkpoint PATH" in message and "proxy_checkpoint=PATH" in message
    assert "gated" in message and "dinov3-downloads" in message and "dinov3_vitb16_pretrain_lvd1689m" in message
    seg = Segmenter(
        tiny_model, method="proxyclip", method_options={"proxy": "dinov3_vitb16"}, short_side=32, crop=32, stride=16
    )
    seg.set_classes(["a", "b"])
    with pytest.raises(WeightsError, match="--proxy-checkpoint PATH") as e:
        seg.predict(np.zeros((32, 32, 3), np.uint8))
    assert "\n" not in str(e.value)


def test_dinov3_is_listed_as_gated_and_not_downloaded(capsys):
    from gclip.backbones.download import download
    from gclip.cli import main

    with pytest.raises(ConfigError, match="dinov3_vitb16's weights are gated: request them at https://ai.meta"):
        download("dinov3_vitb16", to="/nonexistent")
    assert main(["models"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "dinov3_vitb16" in x)
    assert "vit_base_patch16_dinov3 (gated weights: a local file, authors' or timm's layout)" in line


def test_dinov3_authors_layout_and_timms_load_the_same_tensors(tmp_path):
    reference = random_state_dict(make_tiny_dinov3(), seed=21)
    torch.save({"model": to_dinov3_layout(reference)}, tmp_path / "authors.pth")
    torch.save(reference, tmp_path / "timm.pth")
    for layout in ("authors", "timm"):
        loaded = proxy.load_second_model(_register(f"dinov3-{layout}", tmp_path / f"{layout}.pth"))
        state = loaded.model.state_dict()
        assert state.keys() == reference.keys(), layout
        assert all(torch.equal(state[k], reference[k]) for k in reference), layout
    bias = to_dinov3_layout(reference)
    bias["blocks.1.attn.qkv.bias"][:3] = 0.5  # a q bias the model has no place for: refused, not dropped
    torch.save(bias, tmp_path / "bias.pth")
    with pytest.raises(WeightsError, match=r"non-zero q/v biases \(blocks.1.attn.qkv.bias\)") as e:
        proxy.load_second_model(_register("dinov3-bias", tmp_path / "bias.pth"))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("size", [(224, 224), (96, 160)], ids=["native", "other-grid"])
def test_dinov3_walk_is_timms_forward_block_by_block(tmp_path, size):
    """``vit_base_patch16_dinov3``'s width, heads and rope (two of its blocks): each block taken apart (q/k/v with
    DINOv3's rope, the attention, out_proj, layer scale, FFN) is timm's block in timm's own forward, and the features
    are timm's ``forward_features``, at the native 14x14 grid and at 6x10 (fp32, 1e-5)."""
    import timm

    def build():
        return timm.create_model("vit_base_patch16_dinov3", num_classes=0, depth=2).eval()

    torch.save(to_dinov3_layout(random_state_dict(build(), seed=22)), tmp_path / "b16.pth")
    loaded = proxy.load_second_model(_register("dinov3-b16-2", tmp_path / "b16.pth", build))
    vit, model = loaded.vit, loaded.model
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, *size))).float()
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in model.blocks]
    try:
        features = model.forward_features(images)
    finally:
        for h in hooks:
            h.remove()
    x, grid = vit.embed(images)
    assert grid == (size[0] // 16, size[1] // 16) and x.shape[1] == 5 + grid[0] * grid[1]
    for i in range(vit.depth):
        x = vit.block(i, x, attention=sdpa)
        torch.testing.assert_close(x, outputs[i], rtol=0, atol=1e-5, msg=f"block {i}")
    ours = loaded.features(images)
    torch.testing.assert_close(ours.flatten(2).transpose(1, 2), features[:, 5:], rtol=0, atol=1e-5)


def test_last_qkv_are_the_rotated_q_k_and_v_of_timms_last_block(monkeypatch):
    """What CASS (keys) and CorrCLIP (q, k) read: the patch tokens' q, k (DINOv3's rope of the grid) and v that
    timm's last block attends with, at a grid other than the tiny model's native one."""
    loaded = proxy.load_second_model(TINY_DINOV3)
    seen = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(
        F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append((q, k, v)) or real(q, k, v, **kw)
    )
    images = torch.randn(2, 3, 48, 64)
    loaded.model.forward_features(images)
    monkeypatch.undo()
    assert len(seen) == loaded.vit.depth
    q, k, v, grid = loaded.last_qkv(images)
    assert grid == (12, 16) and q.shape == (2, 4, 192, 16)
    for ours, theirs in zip((q, k, v), seen[-1]):
        torch.testing.assert_close(ours, theirs[:, :, 5:], rtol=0, atol=1e-5)
    unrotated = loaded.model.blocks[-1].attn.qkv(loaded.model.blocks[-1].norm1(loaded.vit.embed(images)[0]))
    assert not torch.allclose(k, unrotated.reshape(2, -1, 3, 4, 16)[:, 5:, 1].transpose(1, 2), atol=1e-3)


@pytest.mark.parametrize("method", ["proxyclip", "cass", "trident", "corrclip", "lposs"])
def test_methods_run_with_a_dinov3_proxy(tiny_model, rgb_image, method):
    options = {**tiny_second_models(method), "proxy": TINY_DINOV3}
    seg = Segmenter(tiny_model, method=method, method_options=options, short_side=32, crop=32, stride=16)
    seg.set_classes(["a", "b", "c"])
    result = seg.predict(rgb_image)
    assert result.labels.shape == rgb_image.shape[:2]
    used = [m for (name, *_), m in proxy._FOR_VIT.items() if name == TINY_DINOV3]
    assert used and all(isinstance(m.vit, TimmEva) for m in used)


# --- DINOv2 with registers ---------------------------------------------------------------------------------------


def make_tiny_dinov2():
    """A tiny DINOv2 with registers (timm ``vit_small_patch14_reg4_dinov2``'s code): patch 14, 2 blocks, width 64."""
    import timm

    return timm.create_model(
        "vit_small_patch14_reg4_dinov2", num_classes=0, img_size=56, embed_dim=64, depth=2, num_heads=4
    ).eval()


def to_dinov2_layout(state: dict[str, torch.Tensor], cls_pos: torch.Tensor) -> dict[str, torch.Tensor]:
    """timm's names -> facebookresearch/dinov2's hub checkpoint (the inverse of timm's ``_convert_dinov2``): the CLS
    position is a row of ``pos_embed`` (taken off the CLS token), the registers are ``register_tokens``, and the
    pre-training ``mask_token`` is kept."""
    out = {k: v for k, v in state.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    out["cls_token"] = state["cls_token"] - cls_pos
    out["pos_embed"] = torch.cat([cls_pos, state["pos_embed"]], dim=1)
    out["register_tokens"] = state["reg_token"]
    out["mask_token"] = torch.zeros(1, state["cls_token"].shape[-1])
    return out


def test_dinov2_authors_layout_and_timms_load_the_same_tensors(tmp_path):
    reference = random_state_dict(make_tiny_dinov2(), seed=24)
    cls_pos = torch.linspace(-0.5, 0.5, 64).view(1, 1, 64)
    authors = to_dinov2_layout(reference, cls_pos)
    torch.save(authors, tmp_path / "authors.pth")
    reference["cls_token"] = authors["cls_token"] + cls_pos  # the CLS token DINOv2's model adds its position to
    torch.save(reference, tmp_path / "timm.pth")
    for layout in ("authors", "timm"):
        spec = proxy.SecondModelSpec(layout, build=make_tiny_dinov2, checkpoint=str(tmp_path / f"{layout}.pth"))
        proxy.register_second_model(f"dinov2-{layout}", dataclasses.replace(spec, pos_rule="antialias"))
        loaded = proxy.load_second_model(f"dinov2-{layout}")
        state = loaded.model.state_dict()
        assert state.keys() == reference.keys(), layout
        assert all(torch.equal(state[k], reference[k]) for k in reference), layout
        x = torch.randn(1, 3, 56, 56)
        torch.testing.assert_close(
            loaded.features(x).flatten(2).transpose(1, 2), loaded.model.forward_features(x)[:, 5:], rtol=0, atol=1e-5
        )

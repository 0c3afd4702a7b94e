"""Second backbones (gclip.backbones.second_models): names, weights, one-line errors, the per-process cache, the
forward walk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import TINY_DINO, make_tiny_dino
from gclip import Segmenter
from gclip.backbones import second_models as proxy
from gclip.errors import ConfigError, WeightsError
from gclip.testing import random_state_dict


def test_named_proxies_are_dino_vits():
    """The real entries, as the suite sees them: its tiny models are registered beside them, never over them."""
    assert proxy.SECOND_MODELS["dino_vitb8"] == proxy.SecondModelSpec("vit_base_patch8_224", "dino")
    assert proxy.SECOND_MODELS["dino_vitb16"] == proxy.SecondModelSpec("vit_base_patch16_224", "dino")
    assert {"dino_vitb8", "dino_vitb16", "dino_vits8", "dino_vits16"} <= set(proxy.SECOND_MODELS)
    dinov2 = proxy.SECOND_MODELS["dinov2_vitb14_reg"]
    assert (dinov2.arch, dinov2.tag, dinov2.pos_rule) == ("vit_base_patch14_reg4_dinov2", "lvd142m", "antialias")
    sam = proxy.SECOND_MODELS["sam_vitb"]
    assert (sam.family, sam.arch, sam.input_size) == ("sam", "vit_b", 1024)


def test_missing_weights_offline_give_one_line_error(monkeypatch):
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-cache")
    with pytest.raises(WeightsError) as e:
        proxy.load_second_model("dino_vits16")
    message = str(e.value)
    assert "\n" not in message and "proxy_checkpoint=" in message and "unreachable" in message


def test_unknown_proxy_and_mismatched_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="unknown proxy model 'nope'"):
        proxy.load_second_model("nope")
    wrong = tmp_path / "wrong.pth"
    tiny = make_tiny_dino()
    state = random_state_dict(tiny, seed=1)
    state["pos_embed"] = torch.zeros(1, 5, 32)  # another grid
    torch.save(state, wrong)
    proxy.register_second_model("wrong_tiny", proxy.SecondModelSpec("tiny", build=make_tiny_dino))
    with pytest.raises(WeightsError, match="does not fit proxy wrong_tiny"):
        proxy.load_second_model("wrong_tiny", str(wrong))
    with pytest.raises(WeightsError, match="does not exist"):
        proxy.load_second_model("wrong_tiny", str(tmp_path / "absent.pth"))


def test_features_are_the_last_blocks_normalised_tokens():
    loaded = proxy.load_second_model(TINY_DINO)  # the tiny DINO of the tests (conftest)
    assert loaded is proxy.load_second_model(TINY_DINO)  # one copy per process
    x = torch.randn(2, 3, 32, 32)
    feats = loaded.features(x)
    expected = loaded.model.forward_features(x)[:, 1:]  # timm's own forward at the native size
    assert feats.shape == (2, 64, 8, 8)
    assert torch.allclose(feats.flatten(2).transpose(1, 2), expected, atol=1e-5)
    assert loaded.features(torch.randn(1, 3, 48, 64)).shape == (1, 64, 12, 16)  # DINO's resampled positions


def test_last_keys_are_the_last_blocks_patch_keys():
    loaded = proxy.load_second_model(TINY_DINO)
    x = torch.randn(2, 3, 32, 32)
    seen = {}
    last = loaded.model.blocks[-1].attn
    handle = last.qkv.register_forward_hook(lambda mod, inp, out: seen.update(qkv=out))
    loaded.model.forward_features(x)  # timm's own forward
    handle.remove()
    b, n, _ = seen["qkv"].shape
    expected = seen["qkv"].reshape(b, n, 3, last.num_heads, -1).permute(2, 0, 3, 1, 4)[1][:, :, 1:]
    keys, grid = loaded.last_keys(x)
    assert grid == (8, 8) and keys.shape == (2, 4, 64, 16)
    assert torch.allclose(keys, expected, atol=1e-5)


def test_renormalise_maps_clip_inputs_to_imagenet_inputs():
    loaded = proxy.load_second_model(TINY_DINO)
    pixels = torch.rand(1, 3, 4, 4)
    clip_mean, clip_std = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
    clip_in = (pixels - torch.tensor(clip_mean).view(1, 3, 1, 1)) / torch.tensor(clip_std).view(1, 3, 1, 1)
    imagenet = (pixels - torch.tensor(proxy.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(proxy.IMAGENET_STD).view(
        1, 3, 1, 1
    )
    assert torch.allclose(loaded.renormalise(clip_in, clip_mean, clip_std), imagenet, atol=1e-5)


def test_proxyclip_logits_are_on_the_proxys_grid(tiny_model, rgb_image):
    seg = Segmenter(
        tiny_model, method="proxyclip", method_options={"proxy": TINY_DINO}, short_side=32, crop=32, stride=16
    )
    seg.set_classes(["a", "b", "c"])
    result = seg.predict(rgb_image)
    assert result.labels.shape == rgb_image.shape[:2]
    from gclip.inference.forward import dense_logits

    logits = dense_logits(seg.vit, seg.method, torch.randn(1, 3, 32, 48), seg.query_embeddings())
    assert logits.shape == (1, 3, 8, 12)  # proxy patch 4 (CLIP-tiny's is 8)


def test_proxy_flags_reach_only_the_methods_with_a_second_model():
    import argparse

    from gclip.cli.common import method_options_from

    args = argparse.Namespace(
        method="proxyclip", method_options='{"beta": 1.0}', proxy="dino_vits8", proxy_checkpoint="/x/dino.pth"
    )
    assert method_options_from(args) == {"beta": 1.0, "proxy": "dino_vits8", "proxy_checkpoint": "/x/dino.pth"}
    args.method, args.method_options = "all", None
    assert method_options_from(args, "clearclip") == {}  # --method all: the others never see --proxy
    assert method_options_from(args, "proxyclip")["proxy"] == "dino_vits8"
    args.method = "clearclip"
    with pytest.raises(ConfigError, match="no such second model"):
        method_options_from(args)
    args.method, args.proxy, args.proxy_checkpoint, args.sam_checkpoint = "all", None, None, "/x/sam.pth"
    assert method_options_from(args, "trident") == {"sam_checkpoint": "/x/sam.pth"}  # SAM's file: Trident's only
    assert method_options_from(args, "proxyclip") == {}
    args.method = "cass"
    with pytest.raises(ConfigError, match="--sam-checkpoint"):
        method_options_from(args)


def test_demo_passes_method_options_to_its_segmenters(tiny_model, tmp_path):
    from gclip.demo import DemoService

    service = DemoService(tiny_model, workdir=tmp_path, method_options={"proxyclip": {"beta": 1.0}})
    assert service._segmenter("proxyclip", ["a", "b"]).method.beta == 1.0
    assert service._segmenter("clip", ["a", "b"]).method.name == "clip"


@pytest.mark.heavy
def test_dinov2_checkpoint_in_its_own_layout_loads_into_timm(golden_dinov2):
    """DINOv2's checkpoint names (register_tokens, mask_token, CLS position in pos_embed) are converted to timm's;
    the walk equals timm's own forward at the native size, and refuses crops that are not patch multiples."""
    loaded = proxy.load_second_model(golden_dinov2)
    assert loaded.patch_size == 14 and loaded.model.num_prefix_tokens == 5
    x = torch.randn(1, 3, 518, 518)
    feats = loaded.features(x)
    expected = loaded.model.forward_features(x)[:, 5:]
    assert feats.shape == (1, 768, 37, 37)
    assert torch.allclose(feats.flatten(2).transpose(1, 2), expected, atol=1e-5)
    with pytest.raises(ConfigError, match="multiples of its patch 14"):
        loaded.features(torch.randn(1, 3, 320, 320))


@pytest.mark.parametrize("padding", ["symmetric", "none"])
def test_proxyclip_windows_fit_both_patches(tiny_model, padding):
    """Padded windows are padded to a multiple of both models' patches; unpadded ones lose their last partial
    proxy patch, as CLIP loses its own."""
    seg = Segmenter(
        tiny_model,
        method="proxyclip",
        method_options={"proxy": TINY_DINO},
        short_side=44,
        crop=36,
        stride=20,
        padding=padding,
    )
    assert seg.method.window_multiple(seg.vit) == 8  # lcm(CLIP-tiny 8, proxy 4)
    seg.set_classes(["a", "b"])
    image = np.random.default_rng(0).integers(0, 256, size=(44, 61, 3), dtype=np.uint8)
    assert seg.predict(image).labels.shape == (44, 61)


def test_sam_without_weights_names_the_file_to_pass():
    match = "sam_vit_b_01ec64.pth.*`gclip download sam_vitb --to DIR`.*proxy_checkpoint="
    with pytest.raises(WeightsError, match=match) as e:
        proxy.load_second_model("sam_vitb")
    assert "\n" not in str(e.value)


def test_trident_without_sam_weights_names_its_flag(tiny_model):
    from gclip.evaluation.run import runnable_methods

    options = {"trident": {"proxy": TINY_DINO}}  # its DINO loads; its SAM is the real sam_vitb, without weights
    with pytest.raises(WeightsError, match="trident: .*--sam-checkpoint PATH") as e:
        runnable_methods(["trident"], options, ["voc21"], tiny_model, False, print)
    assert "\n" not in str(e.value)
    notices = []
    say = lambda *a, **k: notices.append(a[0])  # noqa: E731
    assert runnable_methods(["trident"], options, ["voc21"], tiny_model, True, say) == []
    assert notices and notices[0].startswith("gclip: skipped trident:")

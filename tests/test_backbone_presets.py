"""Backbone presets: tags, settings, architectures, and one forward of every method per preset.

ViT-B/16 and ViT-B/32 run a real random-weight forward in the default suite. ViT-L/14, ViT-L/14-336 and
ViT-H/14 are checked on the meta device (the actual architecture, no memory), and their real forward runs
only with ``GCLIP_SLOW=1`` (marker ``slow``): building them and running six methods takes minutes on a
2-core machine.
"""

from __future__ import annotations

import os

import open_clip
import pytest
import torch
from open_clip.model import _build_vision_tower

from conftest import SECOND_MODELS_DIR, crop_methods, tiny_second_models
from gclip import Segmenter
from gclip.backbones import backbone_for
from gclip.backbones.openclip import DenseViT
from gclip.backbones.presets import get_preset, list_presets, tag_family
from gclip.cli import main
from gclip.errors import ConfigError
from gclip.inference.forward import dense_features
from gclip.inference.segmenter import PresetNotice
from gclip.methods import get_method, list_methods

PRESETS = {p.name: p for p in list_presets()}
FAST = {"ViT-B/16", "ViT-B/32"}
SLOW = pytest.mark.skipif(not os.environ.get("GCLIP_SLOW"), reason="set GCLIP_SLOW=1 to run the large backbones")


def test_preset_list_covers_the_issues():
    assert list(PRESETS) == [
        *("ViT-B/16", "ViT-B/32", "ViT-L/14", "ViT-L/14-336", "ViT-H/14"),
        *("SigLIP2-B/16", "PE-Core-B/16", "PE-Core-L/14-336", "EVA02-B/16"),  # open_clip's timm towers (issue 20)
    ]
    families = {t.family for p in PRESETS.values() for t in p.tags}
    assert families == {"OpenAI", "LAION", "DataComp", "MetaCLIP", "DFN", "WebLI", "Meta PE", "Merged-2B"}
    towers = {p.name: p.tower for p in PRESETS.values() if p.tower != "open_clip"}
    assert towers == {
        "SigLIP2-B/16": "VisionTransformer",
        "PE-Core-B/16": "Eva",
        "PE-Core-L/14-336": "Eva",
        "EVA02-B/16": "Eva",
    }
    tokenizers = {p.name: p.tokenizer for p in PRESETS.values() if p.tokenizer}
    assert tokenizers == {"SigLIP2-B/16": "timm/ViT-B-16-SigLIP2"}  # the others use open_clip's BPE tokenizer


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_tags_and_settings(name):
    preset = PRESETS[name]
    listed = open_clip.list_pretrained_tags_by_model(preset.model)
    for tag in preset.tags:
        assert tag.tag in listed
        cfg = open_clip.get_pretrained_cfg(preset.model, tag.tag)
        assert tag.quick_gelu == bool(cfg.get("quick_gelu", False))
        assert tag.family == tag_family(tag.tag) != "other"
    for key in ("crop", "stride"):
        assert preset.settings[key] % preset.patch_size == 0
    assert get_preset(preset.model) is preset and get_preset(preset.quickgelu_model) is preset


def test_timm_tower_normalisation_and_settings_come_from_their_configs():
    assert PRESETS["SigLIP2-B/16"].tags[0].mean == PRESETS["PE-Core-B/16"].tags[0].std == (0.5, 0.5, 0.5)
    assert PRESETS["EVA02-B/16"].tags[0].mean[0] == pytest.approx(0.48145466)
    assert PRESETS["PE-Core-L/14-336"].settings == {"short_side": 336, "crop": 336, "stride": 168}


def test_laion_l14_normalisation_comes_from_its_config():
    tag = {t.tag: t for t in PRESETS["ViT-L/14"].tags}["laion2b_s32b_b82k"]
    assert tag.mean == tag.std == (0.5, 0.5, 0.5)
    assert {t.tag: t for t in PRESETS["ViT-L/14"].tags}["openai"].mean[0] == pytest.approx(0.48145466)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="no backbone preset"):
        get_preset("ViT-Q/7")


@pytest.mark.parametrize("name", list(PRESETS))
def test_preset_architecture_on_meta(name):
    preset = PRESETS[name]
    with torch.device("meta"):
        model = open_clip.create_model(preset.model, pretrained=None, device="meta")
    vit = backbone_for(model.visual)
    assert isinstance(vit, DenseViT) == (preset.tower == "open_clip")
    assert (vit.patch_size, vit.depth, vit.width) == (preset.patch_size, preset.depth, preset.width)
    assert vit.native_grid == (preset.image_size // preset.patch_size,) * 2


def dino_like(vit: DenseViT) -> str:
    """A one-block random DINO-layout ViT (patch 8) of ``vit``'s width and heads, as CASS pairs them, registered
    under its own name (``gclip-tiny-dino-<width>x<heads>``)."""
    from timm.models.vision_transformer import VisionTransformer

    from gclip.backbones import second_models
    from gclip.testing import random_state_dict

    name = f"gclip-tiny-dino-{vit.width}x{vit.heads}"
    if name not in second_models.SECOND_MODELS:

        def build():
            return VisionTransformer(
                img_size=32, patch_size=8, embed_dim=vit.width, depth=1, num_heads=vit.heads, num_classes=0
            ).eval()

        path = SECOND_MODELS_DIR / f"{name}.pth"
        torch.save(random_state_dict(build(), seed=7), path)
        second_models.register_second_model(
            name, second_models.SecondModelSpec(name, build=build, checkpoint=str(path))
        )
    return name


def _forward_all_methods(name):
    """Every method's features on the preset's architecture (random weights); the second models are tiny ones,
    CASS's a DINO of CLIP's width and heads (:func:`dino_like`)."""
    preset = PRESETS[name]
    cfg = open_clip.get_model_config(preset.model)
    torch.manual_seed(0)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], quick_gelu=preset.tags[0].quick_gelu).eval()
    vit = DenseViT(visual)
    side = 4 * preset.patch_size  # a small crop: 4x4 patches, position embeddings resampled as for any crop
    crops = torch.randn(1, 3, side, side)
    for method in crop_methods():  # Trident runs whole images (its own tests)
        options = tiny_second_models(method)
        if method == "cass":
            options["proxy"] = dino_like(vit)
        m = get_method(method, **options)
        feats = dense_features(vit, m, crops)
        grid = m.output_grid(vit, (side, side))  # 4 x 4, or a second model's own grid
        assert feats.shape == (1, *grid, cfg["embed_dim"]) and torch.isfinite(feats).all(), method


@pytest.mark.heavy
@pytest.mark.parametrize("name", sorted(FAST))
def test_fast_preset_forward_every_method(name):
    _forward_all_methods(name)


@pytest.mark.slow
@SLOW
@pytest.mark.parametrize("name", [n for n in PRESETS if n not in FAST and PRESETS[n].tower == "open_clip"])
def test_large_preset_forward_every_method(name):  # the timm towers: tests/test_timm_towers.py
    _forward_all_methods(name)


def test_cli_models_lists_presets(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for preset in PRESETS.values():
        assert f"{preset.name}  --model {preset.model}" in out
    assert "laion2b_s32b_b82k" in out and "mean (0.5, 0.5, 0.5)" in out
    assert "crop=336, stride=168" in out

    assert len(list_methods()) >= 12 and all(f"  {m} " in out for m in list_methods())
    assert "second models" in out and "dino_vits8" in out


def test_backbone_preset_is_applied_when_no_geometry_is_given(tiny_model, monkeypatch):
    import gclip.inference.segmenter as segmenter

    monkeypatch.setattr(segmenter, "preset_settings", lambda name: {"short_side": 336, "crop": 336, "stride": 168})
    with pytest.warns(PresetNotice, match="short_side=336, crop=336, stride=168"):
        seg = Segmenter(tiny_model, method="clip")
    assert (seg.settings.short_side, seg.settings.crop, seg.settings.stride) == (336, 336, 168)
    chosen = Segmenter(tiny_model, method="clip", crop=224)  # any geometry given: the preset stays out
    assert (chosen.settings.short_side, chosen.settings.crop) == (448, 224)

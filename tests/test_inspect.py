"""inspect_backbone and GCLIP's auto mode on random-weight models with planted structure (tests/_planted.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from PIL import Image

from _planted import PLANT_MODEL, planted_model
from gclip.backbones import auto as autoconfig
from gclip.backbones.models import load_model
from gclip.backbones.openclip import DenseViT
from gclip.cli import main
from gclip.diagnostics.inspect import inspect_backbone
from gclip.methods import get_method
from gclip.methods.gclip import CS_WEIGHT

PLANTS = [
    # block, token positions, channel, other blocks with the channel scaled up, expected auto choice
    pytest.param(dict(block=2, positions=[9, 27, 45], channel=5, channel_blocks=[0, 3, 4]), [2, 3], [3, 4], id="b2"),
    pytest.param(dict(block=1, positions=[0, 63], channel=17, channel_blocks=[4]), [1, 2], [4], id="b1"),
]


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path / "cache"))
    autoconfig.clear_auto_cache()


def _load(clip, tmp_path, name="planted.pt"):
    path = tmp_path / name
    torch.save(clip.state_dict(), path)
    return load_model(PLANT_MODEL, str(path), device="cpu")


@pytest.mark.parametrize("plant,emerging,cs", PLANTS)
def test_inspect_finds_planted_structure(plant, emerging, cs, tmp_path):
    model = _load(planted_model(seed=1, **plant), tmp_path)
    report = inspect_backbone(model)
    assert report.first_emerging == plant["block"]
    assert [b.index for b in report.blocks if b.images_with_high_norm] == list(range(plant["block"], 5))
    grid = 8
    planted = sorted((p // grid, p % grid) for p in plant["positions"])
    assert all(sorted(found) == planted for found in report.high_norm_positions)
    assert len(report.high_norm_positions) == report.n_images == 4
    abnormal = sorted(b.index for b in report.blocks if b.channel_abnormal)
    assert abnormal == sorted({plant["block"], *plant["channel_blocks"]})
    assert all(report.blocks[i].channel == plant["channel"] for i in abnormal)
    assert report.emerging_blocks == emerging and report.cs_blocks == cs
    assert report.channels == {i: plant["channel"] for i in cs}
    json.dumps(report.to_dict())  # plain data

    gclip = get_method("gclip", emerging_blocks="auto")
    vit = DenseViT(model.visual)
    assert gclip.blocks_for(vit) == emerging
    assert gclip.suppressed_blocks(vit) == cs
    for i, override in gclip.suppressed_weights(vit).items():
        before = vit.ffn_out_weight(i).norm(dim=1)
        after = override[CS_WEIGHT].norm(dim=1)
        assert int(before.argmax()) == plant["channel"]
        assert after[plant["channel"]] < 1.5 * after.mean()


def test_no_structure_falls_back_to_defaults(tmp_path):
    import open_clip

    from gclip.testing import random_state_dict

    clip = open_clip.create_model(PLANT_MODEL)
    clip.load_state_dict(random_state_dict(clip, 3))
    model = _load(clip, tmp_path)
    report = inspect_backbone(model)
    assert report.first_emerging is None and report.high_norm_positions == []
    assert all(b.high_norm_tokens == 0 and not b.channel_abnormal for b in report.blocks)
    assert report.emerging_blocks == [3, 4] and report.cs_blocks == []
    with pytest.warns(UserWarning, match="no high-norm tokens"):
        assert get_method("gclip", emerging_blocks="auto").blocks_for(DenseViT(model.visual)) == [3, 4]


def test_auto_choice_is_cached_on_disk(tmp_path, monkeypatch):
    plant = dict(block=2, positions=[10, 20], channel=7, channel_blocks=[3])
    first = DenseViT(planted_model(seed=2, **plant).visual)
    settings = autoconfig.auto_settings(first)
    files = list(autoconfig.cache_dir().glob("*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["emerging_blocks"] == [2, 3]
    assert autoconfig.cache_dir().parent == tmp_path / "cache"

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(autoconfig, "measure", no_measuring)
    autoconfig.clear_auto_cache()
    again = autoconfig.auto_settings(DenseViT(planted_model(seed=2, **plant).visual))  # a new object, same weights
    assert again == settings
    other = planted_model(seed=2, block=1, positions=[10, 20], channel=7, channel_blocks=[3])
    with pytest.raises(AssertionError, match="measured again"):  # different weights: a different key
        autoconfig.auto_settings(DenseViT(other.visual))


def test_given_images_are_the_calibration_inputs(tmp_path, rgb_image):
    model = _load(planted_model(seed=1, block=2, positions=[9], channel=5), tmp_path)
    report = inspect_backbone(model, images=[rgb_image, rgb_image[::-1].copy()])
    assert report.n_images == 2 and report.calibration == "given" and report.first_emerging == 2


def _valid_png(path):
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 100 and img.size[1] > 100
        img.verify()


def test_cli_inspect_json_and_plots(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    model = planted_model(seed=1, block=2, positions=[9, 27], channel=5, channel_blocks=[4])
    ckpt = tmp_path / "planted.pt"
    torch.save(model.state_dict(), ckpt)
    out, plots = tmp_path / "report.json", tmp_path / "plots"
    args = ["inspect", "--model", PLANT_MODEL, "--pretrained", str(ckpt), "--device", "cpu"]
    rc = main([*args, "--json", str(out), "--plot", str(plots), "--patch", "1,1", "--classes", "cat,sky"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "gclip auto: emerging_blocks=[2, 3], cs_blocks=[4]" in printed  # block 2's channel: before max(E)
    data = json.loads(out.read_text())
    assert data["first_emerging"] == 2 and data["channels"] == {"4": 5}
    assert len(data["blocks"]) == 5
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["attention.png", "high_norm_tokens.png", "similarity.png", "token_norms.png"]
    for name in names:
        _valid_png(plots / name)
    assert main([*args, "--patch", "9,9", "--plot", str(plots)]) == 2
    assert "outside the 8x8 patch grid" in capsys.readouterr().err
    assert main([*args, "--patch", "x"]) == 2


def test_summary_figure(tmp_path):
    pytest.importorskip("matplotlib")
    from gclip.diagnostics.plots import summary_figure

    model = _load(planted_model(seed=1, block=2, positions=[9], channel=5), tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = summary_figure(model, inspect_backbone(model), tmp_path / "summary.png")
    _valid_png(path)


@pytest.mark.heavy
def test_vit_b16_with_the_structure_reproduces_the_default():
    """Registers from block 6 and an abnormal channel after it: auto == the method.md default ({6, 7}, CS 7..10)."""
    import open_clip

    from _planted import plant
    from gclip.testing import random_state_dict

    clip = open_clip.create_model("ViT-B-16", pretrained=None, force_quick_gelu=True)
    clip.load_state_dict(random_state_dict(clip, 0))
    plant(clip.eval(), block=6, positions=[17, 40, 150], channel=100, channel_blocks=[7, 8, 9, 10])
    vit = DenseViT(clip.visual)
    auto, default = get_method("gclip", emerging_blocks="auto"), get_method("gclip")
    assert auto.blocks_for(vit) == default.blocks_for(vit) == [6, 7]
    assert auto.suppressed_blocks(vit) == default.suppressed_blocks(vit) == [7, 8, 9, 10]

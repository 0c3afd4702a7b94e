"""CLIPer: its class maps against the authors' (linsun449/cliper.code @ c05fa41, tests/data/fidelity/README.md), its
text rows, its label rule and its one-line errors; its Stable Diffusion refinement against theirs on a tiny random
Stable Diffusion (gclip.testing.save_random_stable_diffusion)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gclip.errors import ConfigError, WeightsError
from gclip.methods import get_method
from gclip.methods.cliper import fused_attention, refine_with_attention, sinkhorn_step

GOLDEN = Path(__file__).parent / "data" / "fidelity"

# golden file -> (options, sliding-window crop); the authors' CLIPer.forward on the shared 448 x 448 input, text row 0
# as their background text, rows 1..9 as the classes
CASES = {
    "cliper": ({}, 0),
    "cliper_slide224": ({}, 224),
    "cliper_voc20": ({"attention_thr": 0.1}, 336),
    "cliper_s50_nofuse": ({"softmax_scale": 50.0, "fuse_feature": False}, 0),
}


@pytest.fixture(scope="module")
def vitb16(vitb16_checkpoint):
    from gclip.backbones.models import load_model
    from gclip.backbones.openclip import DenseViT

    return DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)


SLOW = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("GCLIP_SLOW"), reason="GCLIP_SLOW=1 runs it")]


@pytest.mark.golden
@pytest.mark.parametrize("golden", [pytest.param(n, marks=SLOW) if n == "cliper_voc20" else n for n in sorted(CASES)])
def test_class_maps_match_the_authors(vitb16, golden):
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))
    options, crop = CASES[golden]
    with torch.no_grad():
        got = get_method("cliper", **options).class_maps(vitb16, image, text[1:], text[:1], crop, 112).numpy()
    expected = np.load(GOLDEN / f"{golden}.npy")
    assert got.shape == expected.shape == (9, 28, 28)
    assert np.abs(got - expected).max() <= 1e-4


def test_goldens_differ():
    arrays = {name: np.load(GOLDEN / f"{name}.npy") for name in CASES}
    names = sorted(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(arrays[a] - arrays[b]).max() > 5e-3, (a, b)


def test_sinkhorn_and_fused_attention():
    s = torch.rand(2, 5, 5) + 0.1
    once = sinkhorn_step(s)
    assert torch.allclose(once.sum(-1), torch.ones(2, 5))
    a = fused_attention(once)
    assert torch.allclose(a.sum(-1), torch.ones(2, 5))
    assert bool((a >= 0).all())
    assert not torch.allclose(fused_attention(sinkhorn_step(once)), a)  # each step changes it: one per layer


def test_label_rule_is_the_authors_cam_to_label():
    method = get_method("cliper", score_threshold=0.3, bkg_thre=0.3)
    maps = torch.tensor([[[0.9, 0.1], [0.2, 0.05]], [[0.1, 0.5], [0.05, 0.1]], [[0.2, 0.25], [0.1, 0.1]]])
    cam, back = method.labels_scores(maps, (2, 2))
    assert cam[2].abs().sum() == 0  # score 0.25 <= 0.3: dropped
    assert torch.allclose(cam[0], torch.tensor([[0.9, 0.0], [0.0, 0.0]]), atol=1e-4)  # 0.1, 0.2 < 0.3 zeroed
    labels = torch.cat([back[None], cam]).argmax(0)
    assert labels.tolist() == [[1, 2], [0, 0]]  # background where no class is left
    cam, back = get_method("cliper", score_threshold=0.0, bkg_thre=0.0).labels_scores(maps, (2, 2))
    assert torch.allclose(back, (1 - cam.amax(0)) ** 2)


def test_text_rows_and_background_words(tmp_path):
    class Encoder:
        def embed(self, names):
            return torch.eye(8)[[hash(n) % 8 for n in names]]

    from gclip.text import parse_classes

    method = get_method("cliper", background_words="sky, wall")
    assert method.background_texts() == ["sky", "wall"]
    rows = method.text_side(Encoder(), parse_classes(["cat", "dog"]))
    assert rows.shape[0] == 4 and method._text_rows == (0, 2)
    method.text_side(Encoder(), parse_classes(["background", "cat", "dog"]))
    assert method._text_rows == (1, 0)
    path = tmp_path / "cls.txt"
    path.write_text("ground, land grass\naeroplane\n")
    assert get_method("cliper", background_words=str(path)).background_texts() == ["ground", "land", "grass"]
    with pytest.raises(ConfigError, match="background_words"):
        get_method("cliper", background_words=str(tmp_path / "missing.txt")).background_texts()
    with pytest.raises(ConfigError, match="softmax_scale"):
        get_method("cliper", softmax_scale=0.0)


def test_segmenter_runs_and_leaves_uncovered_pixels_unlabeled(tiny_model, rgb_image):
    import dataclasses

    from gclip import Segmenter

    seg = Segmenter(tiny_model, method="cliper", short_side=64, crop=32, stride=16, logit_scale=1.0,
                    method_options={"bkg_thre": 1e-6, "score_threshold": 0.0})  # fmt: skip
    seg.set_classes(["cat", "dog", "tree"])
    labels = seg.predict(rgb_image).labels
    assert labels.shape == rgb_image.shape[:2]
    assert (labels >= 0).all()  # every pixel reaches a class
    seg.method = dataclasses.replace(seg.method, bkg_thre=0.999)
    assert (seg.predict(rgb_image).labels == -1).all()  # none does: unlabeled (no background class)
    seg.method = dataclasses.replace(seg.method, _text_rows=None)
    with pytest.raises(ConfigError, match="set_classes"):
        seg.predict(rgb_image)
    odd = Segmenter(tiny_model, method="cliper", short_side=64, crop=36, stride=16)  # 36: not whole patches
    odd.set_classes(["cat", "dog"])
    with pytest.raises(ConfigError, match=r"^cliper: its sliding windows need crop and stride multiples") as error:
        odd.predict(rgb_image)
    assert "\n" not in str(error.value) and "--crop 32 --stride 16" in str(error.value)


# golden file -> options of the refinement; the authors' Pipeline.forward (refinement on) with the first VOC photo as
# their ori_img and the shared 448 input as the CLIP input, the tiny SD's noise from torch.manual_seed(0)
SD_CASES = {
    "cliper_sfsa": {},
    "cliper_sfsa_mean": {"refinement": "mean", "attention_thr": 0.1, "time_step": 30,
                         "attention_layers_to_use": [-2, -4, -6]},
    "cliper_sfsa_selection": {"refinement": "selection", "attention_idx": 1, "attention_layers_to_use": [-2]},
}  # fmt: skip
PHOTOS = ["2007_001288", "2007_001321", "2007_001458"]


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from gclip.testing import save_random_stable_diffusion

    return str(save_random_stable_diffusion(tmp_path_factory.mktemp("sd") / "tiny-sd", seed=0))


def _photo(sample_data, stem=PHOTOS[0]):
    from PIL import Image

    return np.asarray(Image.open(sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg").convert("RGB"))


@pytest.mark.golden
@pytest.mark.parametrize("golden", [n if n == "cliper_sfsa" else pytest.param(n, marks=SLOW) for n in sorted(SD_CASES)])
def test_refined_maps_match_the_authors(vitb16, tiny_sd, sample_data, golden):
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))
    method = get_method("cliper", **{"refinement": "sfsa", "sd_checkpoint": tiny_sd, **SD_CASES[golden]})
    # one thread, as the goldens were made: the product of the UNet's 4096 x 4096 attention maps and the thresholds on
    # them move the refined maps by ~1e-4 with another summation order (1.25e-4 measured with 2 threads)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            maps = method.class_maps(vitb16, image, text[1:], text[:1])
            refined, score = method.refined(vitb16, _photo(sample_data), maps)
    finally:
        torch.set_num_threads(threads)
    expected = np.load(GOLDEN / f"{golden}.npz")
    assert refined.shape == expected["maps"].shape == (9, 64, 64)
    assert np.abs(refined.numpy() - expected["maps"]).max() <= 1e-4
    assert np.abs(score.numpy() - expected["score"]).max() <= 1e-4
    unrefined = torch.nn.functional.interpolate(maps[None], size=(64, 64), mode="bilinear")[0]
    assert (refined - unrefined).abs().max() > 0.05  # the refinement changes the maps


@pytest.mark.pipeline
def test_sfsa_pipeline_matches_the_authors(vitb16_checkpoint, tiny_sd, sample_data):
    """main_ovs.py's loop with SFSA on the VOC photos (ovs_context59's thresholds, whole image): labels and values."""
    import dataclasses

    from gclip import Segmenter
    from gclip.backbones.models import load_model
    from gclip.text import parse_classes

    model = load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True)
    options = {"refinement": "sfsa", "sd_checkpoint": tiny_sd, "score_threshold": 0.3, "bkg_thre": 0.3}
    seg = Segmenter(model, method="cliper", method_options=options, short_side=336, crop=0, logit_scale=1.0,
                    prob_thd=0.0)  # fmt: skip
    seg.classes = parse_classes(["background"] + [f"class {i}" for i in range(1, 10)])
    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    seg._queries = torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))
    seg.method = dataclasses.replace(seg.method, _text_rows=(1, 0))
    golden = np.load(GOLDEN / "pipeline" / "cliper_sfsa.npz")
    for stem in PHOTOS if os.environ.get("GCLIP_SLOW") else PHOTOS[:1]:
        result = seg.predict(_photo(sample_data, stem), True)
        assert (result.labels != golden[f"{stem}_labels"]).mean() <= 1e-4, stem
        probs = torch.softmax(torch.from_numpy(golden[f"{stem}_logits"].astype(np.float32)), dim=0)
        assert np.abs(result.probs[:, ::4, ::4] - probs.numpy()).max() <= 2e-3, stem  # fp16-stored values


@pytest.mark.heavy
def test_refinement_options_change_the_maps(tiny_sd, rgb_image):
    maps = torch.rand(3, 7, 9, generator=torch.Generator().manual_seed(0))
    vit = type("Vit", (), {"dtype": torch.float32})()
    base, score = get_method("cliper", refinement="sfsa", sd_checkpoint=tiny_sd).refined(vit, rgb_image, maps)
    assert base.shape == (3, 64, 64)
    assert torch.allclose(score, base.amax((-1, -2)) * 0.5 + maps.amax((-1, -2)) * 0.5)
    for options in ({"noise_seed": 1}, {"time_step": 10}, {"attention_layers_to_use": (-6,)}):
        other, _ = get_method("cliper", refinement="sfsa", sd_checkpoint=tiny_sd, **options).refined(
            vit, rgb_image, maps
        )
        assert (other - base).abs().max() > 1e-3, options
    same, same_score = get_method("cliper").refined(vit, rgb_image, maps)  # "none": the maps and their maxima
    assert same is maps and torch.equal(same_score, maps.amax((-1, -2)))
    for options, match in (
        ({"attention_layers_to_use": (-1,)}, "self-attention"),  # the last cross-attention
        ({"attention_layers_to_use": (40,)}, "attention layers"),
        ({"time_step": 60}, "time_step"),
    ):
        with pytest.raises(ConfigError, match=match):
            get_method("cliper", refinement="sfsa", sd_checkpoint=tiny_sd, **options).refined(vit, rgb_image, maps)


def test_refinement_arithmetic():
    a = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    maps = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(2))
    cross = maps.flatten(-2).T  # 4 x 4 maps resized to 4 x 4: unchanged
    norm = a / (a.amax(-2, keepdim=True) + 1e-5)
    norm = torch.where(norm < 0.5, torch.zeros_like(norm), norm)
    norm = norm / (norm.sum(-1, keepdim=True) + 1e-5)
    product = (norm[0] @ norm[1] @ norm[2] @ cross).T.reshape(2, 4, 4)
    assert torch.allclose(refine_with_attention(a, maps, "sfsa", 0.5), product, atol=1e-6)
    assert torch.allclose(refine_with_attention(a, maps, "mean", 0.5), (norm.mean(0) @ cross).T.reshape(2, 4, 4))
    assert torch.allclose(refine_with_attention(a, maps, "selection", 0.5, 2), (norm[2] @ cross).T.reshape(2, 4, 4))
    with pytest.raises(ConfigError, match="attention_idx"):
        refine_with_attention(a, maps, "selection", 0.5, 3)


def test_refinement_without_diffusers_is_a_one_line_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "diffusers" else real(name, *a))
    with pytest.raises(ConfigError, match=r"refinement 'sfsa' needs diffusers .*gclip\[sd\]"):
        get_method("cliper", refinement="sfsa")
    assert get_method("cliper").refinement == "none"  # the default needs neither


def test_refinement_needs_a_local_checkpoint(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    import huggingface_hub

    from gclip.methods.cliper import load_stable_diffusion

    with pytest.raises(WeightsError, match="sd_checkpoint .*model_index.json"):
        get_method("cliper", refinement="sfsa", sd_checkpoint=str(tmp_path / "missing"))
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)  # an empty cache
    with pytest.raises(
        WeightsError, match="not in the local Hugging Face cache: pass its local folder .*sd_checkpoint"
    ):
        get_method("cliper", refinement="mean")
    with pytest.raises(ConfigError, match="sd_version"):
        get_method("cliper", refinement="sfsa", sd_version="v3")
    index = '{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}'
    (tmp_path / "model_index.json").write_text(index)
    with pytest.raises(WeightsError, match="diffusers cannot load it"):
        load_stable_diffusion(str(tmp_path), "cpu", torch.float32)

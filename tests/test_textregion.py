"""TextRegion: its steps (views, global-patch removal, mask fusion), the region-mask sources, the engine path and its
errors, and a crop's logits against the authors' code. Pipelines: test_pipeline_fidelity (textregion); the PE-Core
path's crop and pipeline goldens are here (the pipeline's on the first photo, all three with ``GCLIP_SLOW=1``)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_second_models
from gclip import Segmenter
from gclip.errors import ConfigError, ImageError
from gclip.inference.reference import reference_labels
from gclip.io.masks import fuse_masks, read_region_masks
from gclip.methods import get_method
from gclip.methods.textregion import NO_MASKS, Views, combine, remove_global_patches, view_images

GOLDEN = Path(__file__).parent / "data" / "fidelity"


def _masks(shape=(61, 83)) -> np.ndarray:
    """Three soft, overlapping masks; the bottom-right corner in none."""
    out = np.zeros((3, *shape), np.float16)
    out[0, :30, :40] = 3.0
    out[1, 20:, :50] = 0.5
    out[2, 10:40, 30:70] = 1.0
    return out


@pytest.fixture
def photo(tmp_path, rgb_image):
    Image.fromarray(rgb_image).save(tmp_path / "photo.png")
    (tmp_path / "masks").mkdir()
    np.savez(tmp_path / "masks" / "photo.npz", region_masks=_masks())
    return tmp_path / "photo.png"


def _segmenter(model, **options) -> Segmenter:
    seg = Segmenter(
        model, method="textregion", method_options={"crop_size": 16, **options}, short_side=40, crop=0, padding="none"
    )
    seg.set_classes(["cat", "dog", "grass"])
    return seg


def test_views_resize_as_torchvision_and_cut_the_authors_grid():
    from torchvision.transforms import InterpolationMode, v2

    pixels = torch.rand(1, 3, 70, 100)
    views = view_images(pixels, 32, True, False, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    assert (views.wholes, views.rows, views.cols) == (1, 2, 3)  # 70 // 32, 100 // 32
    resize = v2.Resize((32, 32), interpolation=InterpolationMode.BICUBIC)
    assert torch.allclose(views.images[0], resize(pixels[0]), atol=1e-6)
    # tiles of ceil(70 / 2) x ceil(100 / 3) = 35 x 34, the last column shifted back to end at the border
    assert torch.allclose(views.images[1 + 2], resize(pixels[0, :, :35, 66:100]), atol=1e-6)
    assert torch.allclose(views.images[1 + 3], resize(pixels[0, :, 35:70, :34]), atol=1e-6)
    halves = view_images(pixels, 32, False, True, (0.0,) * 3, (1.0,) * 3)
    assert halves.wholes == 2 and halves.rows == 0 and torch.allclose(halves.images[1], resize(pixels[0, :, :, 50:]))


def test_combine_adds_each_tile_to_the_resized_whole():
    maps = torch.rand(5, 2, 3, 3)
    out = combine(maps, Views(torch.empty(0), 1, 2, 2))
    whole = torch.nn.functional.interpolate(maps[:1], size=(6, 6), mode="bilinear")[0]
    assert torch.allclose(out[:, 3:, :3], whole[:, 3:, :3] + maps[3])  # tile (1, 0): the fourth view
    assert torch.equal(combine(maps[:1], Views(torch.empty(0), 1, 0, 0)), maps[0])


def test_remove_global_patches_drops_patches_as_close_to_other_regions():
    values = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.7, 0.7]])
    masks = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])
    out = remove_global_patches(masks, values, 0.2)
    # patch 3 (between both directions) is about as close to region 0 as to its own region 1: taken out of both
    assert out[:, 3].tolist() == [0.0, 0.0] and torch.equal(out[:, :3], masks[:, :3])


def test_fuse_masks_merges_contained_masks_in_order():
    a = torch.zeros(3, 10, 10)
    a[0, :5, :5] = 1  # kept first, takes mask 1 (inside it)
    a[1, :3, :3] = 1
    a[2, 6:, 6:] = 1  # apart
    boxes = torch.tensor([[0, 0, 5, 5], [0, 0, 3, 3], [6, 6, 4, 4]], dtype=torch.float32)
    out = fuse_masks(a, boxes, 0.8)
    assert len(out) == 2 and torch.equal(out[0], a[0]) and torch.equal(out[1], a[2])
    assert len(fuse_masks(a, boxes, 1.0)) == 3  # containment 1.0 is not above 1.0


def test_read_region_masks_stacks_and_instance_masks(tmp_path):
    np.savez(tmp_path / "a.npz", region_masks=_masks((2, 3)))
    np.savez(tmp_path / "b.npz", instance_mask=np.array([[0, 4, 4], [7, 0, 4]]))
    assert read_region_masks(tmp_path, "a.jpg", (2, 3)).shape == (3, 2, 3)
    split = read_region_masks(tmp_path, "b", (2, 3))
    assert split.tolist() == [[[0, 1, 1], [0, 0, 1]], [[0, 0, 0], [1, 0, 0]]]  # 0: unsegmented, no mask
    with pytest.raises(ImageError, match="is 3x2x3, its image 3x3"):
        read_region_masks(tmp_path, "a", (3, 3))


def test_textregion_engine_equals_its_reference(tiny_model, photo):
    seg = _segmenter(tiny_model, masks=str(photo.parent / "masks"))
    got = seg.predict(photo, return_probs=True)
    assert got.labels.shape == (61, 83) and np.isfinite(got.probs).all()
    assert np.array_equal(got.labels, reference_labels(seg, photo))


def test_textregion_a_region_alone_carries_one_label(tiny_model, photo):
    seg = _segmenter(tiny_model, masks=str(photo.parent / "masks"), remove_global_patch=False, mask_type="hard")
    labels = seg.predict(photo).labels
    inside = _masks().astype(np.float32) > 0
    only = inside[0] & ~inside[1] & ~inside[2]  # one region: one label
    assert len(np.unique(labels[only])) == 1


def test_textregion_errors_are_one_line(tiny_model, photo, tmp_path):
    with pytest.raises(ConfigError, match="textregion needs region masks") as e:
        _segmenter(tiny_model).predict(photo)
    assert str(e.value) == NO_MASKS
    with pytest.raises(ConfigError, match="multiple of the patch"):
        _segmenter(tiny_model, masks=str(photo.parent / "masks"), crop_size=12).predict(photo)
    with pytest.raises(ConfigError, match="masks folder"):
        _segmenter(tiny_model, masks=str(tmp_path / "nope")).predict(photo)
    with pytest.raises(ConfigError, match="resize_method must be one of"):
        get_method("textregion", resize_method="tiles")


def test_textregion_with_sams_mask_generator(tiny_model, rgb_image):
    seg = _segmenter(tiny_model, **tiny_second_models("textregion"))
    item = seg.prepare(rgb_image)
    assert len(seg.method.region_masks(seg.vit, item)) >= 1  # the generator found regions
    got = seg.predict(rgb_image, return_probs=True)
    assert got.labels.shape == rgb_image.shape[:2] and np.isfinite(got.probs).all()


@pytest.mark.golden
@pytest.mark.parametrize("threshold, stored", [(0.004, "logits"), (0.07, "logits_default")])
def test_crop_logits_match_the_authors_predict(vitb16_checkpoint, threshold, stored):
    """The authors' predict on the shared 448 x 448 input as one view (resize_method 'single', crop_size 448) with
    seven soft overlapping masks: the logits its softmax sees, every 8th pixel (tests/data/fidelity/README.md). At
    the default threshold random weights drop every region (SCLIP's logits everywhere); at 0.004 none is."""
    from gclip.backbones.models import load_model
    from gclip.backbones.openclip import DenseViT

    vit = DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)
    golden = np.load(GOLDEN / "textregion_crop.npz")
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))
    pixels = image * torch.tensor(vit.std).view(1, 3, 1, 1) + torch.tensor(vit.mean).view(1, 3, 1, 1)
    method = get_method("textregion", resize_method="single", crop_size=448, global_patch_threshold=threshold)
    with torch.no_grad():
        out = method.pixel_logits(vit, pixels, torch.from_numpy(golden["masks"]).float(), text)
    assert np.abs(out[None, :, ::8, ::8].numpy() - golden[stored]).max() <= 1e-4


# --- the PE-Core path (TextRegion's clip_pretrained='meta') ---------------------------------------------------------


@pytest.fixture(scope="module")
def pe_core():
    """PE-Core-B/16 (open_clip's timm Eva) with ``random_state_dict(visual, seed=0)`` weights, the trunk head's bias
    zero (Meta's PE layout has none: its projection is a bare matrix) and mean = std = 0.5 (the ``meta`` tag's): the
    tower of the PE-Core goldens (tests/data/fidelity/README.md). The text tower is dropped: the goldens take random
    text embeddings."""
    import open_clip

    from gclip.backbones.models import load_model
    from gclip.testing import random_state_dict

    torch.manual_seed(0)
    model = load_model("PE-Core-B-16", None, device="cpu")
    model.text = None
    state = random_state_dict(model.visual, seed=0)
    state["trunk.head.bias"].zero_()
    model.visual.load_state_dict(state)
    half = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), **half})
    return model


def _pe_text() -> torch.Tensor:
    """The PE goldens' text: ``default_rng(2)`` 10 x 1024 (PE-Core-B/16's embedding width), unit rows."""
    text = np.random.default_rng(2).standard_normal((10, 1024), dtype=np.float32)
    return torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))


@pytest.mark.heavy
def test_pe_region_tokens_average_the_per_patch_projection_over_the_region(pe_core):
    """One key for every token makes the MAP head's weights uniform over a region's tokens (mask > 0, whatever its
    soft value), so a region token is the mean of the adapter's per-patch projection over them; regions differ."""
    from gclip.backbones import backbone_for
    from gclip.methods.textregion import is_pe_core, pe_region_tokens

    vit = backbone_for(pe_core.visual)
    assert is_pe_core(vit)
    with torch.no_grad():
        tokens = vit.final_norm(torch.randn(30, vit.width))
        masks = torch.zeros(2, 30)
        masks[0, [1, 4, 5, 11]] = torch.tensor([0.2, 1.0, 0.7, 0.05])
        masks[1, 20:] = 1.0
        region = pe_region_tokens(vit, masks, tokens)
        per_patch = vit.projection(tokens[None])[0]
    torch.testing.assert_close(region[0], per_patch[[1, 4, 5, 11]].mean(dim=0), rtol=0, atol=1e-5)
    torch.testing.assert_close(region[1], per_patch[20:].mean(dim=0), rtol=0, atol=1e-5)


@pytest.mark.heavy
def test_pe_core_refuses_split_halves_in_one_line(pe_core):
    from gclip.backbones import backbone_for

    method = get_method("textregion", split_halves=True)
    with pytest.raises(ConfigError, match="split_halves: not on PE-Core"):
        method.pixel_logits(backbone_for(pe_core.visual), torch.rand(1, 3, 64, 64), torch.ones(1, 64, 64), _pe_text())


@pytest.mark.golden
@pytest.mark.parametrize("resize", ["single", "multi_resolution"])
def test_pe_core_crop_logits_match_the_authors_predict(pe_core, resize, monkeypatch):
    """The authors' predict on PE-Core-B16-224 (their ``pe_value_with_sam2_attn``) on the shared 448 x 448 input
    (its pixels: the input at mean = std = 0.5) with the seven soft masks of ``textregion_crop.npz``: the logits its
    softmax sees every 8th pixel and the per-region cosines, at ``global_patch_threshold=0.015`` (some patches
    taken out of every region, all regions kept); at the default 0.07 every region is dropped and every logit is 0,
    as theirs (tests/data/fidelity/README.md)."""
    import gclip.methods.textregion as textregion
    from gclip.backbones import backbone_for

    vit = backbone_for(pe_core.visual)
    golden = np.load(GOLDEN / "textregion_pe_crop.npz")
    masks = torch.from_numpy(np.load(GOLDEN / "textregion_crop.npz")["masks"]).float()
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    text = _pe_text()
    regions: list[torch.Tensor] = []
    real = textregion.pe_region_tokens
    monkeypatch.setattr(textregion, "pe_region_tokens", lambda *a: regions.append(real(*a)) or regions[-1])
    with torch.no_grad():
        out = get_method("textregion", resize_method=resize, global_patch_threshold=0.015).pixel_logits(
            vit, image * 0.5 + 0.5, masks, text
        )
        default = get_method("textregion", resize_method=resize).pixel_logits(vit, image * 0.5 + 0.5, masks, text)
    assert np.abs(out[:, ::8, ::8].numpy() - golden[resize]).max() <= 1e-4
    assert len(regions) == 1 and regions[0].shape == (7, 1024)
    cosines = F.normalize(regions[0], dim=-1) @ text.T
    assert np.abs(cosines.numpy() - golden[f"{resize}_regions"]).max() <= 1e-4
    assert not golden[f"{resize}_default"].any() and not default.any()


@pytest.mark.pipeline
def test_pe_core_pipeline_matches_the_authors_segmentor(pe_core, sample_data, tmp_path):
    """``pipelines.toml``'s ``textregion_pe`` (the authors' predict with PE-Core-B16-224 on the three VOC photos, the
    CLIP golden's masks): labels within 0.01%, probabilities within 2e-3 (stored in fp16), the logits the softmax
    sees within 1e-4. The first photo by default, all three with ``GCLIP_SLOW=1``."""
    from gclip.text import parse_classes
    from test_pipeline_fidelity import PHOTOS, Embedded, spy_on_logits

    entry = tomllib.loads((GOLDEN / "pipelines.toml").read_text(encoding="utf-8"))["textregion_pe"]
    assert entry["model"] == "PE-Core-B-16"
    with np.load(GOLDEN / "pipeline" / entry["masks"]) as stored:
        for stem in stored.files:
            np.savez(tmp_path / f"{stem}.npz", **{entry["masks_array"]: stored[stem]})
    seg = Segmenter(
        pe_core,
        method=entry["method"],
        method_options={**entry["options"], "masks": str(tmp_path)},
        **entry["settings"],
    )
    seg.classes = parse_classes(["background"] + [f"class {i}" for i in range(1, 10)])
    seg._queries = seg.method.text_queries(Embedded(_pe_text()), seg.classes)
    golden = np.load(GOLDEN / "pipeline" / "textregion_pe.npz")
    for stem in PHOTOS if os.environ.get("GCLIP_SLOW") else PHOTOS[:1]:
        reduced = spy_on_logits(seg)
        result = seg.predict(sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg", True)
        labels = golden[f"{stem}_labels"]
        assert result.labels.shape == labels.shape and (result.labels != labels).mean() <= 1e-4, stem
        probs = golden[f"{stem}_logits"].astype(np.float32)
        assert np.abs(result.probs[:, ::4, ::4] - probs).max() <= 2e-3, stem
        assert len(reduced) == 1
        dense = F.interpolate(reduced[0][None], size=labels.shape, mode="bilinear")[0]
        assert np.abs(dense[:, ::4, ::4].numpy() - golden[f"{stem}_dense"]).max() <= 1e-4, stem

"""TextRegion: its steps (views, global-patch removal, mask fusion), the region-mask sources, the engine path and its
errors, and a crop's logits against the authors' code. Pipelines: test_pipeline_fidelity (textregion); the PE-Core
path's crop and pipeline goldens are here (the pipeline's on the first photo, all three with ``GCLIP_SLOW=1``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
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


def _siglip2_inputs(model):
    """The shared 448 x 448 input as SigLIP 2's pixels (its normalisation: 0.5, 0.5) and the 10 x 768 random text."""
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    pixels = image * torch.tensor(model.std).view(1, 3, 1, 1) + torch.tensor(model.mean).view(1, 3, 1, 1)
    text = np.random.default_rng(2).standard_normal((10, 768), dtype=np.float32)
    return pixels, torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))


@pytest.mark.golden
@pytest.mark.parametrize("threshold, stored", [(0.016, "logits"), (0.07, "logits_default")])
def test_siglip2_crop_logits_match_the_authors_predict(golden_siglip2, monkeypatch, threshold, stored):
    """TextRegion's SigLIP 2 path (the authors' predict with ``clip_pretrained='siglip2'``, ViT-B-16-SigLIP2 at its
    native 224, multi-resolution: the whole 448 x 448 input and 2 x 2 tiles) with the seven soft masks of
    ``textregion_crop.npz``: each region's SigLIP logits (``exp(logit_scale) cos + logit_bias``) and the logits its
    softmax sees, every 8th pixel (tests/data/fidelity/README.md). At 0.016 every region is kept (about half the
    patches taken out of them); at the default 0.07 random weights drop every region, and the logits stay zero
    (this path has no SCLIP fallback)."""
    import gclip.methods.textregion as textregion
    from gclip.backbones import TimmClipViT, backbone_for

    model = golden_siglip2
    vit = backbone_for(model.visual, model.mean, model.std, model.clip)
    assert isinstance(vit, TimmClipViT) and model.mean == (0.5, 0.5, 0.5)
    assert vit.sigmoid_logits == (pytest.approx(1 / 0.07), -10.0)  # the model's exp(logit_scale), logit_bias
    golden = np.load(GOLDEN / "textregion_siglip_crop.npz")
    masks = torch.from_numpy(np.load(GOLDEN / "textregion_crop.npz")["masks"]).float()
    pixels, text = _siglip2_inputs(model)
    regions = []
    real = textregion.map_head_region_tokens
    monkeypatch.setattr(textregion, "map_head_region_tokens", lambda *a: regions.append(real(*a)) or regions[-1])
    method = get_method("textregion", global_patch_threshold=threshold)
    with torch.no_grad():
        out = method.pixel_logits(vit, pixels, masks, text)
    assert np.abs(out[None, :, ::8, ::8].numpy() - golden[stored]).max() <= 1e-4
    if stored == "logits":
        scale, bias = vit.sigmoid_logits
        region = scale * torch.nn.functional.normalize(regions[0], dim=-1) @ text.T + bias
        assert region.shape == (7, 10) and np.abs(region.numpy() - golden["region"]).max() <= 1e-4
        assert np.abs(golden["logits"]).max() > 10  # non-trivial logits
    else:  # every region emptied: none reaches the head, every logit 0
        assert regions == [] and not out.any()


def test_siglip2_path_errors_are_one_line(golden_siglip2):
    from gclip.backbones import backbone_for

    model = golden_siglip2
    pixels, text = _siglip2_inputs(model)
    masks = torch.ones(1, 448, 448)
    with pytest.raises(ConfigError, match="needs the model's logit scale and bias"):
        get_method("textregion").pixel_logits(backbone_for(model.visual, model.mean, model.std), pixels, masks, text)
    vit = backbone_for(model.visual, model.mean, model.std, model.clip)
    with pytest.raises(ConfigError, match="no split_halves"):
        get_method("textregion", split_halves=True).pixel_logits(vit, pixels, masks, text)
    with pytest.raises(ConfigError, match="multiple of the patch 16"):
        get_method("textregion", crop_size=200).pixel_logits(vit, pixels, masks, text)


# --- the PE-Core path (TextRegion's clip_pretrained='meta') ---------------------------------------------------------


def _pe_text() -> torch.Tensor:
    """The PE goldens' text: the goldens' random unit rows, 1024 wide (PE-Core-B/16's embedding width)."""
    from test_pipeline_fidelity import random_text

    return random_text(1024)


@pytest.mark.heavy
def test_map_head_region_tokens_are_the_heads_attention_with_one_key(golden_pe_core):
    """The region token as the authors compute it on PE-Core, written out here with the tower's timm attention pool:
    its latent query, ONE key for every token (the pool's norm of the tokens' mean through the key half of ``kv``),
    the value half of ``kv`` per token, attention only where the mask is > 0 (whatever its soft value), then the
    pool's ``proj`` and what follows the pool. gclip's shortcut (the projection of the support's mean token) must
    equal it; regions differ."""
    import math

    from gclip.backbones import backbone_for
    from gclip.methods.textregion import _pools_with_map_head, map_head_region_tokens

    vit = backbone_for(golden_pe_core.visual)
    assert _pools_with_map_head(vit)
    pool = vit.trunk.attn_pool
    h, d = pool.num_heads, pool.head_dim
    width = h * d
    with torch.no_grad():
        tokens = vit.final_norm(torch.randn(30, vit.width))
        masks = torch.zeros(2, 30)
        masks[0, [1, 4, 5, 11]] = torch.tensor([0.2, 1.0, 0.7, 0.05])
        masks[1, 20:] = 1.0
        w, b = pool.kv.weight, pool.kv.bias
        key = F.linear(pool.norm(tokens.mean(dim=0, keepdim=True)), w[:width], None if b is None else b[:width])
        value = F.linear(tokens, w[width:], None if b is None else b[width:]).reshape(-1, h, d).transpose(0, 1)
        q = pool.q_norm(pool.q(pool.latent).reshape(-1, h, d).transpose(0, 1))  # (h, L, d)
        k = pool.k_norm(key.reshape(1, h, d).transpose(0, 1))  # (h, 1, d)
        score = (q @ k.transpose(-2, -1) * pool.scale)[None].expand(2, -1, -1, 30)
        weights = torch.softmax(score.masked_fill(~(masks > 0)[:, None, None, :], -math.inf), dim=-1)
        heads = torch.einsum("rhlm,hmd->rhld", weights, value)
        expected = vit.post_pool(pool.proj(heads.permute(0, 2, 1, 3).reshape(2, -1, width)))[:, 0]
        region = map_head_region_tokens(vit, masks, tokens)
    torch.testing.assert_close(region, expected, rtol=0, atol=1e-5)
    assert (region[0] - region[1]).abs().max() > 1e-3


@pytest.mark.heavy
def test_pe_core_refuses_split_halves_in_one_line(golden_pe_core):
    from gclip.backbones import backbone_for

    method = get_method("textregion", split_halves=True)
    with pytest.raises(ConfigError, match="split_halves: not on PE-Core"):
        method.pixel_logits(
            backbone_for(golden_pe_core.visual), torch.rand(1, 3, 64, 64), torch.ones(1, 64, 64), _pe_text()
        )


@pytest.mark.golden
@pytest.mark.parametrize("resize", ["single", "multi_resolution"])
def test_pe_core_crop_logits_match_the_authors_predict(golden_pe_core, resize, monkeypatch):
    """The authors' predict on PE-Core-B16-224 (their ``pe_value_with_sam2_attn``) on the shared 448 x 448 input
    (its pixels: the input at mean = std = 0.5) with the seven soft masks of ``textregion_crop.npz``: the logits its
    softmax sees every 8th pixel and the per-region cosines, at ``global_patch_threshold=0.015`` (some patches
    taken out of every region, all regions kept); at the default 0.07 every region is dropped and every logit is 0,
    as theirs (tests/data/fidelity/README.md)."""
    import gclip.methods.textregion as textregion
    from gclip.backbones import backbone_for

    vit = backbone_for(golden_pe_core.visual)
    golden = np.load(GOLDEN / "textregion_pe_crop.npz")
    masks = torch.from_numpy(np.load(GOLDEN / "textregion_crop.npz")["masks"]).float()
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    text = _pe_text()
    regions: list[torch.Tensor] = []
    real = textregion.map_head_region_tokens
    monkeypatch.setattr(textregion, "map_head_region_tokens", lambda *a: regions.append(real(*a)) or regions[-1])
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

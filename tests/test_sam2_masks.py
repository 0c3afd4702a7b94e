"""SAM 2 mask generators (extra ``sam2``): TextRegion's region masks against the authors' own generator (a golden,
tests/data/fidelity/README.md), CorrCLIP's instance masks against sam2's generator painted as CorrCLIP paints them,
the one-line errors, and TextRegion and CorrCLIP end to end with a SAM 2 generator on a real VOC photo.

The model is SAM 2.1 Hiera-T (the smallest config) with random weights, at a 256 px input (a config override: the
same weights, 1/16 of the encoder's work) so that the file stays cheap."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY_DINO
from gclip import Segmenter
from gclip.errors import ConfigError, WeightsError
from gclip.io import masks as masks_module
from gclip.io.masks import (
    MASK_MODELS,
    generate_instance_mask,
    generate_region_masks,
    is_sam2,
    load_sam,
    register_mask_model,
    sam2_region_masks,
)
from gclip.testing import random_state_dict

pytest.importorskip("sam2")

GOLDEN = Path(__file__).parent / "data" / "fidelity" / "sam2_region_masks.npz"
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
NAME = "sam2.1_hiera_t_256"
PHOTO = "2007_001288"
# the golden's settings: loose thresholds, so that random weights leave masks (and two of them fuse)
SETTINGS = dict(points_per_side=16, pred_iou_thresh=0.3, stability_score_thresh=0.0, box_nms_thresh=0.999)


def _build():
    from sam2.build_sam import build_sam2

    return build_sam2(
        CONFIG, None, device="cpu", apply_postprocessing=False, hydra_overrides_extra=["++model.image_size=256"]
    )


@pytest.fixture(scope="module")
def sam2_checkpoint(tmp_path_factory):
    """A random SAM 2.1 Hiera-T in SAM 2's file layout (``{"model": state_dict}``), registered as ``NAME``."""
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_t_random.pt"
    torch.save({"model": random_state_dict(_build(), seed=0)}, path)
    register_mask_model(NAME, _build)
    yield str(path)
    MASK_MODELS.pop(NAME, None)
    load_sam.cache_clear()


@pytest.fixture(scope="module")
def photo(sample_data) -> np.ndarray:
    path = sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{PHOTO}.jpg"
    return np.asarray(Image.open(path).convert("RGB"))


def test_sam2_names_build_their_configs():
    assert MASK_MODELS["sam2.1_hiera_l"] == "configs/sam2.1/sam2.1_hiera_l.yaml"  # TextRegion's
    assert MASK_MODELS["sam2_hiera_l"] == "configs/sam2/sam2_hiera_l.yaml"  # CorrCLIP's
    from gclip.backbones.download import SAM_URLS

    assert SAM_URLS["sam2.1_hiera_b+"].endswith("/092824/sam2.1_hiera_base_plus.pt")
    assert SAM_URLS["sam2_hiera_t"].endswith("/072824/sam2_hiera_tiny.pt")
    assert set(masks_module.SAM2_CONFIGS) <= set(SAM_URLS)


@pytest.mark.golden
@pytest.mark.parametrize("fuse, stored", [(0.8, "fused"), (None, "unfused")])
def test_region_masks_match_textregions_generator(sam2_checkpoint, photo, fuse, stored):
    """TextRegion's CustomAutomaticMaskGenerator.generate_for_batch on the same crop, weights and settings, its
    masks at 120 x 160 (another size than SAM's input, as TextRegion asks for the original size): the same masks,
    in the same order, within one fp16 step (both keep the logits in fp16)."""
    sam = load_sam(NAME, sam2_checkpoint)
    assert is_sam2(sam)
    expected = np.load(GOLDEN)[stored].astype(np.float32)
    pixels = photo[80:251, 100:350]
    got = sam2_region_masks(sam, pixels, (120, 160), fuse_threshold=fuse, **SETTINGS).numpy()
    assert got.shape == expected.shape and len(got) >= 2
    assert np.abs(got - expected).max() <= 2e-3
    assert got.max() > 1.0  # soft masks, clamped to 0..3 (TextRegion clamps them to 0..1 on its grid)
    if fuse is not None:  # the public entry point dispatches a SAM 2 to the same generator
        public = generate_region_masks(sam, pixels, *SETTINGS.values(), fuse, size=(120, 160))
        assert np.array_equal(public, got)


@pytest.mark.heavy
def test_region_masks_are_empty_when_nothing_passes(sam2_checkpoint, photo):
    """TextRegion's own thresholds keep nothing of random weights (the authors' code then fails on an empty stack):
    an empty stack here, so that the method falls back to SCLIP's logits everywhere."""
    sam = load_sam(NAME, sam2_checkpoint)
    got = sam2_region_masks(sam, photo, (50, 60), 4, 0.6, 0.6, 0.9, 0.8)
    assert got.shape == (0, 50, 60)


@pytest.mark.heavy
def test_instance_mask_is_corrclips_sam2_recipe(sam2_checkpoint, photo):
    """CorrCLIP's code: SAM2AutomaticMaskGenerator with one mask per point, painted from the largest area down
    (ids 1.. from the smallest up over 0)."""
    from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

    sam = load_sam(NAME, sam2_checkpoint)

    def generator(multimask: bool) -> SAM2AutomaticMaskGenerator:
        made = SAM2AutomaticMaskGenerator(
            sam, points_per_side=8, pred_iou_thresh=0.3, stability_score_thresh=0.0, multimask_output=multimask
        )
        made.predictor._bb_feat_sizes = [(64, 64), (32, 32), (16, 16)]  # the 256 px input's (1024 px's by default)
        return made

    records = generator(False).generate(photo)
    expected = np.zeros(photo.shape[:2], dtype=np.int64)
    for number, record in enumerate(sorted(records, key=lambda r: r["area"]), start=1):
        expected[record["segmentation"]] = number
    assert len(np.unique(expected)) >= 2  # a region (random weights: box NMS leaves one) and the unsegmented rest
    got = generate_instance_mask(sam, photo, 8, 0.3, 0.0)
    assert np.array_equal(got, expected)
    multi = generator(True).generate(photo)  # the setting matters: the test would see the other one
    assert sorted(r["area"] for r in multi) != sorted(r["area"] for r in records)


@pytest.mark.heavy
def test_textregion_end_to_end_with_sam2(tiny_model, sam2_checkpoint, photo, monkeypatch):
    """The method hands SAM 2 its model input (the resized photo, exact uint8 values) and asks for masks at the
    photo's size, as the authors' predict does; the masks it pools are the generator's."""
    from gclip.inference.windows import rescale_size, resize_image
    from gclip.methods import textregion

    used = []
    real = textregion.generate_region_masks
    monkeypatch.setattr(
        textregion, "generate_region_masks", lambda *a, **k: used.append((a, k, real(*a, **k))) or used[-1][2]
    )
    options = dict(mask_generator=NAME, sam_checkpoint=sam2_checkpoint, crop_size=16, **SETTINGS)
    seg = Segmenter(tiny_model, method="textregion", method_options=options, short_side=40, crop=0, padding="none")
    seg.set_classes(["cat", "dog", "grass"])
    got = seg.predict(photo, return_probs=True)
    assert got.labels.shape == photo.shape[:2] and np.isfinite(got.probs).all()
    ((args, kwargs, masks),) = used
    resized = resize_image(photo, rescale_size(*photo.shape[:2], 40, seg.settings.max_long_side))
    assert args[1].shape == resized.shape and np.array_equal(args[1], resized.astype(np.float32))
    assert kwargs["size"] == photo.shape[:2]
    expected = sam2_region_masks(
        load_sam(NAME, sam2_checkpoint), resized, photo.shape[:2], fuse_threshold=0.8, **SETTINGS
    )
    assert len(masks) >= 1 and np.array_equal(masks, expected.numpy())


@pytest.mark.heavy
def test_textregion_without_regions_takes_sclips_logits(tiny_model, sam2_checkpoint, photo, tmp_path):
    """With the authors' thresholds random weights leave no mask: the method gives SCLIP's logits everywhere, as it
    does where masks cover nothing (an all-zero region mask from a folder)."""

    def segment(image, **options):
        seg = Segmenter(
            tiny_model,
            method="textregion",
            method_options={"crop_size": 16, **options},
            short_side=40,
            crop=0,
            padding="none",
        )
        seg.set_classes(["cat", "dog", "grass"])
        return seg.predict(image, return_probs=True)

    got = segment(photo, mask_generator=NAME, sam_checkpoint=sam2_checkpoint, points_per_side=4)
    Image.fromarray(photo).save(tmp_path / "photo.png")
    (tmp_path / "masks").mkdir()
    np.savez(tmp_path / "masks" / "photo.npz", region_masks=np.zeros((1, *photo.shape[:2]), np.float32))
    expected = segment(tmp_path / "photo.png", masks=str(tmp_path / "masks"))
    assert np.array_equal(got.labels, expected.labels) and np.allclose(got.probs, expected.probs, atol=1e-6)


@pytest.mark.heavy
def test_corrclip_end_to_end_with_sam2(tiny_model, sam2_checkpoint, photo):
    """CorrCLIP's SAM 2 sees the decoded photo (as its code reads the file) and its instance mask corrects the map."""
    options = dict(proxy=TINY_DINO, window_pad=8, mask_generator=NAME, sam_checkpoint=sam2_checkpoint)
    options.update(pred_iou_thresh=0.3, stability_score_thresh=0.0)
    seg = Segmenter(tiny_model, method="corrclip", method_options=options, short_side=40, crop=32, stride=16)
    seg.set_classes(["cat", "dog", "grass"])
    item = seg.prepare(photo)
    mask = seg.method.instance_mask(seg.vit, item.original, item.key, tuple(item.size))
    expected = generate_instance_mask(load_sam(NAME, sam2_checkpoint), photo, 8, 0.3, 0.0)
    assert np.array_equal(mask.cpu().numpy(), expected) and len(np.unique(expected)) >= 2
    labels = seg.predict(photo).labels
    assert labels.shape == photo.shape[:2]
    for region in np.unique(expected)[1:]:  # map correction: one label per region
        assert len(np.unique(labels[expected == region])) == 1


@pytest.mark.pipeline
def test_textregion_pipeline_with_sam2_matches_the_authors(vitb16_checkpoint, sam2_checkpoint, sample_data):
    """The authors' predict with their own SAM 2 generator (not a stand-in) on the first VOC photo, the shared random
    ViT-B/16 and text, cfg_voc21, the golden's loose thresholds (tests/data/fidelity/README.md): SAM 2 sees the
    resized model input and its masks come at the photo's size on both sides."""
    from gclip.backbones.models import load_model
    from gclip.text import parse_classes
    from test_pipeline_fidelity import Embedded, spy_on_logits

    model = load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True)
    rows = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(rows / np.linalg.norm(rows, axis=1, keepdims=True))
    options = dict(global_patch_threshold=0.004, mask_generator=NAME, sam_checkpoint=sam2_checkpoint, **SETTINGS)
    settings = dict(short_side=672, max_long_side=1008, crop=0, padding="none", logit_scale=50.0, prob_thd=0.4)
    seg = Segmenter(model, method="textregion", method_options=options, **settings)
    seg.classes = parse_classes(["background"] + [f"class {i}" for i in range(1, 10)])
    seg._queries = seg.method.text_queries(Embedded(text), seg.classes)
    golden = np.load(GOLDEN.parent / "pipeline" / "textregion_sam2.npz")
    reduced = spy_on_logits(seg)
    result = seg.predict(sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{PHOTO}.jpg", True)
    labels = golden[f"{PHOTO}_labels"]
    assert result.labels.shape == labels.shape and (result.labels != labels).mean() <= 1e-4
    assert np.abs(result.probs[:, ::4, ::4] - golden[f"{PHOTO}_logits"].astype(np.float32)).max() <= 2e-3
    dense = torch.nn.functional.interpolate(reduced[0][None], size=labels.shape, mode="bilinear")[0]
    assert np.abs(dense[:, ::4, ::4].numpy() - golden[f"{PHOTO}_dense"]).max() <= 1e-4


def test_sam2_errors_are_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(WeightsError) as e:
        load_sam("sam2.1_hiera_l", None)
    message = str(e.value)
    assert "\n" not in message and "sam2.1_hiera_large.pt" in message
    assert "gclip download sam2.1_hiera_l" in message and "--sam-checkpoint" in message
    with pytest.raises(WeightsError, match="does not exist: pass an existing file to --sam-checkpoint"):
        load_sam("sam2.1_hiera_t", str(tmp_path / "nope.pt"))
    wrong = tmp_path / "wrong.pt"
    torch.save({"model": {"image_encoder.trunk.pos_embed": torch.zeros(1)}}, wrong)
    with pytest.raises(WeightsError, match="does not fit mask generator sam2.1_hiera_t") as e:
        load_sam("sam2.1_hiera_t", str(wrong))
    assert "\n" not in str(e.value)
    monkeypatch.setitem(sys.modules, "sam2.build_sam", None)
    with pytest.raises(ConfigError, match=r"needs SAM 2's package: pip install 'gclip\[sam2\]'"):
        load_sam("sam2.1_hiera_s", str(wrong))  # the package is imported before the file is read

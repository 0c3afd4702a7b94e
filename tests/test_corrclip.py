"""CorrCLIP: its steps (region merging, scope attention, map correction), the instance-mask sources, the engine
path and its errors. Parity with the authors' code: test_pipeline_fidelity (corrclip*)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import TINY, TINY_DINO, TINY_SAM_MASKS, tiny_second_models
from gclip import Segmenter
from gclip.cli import main
from gclip.errors import ConfigError, ImageError, WeightsError
from gclip.inference.reference import reference_labels
from gclip.io.masks import paint_masks, read_instance_mask
from gclip.methods.corrclip import NO_MASKS, PAD_VALUE, map_correction, merge_regions, scope_attention

pytest.importorskip("sklearn")


def _mask(shape=(61, 83)) -> np.ndarray:
    mask = np.zeros(shape, np.int64)
    mask[:30, :40] = 1
    mask[30:, 40:] = 2
    mask[10:20, 50:80] = 3
    mask[40:, :20] = 4
    return mask


@pytest.fixture
def photo(tmp_path, rgb_image):
    """``photo.png`` and its instance mask ``masks/photo.npz``."""
    Image.fromarray(rgb_image).save(tmp_path / "photo.png")
    (tmp_path / "masks").mkdir()
    np.savez(tmp_path / "masks" / "photo.npz", instance_mask=_mask())
    return tmp_path / "photo.png"


def _segmenter(model, **options) -> Segmenter:
    seg = Segmenter(
        model,
        method="corrclip",
        method_options={"proxy": TINY_DINO, "window_pad": 8, **options},
        short_side=40,
        crop=32,
        stride=16,
    )
    seg.set_classes(["cat", "dog", "grass"])
    return seg


def test_map_correction_takes_each_regions_mode_and_leaves_the_unsegmented():
    labels = torch.tensor([[0, 1, 1, 2], [2, 2, 3, 3]])
    mask = torch.tensor([[5, 7, 7, 7], [5, 9, 9, 9]])  # 5: the unsegmented (smallest) value
    got = map_correction(labels, mask)
    assert got.tolist() == [[0, 1, 1, 1], [2, 3, 3, 3]]  # region 7: 1, 1, 2 -> 1; region 9: 2, 3, 3 -> 3


def test_map_correction_ties_go_to_the_smaller_label_as_torch_mode():
    labels, mask = torch.tensor([0, 3, 1, 3, 1]), torch.tensor([0, 1, 1, 1, 1])
    assert map_correction(labels, mask)[1:].tolist() == [int(torch.mode(labels[1:])[0])] * 4 == [1] * 4


def test_scope_attention_keeps_regions_and_similar_unsegmented_pairs():
    ids = torch.tensor([0, 1, 1, 2])
    sim = torch.tensor([[1.0, 0.9, -0.5, 0.2], [0.9, 1, 0.3, 0.8], [-0.5, 0.3, 1, 0.1], [0.2, 0.8, 0.1, 1]])
    attn = scope_attention(ids + 10, sim, tau=4.0)
    assert torch.allclose(attn.sum(-1), torch.ones(4))
    mean, seg = sim.mean(), ids != 0
    allowed = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        for j in range(4):
            same = bool(ids[i] == ids[j] and seg[i] and seg[j])
            allowed[i, j] = same or bool((not seg[i] or not seg[j]) and sim[i, j] > mean)
    assert torch.equal(attn > 0, allowed)
    row = torch.softmax(sim[1].masked_fill(~allowed[1], float("-inf")) * 4.0, dim=0)
    assert torch.allclose(attn[1], row)


def test_merge_regions_clusters_similar_regions_only():
    mask = torch.tensor([[0, 1, 2, 3]] * 2)
    feats = torch.nn.functional.normalize(
        torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 1, 0.05], [0, 0, 1]] * 2), dim=1
    )  # regions 1 and 2 alike, 3 apart; 0 (unsegmented) never merged
    merged = merge_regions(mask, feats, eps=0.2, min_samples=1)
    assert merged[0].tolist() == [0, PAD_VALUE, PAD_VALUE, PAD_VALUE + 1]
    two = torch.tensor([[0, 1]])
    assert torch.equal(merge_regions(two, feats[:2], 0.2, 1), two)  # two regions or fewer: unchanged


def test_paint_masks_numbers_from_the_smallest_and_paints_larger_over():
    big = np.ones((3, 3), bool)
    small = np.zeros((3, 3), bool)
    small[0, 0] = True
    out = paint_masks([{"segmentation": big, "area": 9}, {"segmentation": small, "area": 1}], (3, 3))
    assert (out == 2).all()  # the small one is 1, then the big one covers it, as the authors paint


def test_read_instance_mask_sources_and_errors(tmp_path):
    (tmp_path / "voc").mkdir()
    np.savez(tmp_path / "voc" / "a.npz", instance_mask=np.arange(6).reshape(2, 3))
    Image.fromarray(np.full((2, 3), 7, np.uint8)).save(tmp_path / "b.png")
    assert read_instance_mask(tmp_path, "/imgs/a.jpg", (2, 3)).tolist() == [[0, 1, 2], [3, 4, 5]]  # subfolder
    assert (read_instance_mask(tmp_path, "b", (2, 3)) == 7).all()
    cases = [
        ("c.jpg", (2, 3), "no instance mask for c in"),
        ("a", (3, 3), "is 2x3, its image 3x3"),
        (np.zeros((2, 3)), (2, 3), "in-memory image"),
    ]
    for key, size, message in cases:
        with pytest.raises(ImageError, match=message) as e:
            read_instance_mask(tmp_path, key, size)
        assert "\n" not in str(e.value)
    (tmp_path / "d.npz").write_text("broken")
    with pytest.raises(ImageError, match="unreadable"):
        read_instance_mask(tmp_path, "d", (2, 3))
    with pytest.raises(ConfigError, match="does not exist"):
        read_instance_mask(tmp_path / "nope", "a", (2, 3))


def test_corrclip_engine_equals_its_reference_and_corrects_by_region(tiny_model, photo):
    seg = _segmenter(tiny_model, masks=str(photo.parent / "masks"))
    got = seg.predict(photo, return_probs=True)
    assert got.labels.shape == (61, 83) and np.isfinite(got.probs).all()
    assert np.array_equal(got.labels, reference_labels(seg, photo))
    mask = _mask()
    for v in range(1, 5):
        assert len(np.unique(got.labels[mask == v])) == 1  # one label per region
    off = _segmenter(tiny_model, masks=str(photo.parent / "masks"), map_correction=False).predict(photo, True)
    assert np.array_equal(off.probs, got.probs)  # the correction acts on labels only
    assert np.array_equal(got.labels[mask == 0], off.labels[mask == 0])  # and never on the unsegmented pixels


def test_corrclip_images_are_independent_and_leave_the_model_alone(tiny_model, photo, rgb_image):
    before = {k: v.clone() for k, v in tiny_model.clip.state_dict().items()}
    other = photo.with_name("other.png")
    Image.fromarray(np.ascontiguousarray(rgb_image[::-1])).save(other)
    np.savez(photo.parent / "masks" / "other.npz", instance_mask=_mask()[::-1])
    seg = _segmenter(tiny_model, masks=str(photo.parent / "masks"))
    both = seg.predict_batch([photo, other], return_probs=True)
    for image, result in zip((photo, other), both):
        alone = seg.predict(image, return_probs=True)
        assert np.array_equal(alone.labels, result.labels) and np.allclose(alone.probs, result.probs)
    assert all(torch.equal(before[k], v) for k, v in tiny_model.clip.state_dict().items())


def test_corrclip_errors_are_one_line(tiny_model, photo, rgb_image):
    (photo.parent / "masks" / "empty").mkdir()
    cases = [
        ({}, photo, ConfigError, "corrclip needs instance masks"),
        ({"masks": str(photo.parent / "masks")}, rgb_image, ImageError, "in-memory image"),
        ({"masks": str(photo.parent / "masks" / "empty")}, photo, ImageError, "no instance mask for photo"),
        ({"mask_generator": "sam_vitb"}, photo, WeightsError, "--sam-checkpoint PATH"),
        ({"mask_generator": "nope", "sam_checkpoint": "x.pth"}, photo, ConfigError, "unknown mask generator"),
        ({"masks": str(photo.parent / "masks"), "spatial_blocks": 9}, photo, ConfigError, "spatial_blocks"),
    ]
    for options, image, error, message in cases:
        with pytest.raises(error, match=message) as e:
            _segmenter(tiny_model, **options).predict(image)
        assert "\n" not in str(e.value)
    assert "--masks FOLDER" in NO_MASKS and "--mask-generator" in NO_MASKS


def test_corrclip_with_sams_mask_generator(tiny_model, rgb_image, tmp_path):
    seg = _segmenter(tiny_model, **tiny_second_models("corrclip"))
    mask = seg.method.instance_mask(seg.vit, rgb_image, None, rgb_image.shape[:2]).numpy()
    assert mask.shape == rgb_image.shape[:2] and mask.max() >= 1  # the generator found regions
    got = seg.predict(rgb_image)  # an in-memory image: the generator needs no file name
    assert np.array_equal(got.labels, reference_labels(seg, rgb_image))
    for v in np.unique(mask)[1:]:
        assert len(np.unique(got.labels[mask == v])) == 1
    (tmp_path / "bad.pth").write_bytes(b"")
    bad = _segmenter(tiny_model, mask_generator=TINY_SAM_MASKS, sam_checkpoint=str(tmp_path / "bad.pth"))
    with pytest.raises(WeightsError) as e:
        bad.predict(rgb_image)
    assert "\n" not in str(e.value)


def test_corrclip_check_resources_before_any_image(tiny_model, photo, tmp_path):
    from gclip.evaluation.run import runnable_methods

    notices = []
    kept = runnable_methods(
        ["corrclip", "clearclip"],
        {"corrclip": {"proxy": TINY_DINO}, "clearclip": {}},
        ["voc21"],
        tiny_model,
        True,
        lambda *a, **k: notices.append(a[0]),
    )
    assert kept == ["clearclip"] and notices[0].startswith("gclip: skipped corrclip: corrclip needs instance masks")
    with pytest.raises(ConfigError, match="masks folder"):
        runnable_methods(
            ["corrclip"], {"corrclip": {"proxy": TINY_DINO, "masks": "/no/such"}}, ["voc21"], tiny_model, False, print
        )
    masks = {"corrclip": {"proxy": TINY_DINO, "masks": str(photo.parent)}}
    assert runnable_methods(["corrclip"], masks, ["voc21"], tiny_model, False, print)
    per_set = {"corrclip": {"proxy": TINY_DINO, "masks": str(tmp_path / "{dataset}")}}  # each set's own folder, checked
    (tmp_path / "voc21").mkdir()
    assert runnable_methods(["corrclip"], per_set, ["voc21"], tiny_model, False, print)
    with pytest.raises(ConfigError, match=f"masks folder {tmp_path / 'ade20k'}"):
        runnable_methods(["corrclip"], per_set, ["voc21", "ade20k"], tiny_model, False, print)


def test_segment_cli_with_masks_goes_on_past_an_image_without_one(tmp_path, tiny_checkpoint, photo, capsys):
    Image.open(photo).save(tmp_path / "nomask.png")
    argv = ["segment", str(photo), str(tmp_path / "nomask.png"), "--classes", "cat,dog", "--model", TINY]
    argv += ["--pretrained", str(tiny_checkpoint), "--out", str(tmp_path / "out"), "--method", "corrclip"]
    argv += ["--masks", str(tmp_path / "masks"), "--proxy", TINY_DINO]
    argv += ["--crop", "32", "--stride", "16", "--short-side", "40"]
    argv += ["--method-options", json.dumps({"window_pad": 8})]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 1 and "no instance mask for nomask" in err and "1 segmented" in err and "1 failed" in err
    assert (tmp_path / "out" / "photo.png").is_file() and not (tmp_path / "out" / "nomask.png").exists()


@pytest.mark.golden
def test_crop_logits_match_the_authors_forward_feature(vitb16_checkpoint, golden_dino, sample_data):
    """The first 336 x 336 window of the first VOC photo (its golden instance mask resized as the authors do)
    through CorrCLIP's forward_feature: logits upsampled to the window, stored [::4, ::4]; tolerance 1e-4."""
    import contextlib
    from pathlib import Path

    from gclip.backbones.models import load_model

    golden = Path(__file__).parent / "data" / "fidelity" / "pipeline"
    model = load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True)
    seg = Segmenter(model, method="corrclip", method_options={"proxy": golden_dino}, short_side=336)
    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))
    stem = "2007_001288"
    item = seg.prepare(sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg")
    with np.load(golden / "corrclip_masks.npz") as stored:
        mask = torch.from_numpy(stored[stem].astype(np.int64))
    x = item.image[None]
    resized = torch.nn.functional.interpolate(mask[None, None].float(), size=x.shape[-2:], mode="nearest").long()
    with torch.no_grad():
        got = seg.method._window_logits(
            seg.vit, x[..., :336, :336], resized[:, 0, :336, :336], text, lambda name: contextlib.nullcontext()
        )
    expected = np.load(golden / "corrclip.npz")["crop"]
    assert np.abs(got[0, :, ::4, ::4].numpy() - expected).max() <= 1e-4


def test_corrclip_keeps_the_decoded_pixels_only_for_its_generator(tiny_model, photo):
    assert _segmenter(tiny_model, masks=str(photo.parent / "masks")).prepare(photo).original is None
    assert _segmenter(tiny_model, **tiny_second_models("corrclip")).prepare(photo).original is not None

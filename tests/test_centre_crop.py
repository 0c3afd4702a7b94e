"""The centre-crop evaluation protocol (CLIPtrase's): image and ground truth cut alike, the preset, ``gclip eval``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from gclip import Segmenter
from gclip.cli import main
from gclip.errors import ConfigError
from gclip.evaluation import BenchmarkDataset, get_dataset, list_samples, read_label, resolve_preset
from gclip.evaluation.centre_crop import centre_crop_image, centre_crop_label
from gclip.inference.preprocess import Preprocessor
from gclip.io.outputs import read_label_png
from gclip.text import read_class_file
from test_datasets import write_layout


def test_crop_offsets_follow_torchvision_rounding():
    """No resize when the short side is already N; the square starts at round((long - N) / 2)."""
    label = np.arange(41 * 32, dtype=np.int32).reshape(41, 32) * 7  # values above 255 survive (mode "I")
    assert (centre_crop_label(label, 32) == label[4:36]).all()  # round(9 / 2) = 4 (banker's: 4.5 -> 4)
    assert (centre_crop_label(label.T, 32) == label.T[:, 4:36]).all()
    image = np.random.default_rng(0).integers(0, 256, (32, 43, 3), dtype=np.uint8)
    assert (centre_crop_image(image, 32) == image[:, 6:38]).all()  # round(11 / 2) = 6 (5.5 -> 6)


def test_resized_label_is_nearest_and_square():
    label = np.kron(np.arange(6, dtype=np.int32).reshape(2, 3), np.ones((10, 10), dtype=np.int32))  # 20 x 30
    out = centre_crop_label(label, 40)  # -> 40 x 60 (nearest), then columns 10..49
    assert out.shape == (40, 40) and set(np.unique(out)) <= set(range(6))
    assert (out[:, :10] == np.repeat(label[:, 5:10], 2, 0).repeat(2, 1)[:, :10]).all()
    image = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    assert centre_crop_image(image, 40).shape == (40, 40, 3)


def test_real_pairs_match_the_authors_transforms(sample_data):
    """torchvision's Resize + CenterCrop on the PIL files, as CLIPtrase's evaluation opens them."""
    from torchvision import transforms as T

    def authors(image, mode):
        return np.asarray(T.CenterCrop(336)(T.Resize(336, interpolation=mode)(image)))

    for sample in list_samples(get_dataset("voc21"), sample_data)[:3]:
        with Image.open(sample.image) as img:
            rgb = img.convert("RGB")
        assert (centre_crop_image(np.asarray(rgb), 336) == authors(rgb, T.InterpolationMode.BICUBIC)).all()
        with Image.open(sample.label) as gt:  # a palettized PNG, resized as such
            expected = authors(gt, T.InterpolationMode.NEAREST).astype(np.int32)
        assert (centre_crop_label(read_label(sample.label), 336) == expected).all()


def test_dataset_cuts_image_and_label_alike(tmp_path):
    write_layout(tmp_path, "voc", n=2, size=(30, 40), seed=5)
    spec = get_dataset("voc21")
    samples = list_samples(spec, tmp_path)
    prep = Preprocessor(short_side=0)
    item = BenchmarkDataset(spec, samples, prep, [1], centre_crop=24)[0]
    assert item.error is None and item.label.shape == (24, 24) and item.prepared.size == (24, 24)
    with Image.open(samples[1].image) as img:
        square = centre_crop_image(np.asarray(img.convert("RGB")), 24)
    assert (item.prepared.image == prep.transform(square)).all()
    assert (item.label == centre_crop_label(read_label(samples[1].label, spec), 24)).all()
    plain = BenchmarkDataset(spec, samples, prep, [1])[0]
    assert plain.label.shape == (31, 42) == plain.prepared.size


def test_preset_sets_the_authors_protocol():
    preset = resolve_preset("cliptrase", "voc20")
    assert preset.protocol == "cliptrase" and preset.scoring == {"centre_crop": 336}
    assert preset.settings["crop"] == 0 and preset.settings["short_side"] == 0 and "centre_crop" not in preset.settings
    assert preset.method_options == {"dbscan_eps": 1.1, "dbscan_min_samples": 7, "cls_multiply": True}
    assert resolve_preset("cliptrase", "ade20k").method_options == {"dbscan_eps": 1.1, "dbscan_min_samples": 7}
    assert preset.describe()["centre_crop"] == 336
    smaller = resolve_preset("cliptrase", "voc21", {"centre_crop": 224})
    assert smaller.scoring == {"centre_crop": 224} and smaller.overridden == ["centre_crop"]
    assert resolve_preset("sclip", "voc21").scoring == {"centre_crop": 0}
    assert "centre_crop" not in resolve_preset("sclip", "voc21").describe()
    assert resolve_preset("gclip", "voc20", {"centre_crop": 448}).scoring == {"centre_crop": 448}  # any method
    for bad in (-1, 2.5, True):
        with pytest.raises(ConfigError, match="centre_crop must be a whole number"):
            resolve_preset("cliptrase", "voc20", {"centre_crop": bad})


def test_eval_scores_the_centre_square(tiny_checkpoint, tiny_model, tmp_path, capsys):
    """``gclip eval --method cliptrase`` under its preset: predictions are the squares' labels, as segmenting the
    cut image does, and the JSON records the crop."""
    write_layout(tmp_path / "data", "voc", n=2, size=(30, 40), seed=6)
    templates = tmp_path / "one.txt"
    templates.write_text("a photo of a {c}.\n")
    out, save = tmp_path / "r.json", tmp_path / "pred"
    args = ["eval", "--data-root", str(tmp_path / "data"), "--model", "gclip-tiny-test", "--pretrained"]
    args += [str(tiny_checkpoint), "--device", "cpu", "--templates", str(templates), "--workers", "0", "--quiet"]
    args += ["--dataset", "voc20", "--method", "cliptrase", "--centre-crop", "32", "--out", str(out)]
    assert main(args + ["--save-predictions", str(save)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["settings"]["centre_crop"] == 32 and run["settings"]["overridden"] == ["centre_crop"]
    assert run["settings"]["method_options"]["cls_multiply"] is True
    assert sum(c["label"] for c in run["per_class"]) <= 2 * 32 * 32
    preset = resolve_preset("cliptrase", "voc20", {"centre_crop": 32})
    options = preset.method_options
    seg = Segmenter(tiny_model, method="cliptrase", method_options=options, templates=str(templates), **preset.settings)
    seg.set_classes(read_class_file(preset.classes_file, allow_duplicates=True))
    for sample in list_samples(get_dataset("voc20"), tmp_path / "data"):
        with Image.open(sample.image) as img:
            square = centre_crop_image(np.asarray(img.convert("RGB")), 32)
        saved = read_label_png(save / "cliptrase" / "voc20" / f"{sample.name}.png")
        assert saved.shape == (32, 32) and (saved == seg.predict(square).labels + 1).all()
    capsys.readouterr()
    assert main(args[:-4] + ["--centre-crop", "-3"]) == 2
    assert "centre_crop must be a whole number" in capsys.readouterr().err

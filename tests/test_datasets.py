"""The eight benchmark layouts (synthetic fixtures written here), the real sample, presets, COCO-Object labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gclip.evaluation import (
    DATASETS,
    BenchmarkDataset,
    DatasetError,
    DatasetMissing,
    build_coco_object,
    get_dataset,
    image_areas,
    list_protocols,
    list_samples,
    read_label,
    resolve_preset,
    stuff_to_object,
    summarize,
)
from gclip.inference.preprocess import Preprocessor
from gclip.io.outputs import palette
from gclip.methods import get_method, list_methods
from gclip.text import read_class_file

# Where each layout puts an image and its label (from the mmsegmentation layouts, written out by hand so
# that the tests do not derive the paths from the code under test), the split file, and the raw label values.
LAYOUTS = {
    "voc": dict(
        image="VOCdevkit/VOC2012/JPEGImages/2007_00{i:04d}.jpg",
        label="VOCdevkit/VOC2012/SegmentationClass/2007_00{i:04d}.png",
        split=("VOCdevkit/VOC2012/ImageSets/Segmentation/val.txt", "2007_00{i:04d}"),
        values=21,
        palettized=True,
    ),
    "context": dict(
        image="VOCdevkit/VOC2010/JPEGImages/2008_00{i:04d}.jpg",
        label="VOCdevkit/VOC2010/SegmentationClassContext/2008_00{i:04d}.png",
        split=("VOCdevkit/VOC2010/ImageSets/SegmentationContext/val.txt", "2008_00{i:04d}"),
        values=60,
        palettized=False,
    ),
    "coco_stuff": dict(
        image="coco_stuff164k/images/val2017/0000000{i:05d}.jpg",
        label="coco_stuff164k/annotations/val2017/0000000{i:05d}_labelTrainIds.png",
        values=171,
        palettized=False,
    ),
    "coco_object": dict(
        image="coco_stuff164k/images/val2017/0000000{i:05d}.jpg",
        label="coco_stuff164k/annotations/val2017/0000000{i:05d}_instanceTrainIds.png",
        values=81,
        palettized=False,
    ),
    "cityscapes": dict(
        image="cityscapes/leftImg8bit/val/{city}/{city}_000000_0{i:05d}_leftImg8bit.png",
        label="cityscapes/gtFine/val/{city}/{city}_000000_0{i:05d}_gtFine_labelTrainIds.png",
        values=19,
        palettized=False,
    ),
    "ade": dict(
        image="ade/ADEChallengeData2016/images/validation/ADE_val_0000{i:04d}.jpg",
        label="ade/ADEChallengeData2016/annotations/validation/ADE_val_0000{i:04d}.png",
        values=151,
        palettized=False,
    ),
}
LAYOUT_OF = {
    "voc21": "voc",
    "voc20": "voc",
    "context60": "context",
    "context59": "context",
    "coco_stuff": "coco_stuff",
    "coco_object": "coco_object",
    "cityscapes": "cityscapes",
    "ade20k": "ade",
}
CITIES = ["frankfurt", "lindau"]


def write_layout(root: Path, layout: str, n: int = 3, size: tuple[int, int] = (24, 32), seed: int = 0) -> list:
    """Write ``n`` random image/label pairs in ``layout`` under ``root``; returns the raw label arrays."""
    spec = LAYOUTS[layout]
    rng = np.random.default_rng(seed)
    labels, ids = [], []
    for i in range(n):
        fields = dict(i=i + 1, city=CITIES[i % 2])
        image_path, label_path = root / spec["image"].format(**fields), root / spec["label"].format(**fields)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        h, w = size[0] + i, size[1] + 2 * i  # differing sizes
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path)
        label = rng.integers(0, spec["values"], (h, w)).astype(np.uint8)
        label[0, :3] = 255
        if spec["palettized"]:
            img = Image.fromarray(label, mode="P")
            img.putpalette(palette(256).flatten().tolist())
        else:
            img = Image.fromarray(label, mode="L")
        img.save(label_path)
        labels.append(label.astype(np.int32))
        if "split" in spec:
            ids.append(spec["split"][1].format(**fields))
    if "split" in spec:
        split = root / spec["split"][0]
        split.parent.mkdir(parents=True, exist_ok=True)
        split.write_text("\n".join(ids) + "\n")
    return labels


@pytest.mark.parametrize("name", list(LAYOUT_OF))  # the other families: tests/test_more_datasets.py
def test_synthetic_layout_loads(tmp_path, name):
    spec = get_dataset(name)
    raw = write_layout(tmp_path, LAYOUT_OF[name])
    samples = list_samples(spec, tmp_path)
    assert len(samples) == len(raw)
    by_size = {r.shape: r for r in raw}
    for sample in samples:
        assert sample.image.is_file() and sample.label.is_file()
        label = read_label(sample.label, spec)
        expected = by_size[label.shape]
        if spec.reduce_zero_label:
            assert (label[expected == 0] == 255).all() and (label[expected == 255] == 255).all()
            keep = (expected != 0) & (expected != 255)
            assert (label[keep] == expected[keep] - 1).all()
        else:
            assert (label == expected).all()
        valid = label[label != 255]
        assert valid.min() >= 0 and valid.max() < spec.num_classes
        with Image.open(sample.image) as img:
            assert img.size[::-1] == label.shape


def test_cityscapes_recurses_into_cities(tmp_path):
    write_layout(tmp_path, "cityscapes", n=4)
    names = [s.name for s in list_samples(get_dataset("cityscapes"), tmp_path)]
    assert names == sorted(names) and {n.split("/")[0] for n in names} == set(CITIES)


def test_palettized_labels_keep_indices(tmp_path):
    label = np.array([[0, 15, 255], [1, 2, 20]], dtype=np.uint8)
    img = Image.fromarray(label, mode="P")
    img.putpalette(palette(256).flatten().tolist())
    img.save(tmp_path / "x.png")
    assert read_label(tmp_path / "x.png").tolist() == label.tolist()


def test_split_order_is_kept(tmp_path):
    write_layout(tmp_path, "voc", n=3)
    split = tmp_path / LAYOUTS["voc"]["split"][0]
    split.write_text("2007_000003\n2007_000001\n")
    assert [s.name for s in list_samples(get_dataset("voc21"), tmp_path)] == ["2007_000003", "2007_000001"]


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(DatasetMissing, match="VOCdevkit/VOC2012/JPEGImages"):
        list_samples(get_dataset("voc20"), tmp_path)


def test_coco_object_without_labels_says_how_to_build(tmp_path):
    write_layout(tmp_path, "coco_stuff")
    with pytest.raises(DatasetMissing, match="gclip data coco-object"):
        list_samples(get_dataset("coco_object"), tmp_path)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("delete", "does not exist"),
        ("garbage", "cannot be read"),
        ("rgb", "image mode RGB"),
        ("resize", "is 5x4 but its image"),
    ],
)
def test_bad_labels_are_reported_with_the_file(tmp_path, damage, message):
    write_layout(tmp_path, "ade", n=2)
    spec = get_dataset("ade20k")
    samples = list_samples(spec, tmp_path)
    bad = samples[1].label
    if damage == "delete":
        bad.unlink()
    elif damage == "garbage":
        bad.write_bytes(b"not a png")
    elif damage == "rgb":
        Image.new("RGB", (4, 4)).save(bad)
    else:
        Image.new("L", (5, 4)).save(bad)
    dataset = BenchmarkDataset(spec, samples, Preprocessor(32, 2048), [0, 1])
    assert dataset[0].error is None and dataset[0].label is not None
    item = dataset[1]
    assert item.prepared is None and message in item.error and str(bad) in item.error


def test_preparer_equals_segmenter_prepare(tiny_model, rgb_image):
    from gclip import Segmenter

    seg = Segmenter(tiny_model, method="clip", short_side=40, max_long_side=60)
    a, b = seg.prepare(rgb_image, key="k"), seg.preprocessor(rgb_image, key="k")
    assert a.size == b.size and a.key == b.key
    assert a.image.shape == b.image.shape and (a.image == b.image).all()


# ----- presets -------------------------------------------------------------------------------------------


def test_presets_carry_per_dataset_method_options():
    voc = resolve_preset("resclip", "voc21")
    assert voc.method_options == {"temp_thd": 0.5, "rcs_weights": [2.0, 0.3], "sfr_weights": [2.2, 0.7]}
    assert (voc.settings["crop"], voc.settings["prob_thd"]) == (2048, 0.1)
    assert resolve_preset("resclip", "ade20k").method_options["temp_thd"] == 0.25
    assert resolve_preset("itaclip", "cityscapes").method_options["img_eng_coefficient"] == 0.7
    assert resolve_preset("scclip", "coco_object").settings["logit_scale"] == 55.0
    assert resolve_preset("sfp", "ade20k").settings["short_side"] == 384
    get_method("resclip", **voc.method_options)  # the preset's options are the method's


PROTOCOL_OF = {"sclip": "sclip", "naclip": "sclip", "gclip": "clearclip", "gem": "clearclip", "dihclip": "scclip"}


@pytest.mark.parametrize("method", list_methods())
@pytest.mark.parametrize("name", list(LAYOUT_OF))  # the other families: tests/test_more_datasets.py
def test_every_preset_resolves_with_matching_classes(method, name):
    """Every registered method has a protocol (``gclip eval --method all`` needs one for each)."""
    preset = resolve_preset(method, name)
    assert len(read_class_file(preset.classes_file, allow_duplicates=True)) == get_dataset(name).num_classes
    assert preset.protocol == PROTOCOL_OF.get(method, method if method in list_protocols() else "clearclip")


@pytest.mark.parametrize(
    "method, dataset, expected",
    [
        ("gclip", "voc20", dict(short_side=448, crop=448, stride=224, logit_scale=50.0, prob_thd=0.0)),
        ("clearclip", "voc21", dict(prob_thd=0.5, padding="symmetric")),
        ("maskclip", "context60", dict(prob_thd=0.15)),
        ("clip", "coco_object", dict(prob_thd=0.4)),
        ("gclip", "cityscapes", dict(crop=224, stride=224)),
        ("sclip", "voc21", dict(short_side=336, crop=224, stride=112, logit_scale=65.0, prob_thd=0.1, area_thd=0.1)),
        ("sclip", "coco_stuff", dict(short_side=448, padding="none", logit_scale=40.0)),
        ("sclip", "cityscapes", dict(short_side=560)),
        ("sclip", "context60", dict(logit_scale=50.0, prob_thd=0.1)),
        ("naclip", "voc21", dict(crop=0, logit_scale=40.0, prob_thd=0.1, area_thd=0.0, pamr_steps=10)),
        ("naclip", "voc20", dict(crop=0, pamr_dilations=(8, 16))),
        ("naclip", "coco_stuff", dict(short_side=336, crop=224)),
        ("naclip", "coco_object", dict(logit_scale=40.0, prob_thd=0.1)),
        ("dihclip", "voc21", dict(short_side=336, crop=224, stride=112, logit_scale=50.0, prob_thd=0.15, area_thd=0.1)),
        ("dihclip", "coco_object", dict(logit_scale=55.0, prob_thd=0.35)),
        ("dihclip", "cityscapes", dict(short_side=560)),
    ],
)
def test_preset_values(method, dataset, expected):
    settings = resolve_preset(method, dataset).settings
    assert {k: settings[k] for k in expected} == expected


@pytest.mark.parametrize("protocol", ["cliptrase", "resclip", "itaclip"])
def test_another_methods_protocol_keeps_its_settings_not_its_methods_options(protocol):
    own = resolve_preset(protocol, "voc20")
    assert own.method_options  # the protocol's own method has knobs in it
    borrowed = resolve_preset("gclip", "voc20", protocol=protocol)
    assert borrowed.settings == own.settings and borrowed.method_options == {}
    get_method("gclip", **borrowed.method_options)  # what eval builds


def test_class_files_from_a_folder_of_either_name(tmp_path):
    from gclip.errors import ConfigError

    (tmp_path / "cls_voc21.txt").write_text("a\n")
    (tmp_path / "cls_cityscapes.txt").write_text("b\n")  # ITACLIP's name for SCLIP's cls_city_scapes.txt
    assert resolve_preset("sfp", "voc21", classes_dir=tmp_path).classes_file == tmp_path / "cls_voc21.txt"
    preset = resolve_preset("itaclip", "cityscapes", classes_dir=tmp_path)
    assert preset.classes_file == tmp_path / "cls_cityscapes.txt"
    assert preset.describe()["classes_file"] == str(tmp_path / "cls_cityscapes.txt")
    (tmp_path / "cls_city_scapes.txt").write_text("c\n")
    assert resolve_preset("itaclip", "cityscapes", classes_dir=tmp_path).classes_file.name == "cls_city_scapes.txt"
    with pytest.raises(ConfigError, match=f"classes folder {tmp_path}: no cls_ade20k.txt for ade20k"):
        resolve_preset("sfp", "ade20k", classes_dir=tmp_path)
    with pytest.raises(ConfigError, match="no cls_coco_stuff.txt for coco_stuff"):
        resolve_preset("sfp", "coco_stuff", classes_dir=tmp_path)


def test_overrides_win_and_are_recorded():
    preset = resolve_preset("naclip", "voc20", {"pamr_steps": 0, "crop": 0})
    assert preset.settings["pamr_steps"] == 0 and preset.overridden == ["pamr_steps"]
    assert preset.describe()["classes_file"] == "sclip/cls_voc20.txt"


def test_unknown_setting_or_method_is_a_config_error():
    from gclip.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown setting"):
        resolve_preset("gclip", "voc20", {"crop_size": 3})
    with pytest.raises(ConfigError, match="unknown method .nosuch.: choose one of"):
        resolve_preset("nosuch", "voc20")


# ----- COCO-Object ---------------------------------------------------------------------------------------


def test_coco_object_mapping_matches_the_class_files():
    root = Path(resolve_preset("gclip", "coco_stuff").classes_file).parent
    stuff = read_class_file(root / "cls_coco_stuff.txt").names
    objects = read_class_file(root / "cls_coco_object.txt").names
    ids = np.arange(171)
    mapped = stuff_to_object(ids)
    for train_id, name in enumerate(stuff):
        target = objects[mapped[train_id]]
        if mapped[train_id] == 0:
            assert train_id >= 80 and target == "background"
        else:
            assert target.replace(" ", "") == name.replace(" ", "")
    assert stuff_to_object(np.array([255])).tolist() == [255]
    with pytest.raises(ValueError):
        stuff_to_object(np.array([171]))


def test_build_coco_object_writes_atomically_and_loads(tmp_path):
    raw = write_layout(tmp_path, "coco_stuff", n=2)
    written, kept = build_coco_object(tmp_path)
    assert (written, kept) == (2, 0)
    assert build_coco_object(tmp_path) == (0, 2)
    folder = tmp_path / "coco_stuff164k/annotations/val2017"
    assert not list(folder.glob(".*tmp"))
    samples = list_samples(get_dataset("coco_object"), tmp_path)
    by_size = {r.shape: r for r in raw}
    for sample in samples:
        label = read_label(sample.label)
        assert (label == stuff_to_object(by_size[label.shape])).all()


def test_build_coco_object_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="coco_stuff164k"):
        build_coco_object(tmp_path)


# ----- the real sample -----------------------------------------------------------------------------------


def test_real_voc_palettized(sample_data):
    samples = list_samples(get_dataset("voc21"), sample_data)
    assert len(samples) == 102
    seen = set()
    for sample in samples[:10]:
        with Image.open(sample.label) as img:
            assert img.mode == "P"
        label = read_label(sample.label)
        seen |= set(np.unique(label).tolist())
    assert seen <= set(range(21)) | {255} and 255 in seen and len(seen - {0, 255}) > 0
    reduced = read_label(samples[0].label, get_dataset("voc20"))
    assert reduced.max() == 255 and reduced[reduced != 255].max() < 20


def test_real_ade_reduce_zero_label(sample_data):
    spec = get_dataset("ade20k")
    samples = list_samples(spec, sample_data)
    assert len(samples) == 22
    for sample in samples[:5]:
        raw, reduced = read_label(sample.label), read_label(sample.label, spec)
        assert raw.max() <= 150
        assert ((raw == 0) == (reduced == 255)).all()
        assert (reduced[raw > 0] == raw[raw > 0] - 1).all()


def test_real_coco_stuff_values(sample_data):
    samples = list_samples(get_dataset("coco_stuff"), sample_data)
    assert len(samples) == 28
    values = set()
    for sample in samples[:8]:
        values |= set(np.unique(read_label(sample.label)).tolist())
    assert values <= set(range(171)) | {255}
    assert any(v < 80 for v in values) and any(80 <= v <= 170 for v in values)


@pytest.mark.parametrize("name", ["voc21", "voc20", "ade20k", "coco_stuff"])
def test_oracle_on_real_sample_is_100(sample_data, name):
    spec = get_dataset(name)
    from gclip.evaluation import Areas

    total = Areas.zeros(spec.num_classes)
    for sample in list_samples(spec, sample_data):
        label = read_label(sample.label, spec)
        with Image.open(sample.image) as img:
            assert img.size[::-1] == label.shape, sample.name
        oracle = np.where(label == 255, 0, label)  # the prediction has a class everywhere
        total += image_areas(oracle, label, spec.num_classes)
    s = summarize(total)
    assert s["mIoU"] == 100.00 and s["aAcc"] == 100.00
    assert (total.label > 0).sum() > 5


@pytest.mark.parametrize(
    "name", sorted(n for n in DATASETS if DATASETS[n].family not in ("large", "mess"))
)  # 847/459 and MESS's: not shipped
def test_dataset_class_names_are_the_datasets_own(name):
    """Tables print the datasets' names (mmsegmentation's METAINFO), not the protocols' prompts (``ship``)."""
    from gclip.evaluation.layouts import class_names

    names = class_names(get_dataset(name))
    assert len(names) == get_dataset(name).num_classes and len(set(names)) == len(names)
    glued = {"chestofdrawers", "trafficlight", "hotdog", "swimmingpool", "cellphone", "trafficsign"}
    assert not glued & set(names)
    if name.startswith("voc"):
        assert "ship" not in names and "table" not in names
    expected = {
        "voc21": {4: "boat", 11: "diningtable"},
        "voc20": {3: "boat", 10: "diningtable"},
        "ade20k": {44: "chest of drawers", 136: "traffic light", 15: "table"},
        "coco_stuff": {9: "traffic light", 60: "dining table"},
        "cityscapes": {6: "traffic light", 7: "traffic sign"},
        "context60": {0: "background", 8: "boat"},
    }.get(name, {})
    assert {i: names[i] for i in expected} == expected

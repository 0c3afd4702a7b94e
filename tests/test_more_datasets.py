"""The sets beyond the eight: ADE20K-847 and PASCAL Context-459 (CAT-Seg's 16-bit TIFF layouts) and SegEarth-OV's
17 remote-sensing sets, each in a tiny layout written here; their presets, class routes, checks and an eval run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import plant_fault
from gclip.cli import main
from gclip.errors import ConfigError
from gclip.evaluation import DATASETS, get_dataset, list_samples, read_label, resolve_preset
from gclip.evaluation.check import check_dataset
from gclip.evaluation.layouts import FAMILIES, class_names
from gclip.io.outputs import palette, read_label_png
from gclip.methods import list_methods
from gclip.text import read_class_file
from test_eval import FAST, tiny_args

_ROADS = "GlobalRoadSet_Val/{}_test_{}/{}/{{i}}.{}"
_WBS = "water-body-segmentation-in-satellite-images/WaterBodiesDatasetPreprocessed/WaterBodiesDatasetPreprocessed"
_SAT2 = "WHU_Sat_II/Satellite_dataset_\u2161_East_Asia/1.cropped/test"

# Where each preparation script puts an image and its label (CAT-Seg's prepare_*.py, SegEarth-OV's configs and
# tools/dataset_converters), written out by hand so that the tests do not derive the paths from the code under
# test; the raw label values (0..values-1), the value written at unlabeled pixels, and how labels are stored.
NEW_LAYOUTS = {
    "ade847": dict(
        image="ADE20K_2021_17_01/images_detectron2/validation/ADE_val_{i:08d}.jpg",
        label="ADE20K_2021_17_01/annotations_detectron2/validation/ADE_val_{i:08d}.tif",
        values=847, ignore=65535, kind="tif16",
    ),
    "context459": dict(
        image="VOCdevkit/VOC2010/JPEGImages/2008_{i:06d}.jpg",
        label="VOCdevkit/VOC2010/annotations_detectron2/pc459_val/2008_{i:06d}.tif",
        split=("VOCdevkit/VOC2010/pascalcontext_val.txt", "2008_{i:06d}"),
        values=459, ignore=459, kind="tif16",
    ),
    "openearthmap": dict(image="OpenEarthMap/img_dir/val/aachen_{i}.tif",
                         label="OpenEarthMap/ann_dir/val/aachen_{i}.tif", values=9, kind="L"),
    "loveda": dict(image="LoveDA/img_dir/val/{i}.png", label="LoveDA/ann_dir/val/{i}.png", values=8, kind="L"),
    "isaid": dict(image="iSAID/img_dir/val/P{i:04d}_0_896_0_896.png",
                  label="iSAID/ann_dir/val/P{i:04d}_0_896_0_896_instance_color_RGB.png", values=16, kind="P"),
    "potsdam": dict(image="potsdam/img_dir/val/2_13_{i}_0_512_512.png",
                    label="potsdam/ann_dir/val/2_13_{i}_0_512_512.png", values=7, kind="L"),
    "vaihingen": dict(image="vaihingen/img_dir/val/area2_{i}_0_512_512.png",
                      label="vaihingen/ann_dir/val/area2_{i}_0_512_512.png", values=7, kind="L"),
    "uavid": dict(image="UAVid/img_dir/test/seq{i}_000000_0_1080_0_1280.png",
                  label="UAVid/ann_dir/test/seq{i}_000000_0_1080_0_1280.png", values=7, kind="P"),
    "udd5": dict(image="UDD/UDD/UDD5/val/src/DJI_{i:04d}.JPG", label="UDD/UDD/UDD5/val/gt/DJI_{i:04d}.png",
                 values=5, kind="L"),
    "vdd": dict(image="VDD/test/src/DJI_{i:04d}.JPG", label="VDD/test/gt/DJI_{i:04d}.png", values=7, kind="L"),
    "whu_aerial": dict(image="WHU-BD/val/image/{i}.png", label="WHU-BD/val/label_cvt/{i}.png", values=2, kind="L"),
    "whu_sat2": dict(image=_SAT2 + "/image/{i}.tif", label=_SAT2 + "/label_cvt/{i}.tif", values=2, kind="L"),
    "inria": dict(image="Inria/AerialImageDataset/train/img_dir/split_test/austin1_{i}_0_1000_1000.png",
                  label="Inria/AerialImageDataset/train/ann_dir/split_test/austin1_{i}_0_1000_1000.png",
                  values=2, kind="L"),
    "xbd": dict(image="xBD/test/images_pre/palu-tsunami_{i:08d}_pre_disaster.png",
                label="xBD/test/targets_cvt_pre/palu-tsunami_{i:08d}_pre_disaster.png", values=2, kind="L"),
    "chn6_cug": dict(image="CHN6-CUG/val/image_cvt/am{i}.jpg", label="CHN6-CUG/val/label_cvt/am{i}.png",
                     values=2, kind="L"),
    "deepglobe": dict(image=_ROADS.format("DeepGlobe", 1530, "image_cvt", "jpg"),
                      label=_ROADS.format("DeepGlobe", 1530, "label_cvt", "png"), values=2, kind="L"),
    "massachusetts": dict(image=_ROADS.format("Massachusetts", 49, "img", "jpg"),
                          label=_ROADS.format("Massachusetts", 49, "label_cvt", "png"), values=2, kind="L"),
    "spacenet": dict(image=_ROADS.format("SpaceNet", 567, "img", "jpg"),
                     label=_ROADS.format("SpaceNet", 567, "label_cvt", "png"), values=2, kind="L"),
    "wbs_si": dict(image=_WBS + "/Images/water_body_{i}.jpg", label=_WBS + "/Masks_cvt/water_body_{i}.jpg",
                   split=(_WBS + "/wbs-si_val.txt", "water_body_{i}"), values=2, kind="jpeg"),
}  # fmt: skip
NEW_SETS = [name for name in DATASETS if get_dataset(name).family in ("large", "remote")]  # MESS: test_mess.py
# the background class SegEarth-OV's bg_idx names, in the set's own class order (after reduce_zero_label)
BACKGROUND = {"potsdam": 5, "vaihingen": 5, "udd5": 4}
# the sets whose label 0 is not a class (reduce_zero_label: 0 -> ignored, v -> v - 1)
REDUCED = {"loveda", "potsdam", "vaihingen"}


def write_new_layout(root: Path, name: str, n: int = 3, size: tuple[int, int] = (24, 32), seed: int = 0) -> list:
    """Write ``n`` random pairs of set ``name`` under ``root``; returns the raw label arrays as read back."""
    spec = NEW_LAYOUTS[name]
    rng = np.random.default_rng(seed)
    labels, ids = [], []
    for i in range(n):
        image_path, label_path = root / spec["image"].format(i=i + 1), root / spec["label"].format(i=i + 1)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        h, w = size[0] + i, size[1] + 2 * i
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(image_path, format=_format(image_path))
        if spec["kind"] == "jpeg":  # blocks, so that the lossy file keeps its values
            blocks = rng.integers(0, spec["values"], (h // 8 + 1, w // 8 + 1)).astype(np.uint8)
            label = np.kron(blocks, np.ones((8, 8), np.uint8))[:h, :w]
        else:
            label = rng.integers(0, spec["values"], (h, w))
            if spec["values"] > 2:  # the binary sets' converters write 0 and 1 only
                label[0, :3] = spec.get("ignore", 255)
        if spec["kind"] == "tif16":
            Image.fromarray(label.astype(np.uint16)).save(label_path, format="TIFF")
        elif spec["kind"] == "P":
            img = Image.fromarray(label.astype(np.uint8), mode="P")
            img.putpalette(palette(256).flatten().tolist())
            img.save(label_path)
        elif spec["kind"] == "jpeg":
            Image.fromarray(label, mode="L").save(label_path, format="JPEG", quality=95)
        else:
            Image.fromarray(label.astype(np.uint8), mode="L").save(label_path, format=_format(label_path))
        with Image.open(label_path) as img:
            labels.append(np.asarray(img).astype(np.int32))
        if "split" in spec:
            ids.append(spec["split"][1].format(i=i + 1))
    if "split" in spec:
        (root / spec["split"][0]).write_text("\n".join(ids) + "\n")
    return labels


def _format(path: Path) -> str:
    return {".jpg": "JPEG", ".png": "PNG", ".tif": "TIFF"}[path.suffix.lower()]


def test_every_new_set_has_a_tiny_layout_here():
    assert sorted(NEW_LAYOUTS) == sorted(NEW_SETS) and FAMILIES["large"] == ["ade847", "context459"]
    assert len(FAMILIES["remote"]) == 17


@pytest.mark.parametrize("name", NEW_SETS)
def test_layout_loads_with_its_values(tmp_path, name):
    spec = get_dataset(name)
    raw = write_new_layout(tmp_path, name)
    samples = list_samples(spec, tmp_path)
    assert len(samples) == len(raw)
    ignore = NEW_LAYOUTS[name].get("ignore", 255)
    assert spec.ignore_index == ignore
    for sample, expected in zip(samples, raw):  # file names sort as they were written
        label = read_label(sample.label, spec)
        assert label.shape == expected.shape
        if name in REDUCED:
            expected = np.where((expected == 0) | (expected == 255), 255, expected - 1)
        if name in BACKGROUND:  # scored with the background first: bg -> 0, the classes before it one up
            bg = BACKGROUND[name]
            moved = np.where(expected == bg, 0, np.where(expected < bg, expected + 1, expected))
            expected = np.where(expected == 255, 255, moved)
        assert (label == expected).all()
        valid = label[label != ignore]
        assert valid.min() >= 0 and valid.max() < spec.num_classes
    result = check_dataset(spec, tmp_path)
    assert not result.broken and not result.modes, result.verdict()
    assert result.verdict().startswith(f"{name}: OK")


def test_sixteen_bit_labels_read_with_pil(tmp_path):
    """CAT-Seg's labels are 16-bit TIFFs: values above 255 and the ignore value 65535 come back exactly."""
    path = tmp_path / "l.tif"
    values = np.array([[0, 300, 846], [65535, 255, 512]], dtype=np.uint16)
    Image.fromarray(values).save(path, format="TIFF")
    assert (read_label(path, get_dataset("ade847")) == values).all()


@pytest.mark.parametrize(
    "name, fault, expected",
    [
        ("ade847", "missing", "1 labels missing or unreadable (ADE_val_00000002: missing)"),
        ("context459", "value", "label values outside 0..458 and 459: 600 (4 px)"),
        ("potsdam", "size", "1 labels not the size of their image (2_13_2_0_512_512: image 34x25, label 39x25)"),
        ("isaid", "value", "label values outside 0..15 and 255: 40 (4 px)"),
        ("loveda", "grayscale", "1 images not RGB (2: L)"),
        ("whu_aerial", "value", "label values outside 0..1 (labels left at 0/255?): 2 (4 px)"),
        ("spacenet", "unconverted", "label values outside 0..1 (labels left at 0/255?): 255 ("),
        ("udd5", "grayscale", "1 images not RGB (DJI_0002: L)"),
        ("wbs_si", "count", "3 images where the full validation split has 499"),
        ("isaid", "count", "3 images where the full validation split has 11,644"),
        ("ade847", "count", "3 images where the full validation split has 2,000"),
    ],
)
def test_check_finds_each_fault_on_the_new_sets(tmp_path, name, fault, expected):
    write_new_layout(tmp_path, name)
    spec = get_dataset(name)
    bad = {"context459": 600, "isaid": 40, "whu_aerial": 2}.get(name, 12)
    plant_fault(list_samples(spec, tmp_path)[1], fault, bad)
    result = check_dataset(spec, tmp_path)
    line = result.verdict()
    assert expected in line and "\n" not in line
    assert result.broken == (fault in ("missing", "size", "value", "unconverted"))
    assert line.startswith(f"{name}: {'BROKEN' if result.broken else 'OK with notices'} (3 images checked)")


@pytest.mark.parametrize("name", NEW_SETS)
def test_presets_of_the_new_sets(name):
    """ClearCLIP's protocol on ADE20K-847 / Context-459, SegEarth-OV's on the remote-sensing sets, for every method
    (no method's preset has a table for them); the shipped class files are the datasets' own names."""
    spec = get_dataset(name)
    for method in list_methods():
        if spec.family == "large":
            with pytest.raises(ConfigError, match=f"gclip ships no class names for {name}: pass --classes-dir"):
                resolve_preset(method, name)
            continue
        preset = resolve_preset(method, name)
        assert preset.protocol == "segearth"
        assert len(read_class_file(preset.classes_file)) == spec.num_classes == len(class_names(spec))
        assert preset.settings["crop"] == 224 and preset.settings["stride"] == 112
        assert (preset.settings["short_side"], preset.settings["max_long_side"]) == (448, 448)
    if spec.family == "large":
        assert class_names(spec) == []


@pytest.mark.parametrize(
    "name, prob_thd", [("openearthmap", 0.1), ("loveda", 0.3), ("isaid", 0.4), ("udd5", 0.4), ("whu_sat2", 0.7),
                       ("xbd", 0.0), ("chn6_cug", 0.8), ("wbs_si", 0.6), ("potsdam", 0.1)],
)  # fmt: skip
def test_segearth_thresholds(name, prob_thd):
    assert resolve_preset("clearclip", name).settings["prob_thd"] == prob_thd


def test_large_sets_take_catseg_json_or_a_text_file(tmp_path):
    catseg = tmp_path / "datasets"
    catseg.mkdir()
    (catseg / "ade847.json").write_text(json.dumps(["wall", "building, edifice"] + [f"c{i}" for i in range(845)]))
    preset = resolve_preset("sclip", "ade847", classes_dir=catseg)
    assert preset.protocol == "clearclip" and preset.classes_file == catseg / "ade847.json"
    classes = read_class_file(preset.classes_file)
    assert len(classes) == 847 and classes.synonyms[1] == ("building", "edifice")
    (catseg / "cls_context459.txt").write_text("".join(f"c{i}\n" for i in range(459)))
    assert resolve_preset("gclip", "context459", classes_dir=catseg).classes_file.name == "cls_context459.txt"
    with pytest.raises(ConfigError, match="no cls_ade20k.txt for ade20k"):
        resolve_preset("gclip", "ade20k", classes_dir=catseg)
    (catseg / "bad.json").write_text('{"a": 1}')
    with pytest.raises(Exception, match="expected a JSON list"):
        read_class_file(catseg / "bad.json")


def test_family_names_expand(tmp_path):
    from gclip.evaluation import expand_datasets

    assert [s.name for s in expand_datasets("large")] == ["ade847", "context459"]
    assert [s.name for s in expand_datasets("voc21,remote,loveda")][:3] == ["voc21", "openearthmap", "loveda"]
    assert len(expand_datasets("all,remote")) == 8 + 17


def run(checkpoint, root, *extra) -> int:
    return main(tiny_args(checkpoint, root) + FAST + list(extra))


def test_eval_on_context459_with_catseg_classes(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """A large-vocabulary set end to end: the class names from a CAT-Seg clone's JSON, 16-bit labels, the split
    file, ignore value 459, and predictions saved as 16-bit PNGs (more than 255 classes)."""
    monkeypatch.setenv("GCLIP_NO_CACHE", "1")  # 459 names: writing each embedding to the disk cache is the cost
    raw = write_new_layout(tmp_path, "context459", n=2)
    classes = tmp_path / "catseg"
    classes.mkdir()
    (classes / "pc459.json").write_text(json.dumps([f"thing {i}" for i in range(459)]))
    out, save = tmp_path / "r.json", tmp_path / "pred"
    extra = ["--dataset", "context459", "--method", "clip", "--out", str(out), "--save-predictions", str(save)]
    assert run(tiny_checkpoint, tmp_path, *extra) == 2  # no class names shipped: the one-line route
    assert "pass --classes-dir <CAT-Seg clone>/datasets (its pc459.json" in capsys.readouterr().err
    assert run(tiny_checkpoint, tmp_path, *extra, "--classes-dir", str(classes)) == 0
    record = json.loads(out.read_text())["runs"][0]
    assert record["summary"]["images"] == 2 and len(record["per_class"]) == 459
    assert record["settings"]["protocol"] == "clearclip" and record["per_class"][5]["prompt"] == "thing 5"
    assert sum(c["label"] for c in record["per_class"]) == sum(int((r != 459).sum()) for r in raw)
    pred = read_label_png(save / "clip" / "context459" / "2008_000001.png")
    assert pred.shape == raw[0].shape and 0 <= pred.min() and pred.max() < 459


def test_eval_on_potsdam_scores_clutter_as_background(tiny_checkpoint, tmp_path):
    """Potsdam's background is its last class (clutter): predictions, per-class rows and prompts stay in the set's
    order, and prob_thd 1.0 sends every pixel to clutter."""
    raw = write_new_layout(tmp_path, "potsdam", n=2)
    out, save = tmp_path / "r.json", tmp_path / "pred"
    extra = ["--dataset", "potsdam", "--method", "gclip", "--out", str(out), "--save-predictions", str(save)]
    assert run(tiny_checkpoint, tmp_path, *extra, "--prob-thd", "1.0") == 0
    record = json.loads(out.read_text())["runs"][0]
    assert [c["class"] for c in record["per_class"]] == [
        "impervious surfaces", "building", "low vegetation", "tree", "car", "clutter"
    ]  # fmt: skip
    assert record["per_class"][5]["prompt"] == "clutter" and record["settings"]["protocol"] == "segearth"
    areas = {c["class"]: c for c in record["per_class"]}
    assert areas["clutter"]["pred"] == sum(c["pred"] for c in record["per_class"]) > 0
    assert areas["clutter"]["label"] == sum(int((r == 6).sum()) for r in raw)  # raw 6 = clutter (reduce_zero_label)
    pred = read_label_png(save / "gclip" / "potsdam" / "2_13_1_0_512_512.png")
    assert (pred == 6).all()  # written in the set's own label values: clutter is 6 in the files


def test_eval_family_runs_the_sets_found(tiny_checkpoint, tmp_path, capsys):
    write_new_layout(tmp_path, "whu_aerial", n=2)
    write_new_layout(tmp_path, "udd5", n=2)
    assert run(tiny_checkpoint, tmp_path, "--dataset", "remote", "--method", "clip", "--limit", "1") == 0
    captured = capsys.readouterr()
    assert "clip on udd5: mIoU" in captured.out and "clip on whu_aerial: mIoU" in captured.out
    assert "| method | UDD5 | WHU-Aerial | mean |" in captured.out  # table order: DATASETS' order
    assert "gclip: loveda skipped" in captured.err

"""MESS's 22 sets (PAXRay-4 as its four registered sets), each in a tiny layout written here: listing, label values,
the checks and their faults, the class-name routes (an installed package, faked here, or --classes-dir), the presets,
the names, the PAXRay-4 column and one eval run of the family."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from conftest import plant_fault
from gclip.cli import main
from gclip.errors import ConfigError
from gclip.evaluation import DATASETS, expand_datasets, get_dataset, list_samples, read_label, resolve_preset
from gclip.evaluation.check import check_dataset
from gclip.evaluation.layouts import FAMILIES
from gclip.evaluation.report import markdown_table
from gclip.methods import list_methods
from gclip.text import read_class_file
from test_eval import FAST, tiny_args

_D2 = "{root}/images_detectron2/{split}/{name}", "{root}/annotations_detectron2/{split}/{name}"


def _d2(root: str, split: str, image: str, label: str) -> dict:
    return dict(image=_D2[0].format(root=root, split=split, name=image), label=_D2[1].format(root=root, split=split,
                                                                                            name=label))  # fmt: skip


# Where MESS's preparation scripts (mess/prepare_datasets/prepare_*.py at blumenstiel/MESS cc701b5) put an image and
# its label and what its registration (mess/datasets/register_*.py) reads, written out by hand so that the tests do
# not derive the paths from the code under test; the classes (label values 0..n-1), whether the script can write
# 255 (tiles padded with 255, unlabeled pixels) and the image mode MESS feeds.
MESS_LAYOUTS = {
    "mess_bdd100k": dict(image="bdd100k/images/10k/val/7d2f7975-e0c1c5a7_{i}.jpg",
                         label="bdd100k/annotations_detectron2/val/7d2f7975-e0c1c5a7_{i}.png", n=19, ignore=True),
    "mess_dark_zurich": dict(
        image="Dark_Zurich/rgb_anon/val/night/GOPR0356/GOPR0356_frame_{i:06d}_rgb_anon.png",
        label="Dark_Zurich/annotations_detectron2/val/GOPR0356_frame_{i:06d}_gt_labelIds.png", n=20, ignore=True),
    "mess_mhp_v1": dict(**_d2("LV-MHP-v1", "test", "{i:04d}.jpg", "{i:04d}.png"), n=19, ignore=True),
    "mess_foodseg103": dict(image="FoodSeg103/Images/img_dir/test/{i:08d}.jpg",
                            label="FoodSeg103/Images/ann_dir/test/{i:08d}.png", n=104, ignore=True),
    "mess_atlantis": dict(**_d2("atlantis", "test", "{i}.jpg", "{i}.png"), n=56, ignore=True),
    "mess_dram": dict(**_d2("DRAM_processed", "test", "monet_{i}.jpg", "monet_{i}.png"), n=12, ignore=True),
    "mess_isaid": dict(**_d2("isaid", "val", "P{i:04d}_0.png", "P{i:04d}_0.png"), n=16, ignore=True),
    "mess_isprs_potsdam": dict(image="ISPRS_Potsdam/images_detectron2/test/irrg/top_potsdam_2_13_{i}.png",
                               label="ISPRS_Potsdam/annotations_detectron2/test/top_potsdam_2_13_{i}.png", n=6,
                               ignore=True),
    "mess_worldfloods": dict(image="WorldFloods/images_detectron2/test/irrg/EMSR286_08ITUANGONORTH_{i}.png",
                             label="WorldFloods/annotations_detectron2/test/EMSR286_08ITUANGONORTH_{i}.png", n=3,
                             ignore=True),
    "mess_floodnet": dict(**_d2("FloodNet-Supervised_v1.0", "test", "6{i:03d}_0.jpg", "6{i:03d}_0.png"), n=10,
                          ignore=True),
    "mess_uavid": dict(**_d2("uavid_v1.5", "val", "seq16_000{i}00_0.png", "seq16_000{i}00_0.png"), n=8, ignore=True),
    "mess_kvasir_instrument": dict(**_d2("kvasir-instrument", "test", "ckcu8ty6z{i}.png", "ckcu8ty6z{i}.png"), n=2),
    "mess_chase_db1": dict(**_d2("CHASEDB1", "test", "Image_{i:02d}L.jpg", "Image_{i:02d}L.png"), n=2),
    "mess_cryonuseg": dict(image="CryoNuSeg/images_detectron2/Human_AdrenalGland_{i:02d}.png",
                           label="CryoNuSeg/annotations_detectron2/Human_AdrenalGland_{i:02d}.png", n=2),
    **{
        f"mess_paxray_{part}": dict(image="paxray_dataset/images_detectron2/test/{i}_a.png",
                                    label=f"paxray_dataset/annotations_detectron2/test/{part}/{{i}}_a.png", n=2)
        for part in ("lungs", "bones", "mediastinum", "diaphragm")
    },
    "mess_corrosion_cs": dict(image="Corrosion Condition State Classification/original/Test/images/{i}.jpeg",
                              label="Corrosion Condition State Classification/original/Test/masks/{i}.png", n=4,
                              ignore=True),
    "mess_deepcrack": dict(image="DeepCrack/test_img/11125-{i}.jpg",
                           label="DeepCrack/annotations_detectron2/test/11125-{i}.png", n=2),
    "mess_pst900": dict(image="PST900_RGBT_Dataset/test/thermal/32_bag{i}.png",
                        label="PST900_RGBT_Dataset/test/labels/32_bag{i}.png", n=5, ignore=True, mode="L"),
    "mess_zerowaste": dict(image="zerowaste-f/splits_final_deblurred/test/data/01_frame_00{i}.PNG",
                           label="zerowaste-f/splits_final_deblurred/test/sem_seg/01_frame_00{i}.PNG", n=5,
                           ignore=True),
    "mess_suim": dict(image="SUIM/TEST/images/d_r_{i}_.jpg", label="SUIM/annotations_detectron2/test/d_r_{i}_.png",
                      n=8),
    "mess_cub_200": dict(**_d2("CUB_200_2011", "test", "Black_Footed_Albatross_00{i}.jpg",
                               "Black_Footed_Albatross_00{i}.png"), n=201),
    "mess_cwfid": dict(image="cwfid/images/{i:03d}_image.png",
                       label="cwfid/annotations_detectron2/test/{i:03d}_annotation.png", n=3, ignore=True),
}  # fmt: skip
MESS = FAMILIES["mess"]
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def write_mess_layout(root: Path, name: str, n: int = 3, size: tuple[int, int] = (24, 32), seed: int = 0) -> list:
    """Write ``n`` random pairs of MESS set ``name`` under ``root``; returns the label arrays as read back."""
    spec = MESS_LAYOUTS[name]
    rng = np.random.default_rng(seed)
    labels = []
    for i in range(1, n + 1):
        image_path, label_path = root / spec["image"].format(i=i), root / spec["label"].format(i=i)
        image_path.parent.mkdir(parents=True, exist_ok=True)
        label_path.parent.mkdir(parents=True, exist_ok=True)
        h, w = size[0] + i, size[1] + 2 * i
        if not image_path.is_file():  # PAXRay's four sets share their images
            shape = (h, w) if spec.get("mode") == "L" else (h, w, 3)
            image = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
            image.save(image_path, format=FORMATS[image_path.suffix.lower()])
        label = rng.integers(0, spec["n"], (h, w)).astype(np.uint8)
        if spec.get("ignore"):  # tiles padded with 255, unlabeled pixels
            label[0, :3] = 255
        Image.fromarray(label, mode="L").save(label_path, format="PNG")
        with Image.open(label_path) as img:
            labels.append(np.asarray(img).astype(np.int32))
    return labels


def fake_mess_package(root: Path) -> Path:
    """A package ``mess`` laid out as mess-benchmark installs it, whose ``__init__`` fails if it is imported (gclip
    reads the registration files without importing them); class names ``<set> <i>``."""
    datasets = root / "mess" / "datasets"
    datasets.mkdir(parents=True)
    for init in (root / "mess" / "__init__.py", datasets / "__init__.py"):
        init.write_text("raise ImportError('gclip must not import mess')\n")
    for name in MESS:
        spec = get_dataset(name)
        register = datasets / spec.classes_aliases[0]
        names = [f"{name[5:]} {i}" for i in range(spec.num_classes)]
        text = register.read_text() if register.is_file() else "import os\n"  # PAXRay: four lists in one file
        register.write_text(text + f"\n{spec.classes_key} = {names!r}\n\ndef register_dataset(root):\n    pass\n")
    return root


def test_every_mess_set_has_a_tiny_layout_here():
    assert sorted(MESS_LAYOUTS) == sorted(MESS) and len(MESS) == 25
    columns = {get_dataset(n).table_group or n for n in MESS}
    assert len(columns) == 22  # MESS's 22 sets: PAXRay-4 is its four binary sets


def test_mess_names_are_prefixed_and_messs_own_names_work():
    """gclip's isaid and uavid are SegEarth-OV's layouts; MESS's are mess_isaid and mess_uavid, and MESS's
    registered names find them too."""
    assert get_dataset("isaid").family == "remote" and get_dataset("uavid").family == "remote"
    assert get_dataset("isaid_sem_seg_val").name == "mess_isaid" and get_dataset("mess-uavid").root == "uavid_v1.5"
    assert get_dataset("paxray_sem_seg_test_lungs").name == "mess_paxray_lungs"
    assert get_dataset("isprs_potsdam_sem_seg_test_irrg").image_dir.endswith("/irrg")
    assert [s.name for s in expand_datasets("mess")] == MESS
    assert len(expand_datasets("all,remote,mess")) == 8 + 17 + 25


@pytest.mark.parametrize("name", MESS)
def test_mess_layout_loads_and_checks(tmp_path, name):
    spec = get_dataset(name)
    raw = write_mess_layout(tmp_path, name)
    samples = list_samples(spec, tmp_path)
    assert len(samples) == len(raw) and spec.ignore_index == 255 and not spec.has_background
    assert spec.num_classes == MESS_LAYOUTS[name]["n"]
    for sample, expected in zip(samples, raw):
        assert (read_label(sample.label, spec) == expected).all()  # MESS's labels are read as they are
    result = check_dataset(spec, tmp_path)
    assert not result.broken and not result.modes, result.verdict()
    assert result.verdict().startswith(f"{name}: OK with notices (3 images checked): 3 images where the full")


def test_cwfid_is_listed_from_its_labels(tmp_path):
    """MESS's CWFID keeps all 60 photos in cwfid/images and writes labels for the 21 test ones only."""
    write_mess_layout(tmp_path, "mess_cwfid")
    Image.new("RGB", (8, 8)).save(tmp_path / "cwfid/images/005_image.png")  # a training photo: no label
    samples = list_samples(get_dataset("mess_cwfid"), tmp_path)
    assert [s.name for s in samples] == ["001_", "002_", "003_"]
    assert [s.image.name for s in samples] == ["001_image.png", "002_image.png", "003_image.png"]
    (tmp_path / "cwfid/annotations_detectron2/test/002_annotation.png").unlink()
    samples = list_samples(get_dataset("mess_cwfid"), tmp_path)
    assert [s.image.name for s in samples] == ["001_image.png", "003_image.png"]
    assert not check_dataset(get_dataset("mess_cwfid"), tmp_path).broken


@pytest.mark.parametrize(
    "name, fault, expected",
    [
        ("mess_dram", "missing", "1 labels missing or unreadable (monet_2: missing)"),
        ("mess_suim", "size", "1 labels not the size of their image (d_r_2_: image 36x26, label 41x26)"),
        ("mess_dram", "value", "label values outside 0..11 and 255: 12 (4 px)"),
        ("mess_kvasir_instrument", "unconverted", "label values outside 0..1 (labels left at 0/255?): 255 ("),
        ("mess_paxray_bones", "unconverted", "label values outside 0..1 (labels left at 0/255?): 255 ("),
        ("mess_bdd100k", "grayscale", "1 images not RGB (7d2f7975-e0c1c5a7_2: L)"),
        ("mess_pst900", "rgb", "1 images not L (32_bag2: RGB)"),
        ("mess_cwfid", "count", "3 images where the full validation split has 21"),
        ("mess_cub_200", "count", "3 images where the full validation split has 5,794"),
    ],
)
def test_check_finds_each_fault_on_mess_sets(tmp_path, name, fault, expected):
    write_mess_layout(tmp_path, name)
    spec = get_dataset(name)
    plant_fault(list_samples(spec, tmp_path)[1], fault)
    line = check_dataset(spec, tmp_path).verdict()
    broken = fault in ("missing", "size", "value", "unconverted")
    assert expected in line and "\n" not in line
    assert line.startswith(f"{name}: {'BROKEN' if broken else 'OK with notices'} (3 images checked)")


def test_class_names_need_the_package_or_a_folder(tmp_path, monkeypatch):
    """No names shipped: one line naming both routes; then an installed package (faked: importing it fails, so
    it is read, not imported), a MESS clone's mess/datasets folder, or a folder of gclip text files."""
    (tmp_path / "other/mess").mkdir(parents=True)  # another package named mess, first on the path: not MESS's
    (tmp_path / "other/mess/__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "other"))
    with pytest.raises(ConfigError, match=r"install MESS's package \(pip install mess-benchmark; .*register_dram\.py"):
        resolve_preset("gclip", "mess_dram")
    with pytest.raises(ConfigError, match="or pass --classes-dir <MESS clone>/mess/datasets, or a folder with cls_"):
        resolve_preset("gclip", "mess_dram")
    fake_mess_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))  # now first
    preset = resolve_preset("sclip", "mess_paxray_mediastinum")
    assert preset.classes_file == tmp_path / "site/mess/datasets/register_paxray.py"
    assert preset.classes_key == "MEDIANSTINUM"  # MESS's own spelling of the list
    assert preset.describe()["classes_file"].endswith("register_paxray.py:MEDIANSTINUM")
    assert read_class_file(preset.classes_file, key=preset.classes_key).names == ["paxray_mediastinum 0",
                                                                                  "paxray_mediastinum 1"]  # fmt: skip
    clone = tmp_path / "site/mess/datasets"
    assert resolve_preset("gclip", "mess_cwfid", classes_dir=clone).classes_file == clone / "register_cwfid.py"
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "cls_mess_cwfid.txt").write_text("soil\ncrop, seedling\nweed\n")
    preset = resolve_preset("gclip", "mess_cwfid", classes_dir=texts)
    assert preset.classes_key is None and read_class_file(preset.classes_file).synonyms[1] == ("crop", "seedling")


def test_python_class_file_errors(tmp_path):
    path = tmp_path / "register_x.py"
    path.write_text("CLASSES = ['a', 'b']\nOTHER = [1, 2]\nBAD = [x for x in 'ab']\n")
    assert read_class_file(path).names == ["a", "b"]
    for key, message in [("OTHER", "OTHER is not a list of class names"), ("BAD", "BAD is not a list of class"),
                         ("NONE", "has no class list NONE")]:  # fmt: skip
        with pytest.raises(Exception, match=message):
            read_class_file(path, key=key)
    path.write_text("CLASSES = [\n")
    with pytest.raises(Exception, match="is not valid Python"):
        read_class_file(path)


@pytest.mark.parametrize("name", MESS)
def test_mess_presets_are_clearclips(tmp_path, monkeypatch, name):
    """ClearCLIP's protocol on every MESS set for every method (no method's preset has a table for them), with
    MESS's class lists: the registration's list for the benchmark split, one class per scored label value."""
    fake_mess_package(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = get_dataset(name)
    for method in list_methods():
        preset = resolve_preset(method, name)
        assert preset.protocol == "clearclip" and preset.settings["crop"] == 448 and preset.settings["stride"] == 224
        assert preset.settings["prob_thd"] == 0.0
    assert len(read_class_file(preset.classes_file, key=preset.classes_key)) == spec.num_classes


def test_paxray_four_is_one_column():
    """MESS averages its four PAXRay sets into PAXRay-4 (mess_evaluation.py's combine_paxray): one column, and
    the row's mean is over 22 columns; with a PAXRay set missing, the sets stay apart."""
    scores = {name: float(i) for i, name in enumerate(MESS)}
    rows = [SimpleNamespace(method="m", dataset=d, summary={"mIoU": v}) for d, v in scores.items()]
    table = markdown_table(rows)
    header, _, row = table.splitlines()
    assert header.count("|") == 22 + 3 and "| PAXRay-4 |" in header and "Lungs" not in header
    paxray = np.mean([scores[n] for n in MESS if "paxray" in n])
    others = [v for n, v in scores.items() if "paxray" not in n]
    assert f"| {paxray:.2f} |" in row and row.endswith(f"| {np.mean(others + [paxray]):.2f} |")
    partial = markdown_table([r for r in rows if r.dataset != "mess_paxray_bones"]).splitlines()[0]
    assert "PAXRay-4" not in partial and "| PAXRay-Lungs |" in partial


def test_eval_mess_runs_the_sets_found(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """``--dataset mess`` on a data root holding three MESS sets: each scored with the package's class names and
    MESS's ignore value, the other sets skipped with a notice; predictions keep the set's label values."""
    fake_mess_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    data = tmp_path / "data"
    raw = write_mess_layout(data, "mess_dark_zurich", n=2)
    write_mess_layout(data, "mess_pst900", n=2)
    write_mess_layout(data, "mess_cwfid", n=2)
    out, save = tmp_path / "r.json", tmp_path / "pred"
    args = tiny_args(tiny_checkpoint, data) + FAST
    extra = ["--dataset", "mess", "--method", "clip", "--out", str(out), "--save-predictions", str(save)]
    assert main(args + extra) == 0
    captured = capsys.readouterr()
    for name in ("mess_dark_zurich", "mess_pst900", "mess_cwfid"):
        assert f"clip on {name}: mIoU" in captured.out
    assert "gclip: mess_bdd100k skipped" in captured.err and "gclip: mess_paxray_lungs skipped" in captured.err
    assert "| method | Dark Zurich | PST900 | CWFID | mean |" in captured.out
    runs = {r["dataset"]: r for r in json.loads(out.read_text())["runs"]}
    zurich = runs["mess_dark_zurich"]
    assert zurich["summary"]["images"] == 2 and len(zurich["per_class"]) == 20
    assert zurich["per_class"][3]["prompt"] == "dark_zurich 3" and zurich["settings"]["protocol"] == "clearclip"
    assert zurich["settings"]["classes_file"].endswith("register_dark_zurich.py:CLASSES")
    assert sum(c["label"] for c in zurich["per_class"]) == sum(int((r != 255).sum()) for r in raw)
    pred = np.asarray(Image.open(save / "clip" / "mess_dark_zurich" / "GOPR0356_frame_000001.png"))
    assert pred.shape == raw[0].shape and pred.max() < 20
    assert DATASETS["mess_cwfid"].listed_from == "labels" and runs["mess_cwfid"]["summary"]["images"] == 2

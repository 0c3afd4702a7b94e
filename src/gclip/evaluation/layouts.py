"""The benchmark datasets: where their files lie in the layouts their preparation scripts write, and how to read them.

Each :class:`DatasetSpec` is plain data (folders, suffixes, split file, classes, ignore index,
``reduce_zero_label``); :func:`list_samples` turns a spec and a data root into ``(image, label)`` pairs
and :func:`read_label` reads a label map with PIL (palettized PNGs keep their indices, 16-bit TIFFs their values).

The sets come in families (:data:`FAMILIES`): the eight classic ones (mmsegmentation layouts), the large-vocabulary
ADE20K-847 and PASCAL Context-459 (CAT-Seg's ``prepare_ade20k_full.py`` and ``prepare_pascal_context_459.py``:
16-bit TIFF labels), the 17 remote-sensing sets of SegEarth-OV (its ``tools/dataset_converters``), and the 22 sets of
MESS (blumenstiel/MESS, ``mess.prepare_datasets.prepare_*``; PAXRay-4 as its four registered sets), named
``mess_<MESS name>`` (:data:`MESS_NAMES`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import GclipError

__all__ = [
    "DatasetError",
    "DatasetMissing",
    "DatasetSpec",
    "Sample",
    "DATASETS",
    "PAPER_ORDER",
    "FAMILIES",
    "TABLE_ORDER",
    "MESS_NAMES",
    "get_dataset",
    "class_order",
    "class_names",
    "list_samples",
    "read_label",
    "reduce_zero_label",
]

IGNORE_INDEX = 255


class DatasetError(GclipError):
    """A benchmark file is missing, unreadable or inconsistent with its image."""


class DatasetMissing(DatasetError):
    """A dataset's folders are not under the data root at all."""


@dataclass(frozen=True)
class DatasetSpec:
    """Where one benchmark's validation files lie under a data root (mmsegmentation 1.x layout).

    Attributes:
        name: short name (``voc20``, ``ade20k``, ...).
        title: the name used in tables.
        root: the dataset folder under the data root.
        image_dir, label_dir: folders under ``root``.
        image_suffix, label_suffix: an image ``<base><image_suffix>`` has the label ``<base><label_suffix>``.
        split: file of image ids under ``root`` (``None``: every image in ``image_dir``, recursively).
        num_classes: classes predicted and scored.
        reduce_zero_label: labels 0 -> 255 and v -> v - 1 (the set has no background class).
        ignore_index: label value that is not scored.
        has_background: class 0 is background (``prob_thd`` applies).
        classes_file: class-name file name in the protocol's class folder.
        download: where to get the data (for error messages and the docs' dataset table).
        ignore_index: label value that is not scored.
        family: ``classic``, ``large`` (ADE20K-847, PASCAL Context-459), ``remote`` (SegEarth-OV's
            remote-sensing sets) or ``mess`` (the MESS benchmark); a family's name is also a ``--dataset`` value.
        background_index: the background class's index when it is not 0 (SegEarth-OV's ``bg_idx``: Potsdam's and
            Vaihingen's ``clutter``, UDD5's ``other``); scoring moves it first (:func:`class_order`).
        protocol: the protocol file used for this set when the method's own preset has no table for it (``None``:
            the method's own protocol's defaults).
        classes_aliases: other names of its class file in a ``--classes-dir`` folder (CAT-Seg's ``ade847.json``).
        classes_from: where to get the class names when gclip ships none (the error message says it).
        image_modes: the PIL modes its images are expected in (``gclip data check`` reports the others).
        ignore_written: whether the prepared labels may hold ``ignore_index``; the binary remote-sensing sets'
            converters write only 0 and 1, so a 255 there is a label left unconverted (0/255), which the metric
            would silently ignore: ``gclip data check`` reports it as out of range.
        listed_from: ``images`` (every image of ``image_dir`` is a sample) or ``labels`` (every label of
            ``label_dir`` is: MESS's CWFID keeps all 60 photos in one folder and writes the 21 test labels only).
        classes_key: the name of the class list in a Python class file (MESS's ``register_*.py``: ``CLASSES``,
            PAXRay's ``LUNGS``, ...), read without importing it.
        classes_package: ``<package>/<folder>`` of an installed package whose folder holds the class file
            ``classes_aliases[0]`` (``mess/datasets``: the ``mess-benchmark`` package), used when gclip ships none
            and no ``--classes-dir`` is given.
        table_group: sets shown as one column of the tables, the mean of its members (MESS's ``PAXRay-4``, the
            mean of its four binary sets).
    """

    name: str
    title: str
    root: str
    image_dir: str
    label_dir: str
    image_suffix: str
    label_suffix: str
    split: str | None
    num_classes: int
    reduce_zero_label: bool
    has_background: bool
    classes_file: str
    download: str
    ignore_index: int = IGNORE_INDEX
    family: str = "classic"
    background_index: int = 0
    protocol: str | None = None
    classes_aliases: tuple[str, ...] = ()
    classes_from: str = ""
    image_modes: tuple[str, ...] = ("RGB",)
    ignore_written: bool = True
    listed_from: str = "images"
    classes_key: str = ""
    classes_package: str = ""
    table_group: str = ""


@dataclass(frozen=True)
class Sample:
    """One validation pair: ``name`` is the image's base name relative to the image folder."""

    name: str
    image: Path
    label: Path


_VOC = "http://host.robots.ox.ac.uk/pascal/VOC/voc2012/ (VOCtrainval_11-May-2012.tar)"
_CONTEXT = "https://cs.stanford.edu/~roozbeh/pascal-context/ (trainval_merged.json) + VOC2010 images"
_COCO = "https://github.com/nightrome/cocostuff (val2017.zip, stuffthingmaps_trainval2017.zip)"

DATASETS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in [
        DatasetSpec(
            "voc21", "VOC21", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
            "ImageSets/Segmentation/val.txt", 21, False, True, "cls_voc21.txt", _VOC,
        ),
        DatasetSpec(
            "voc20", "VOC20", "VOCdevkit/VOC2012", "JPEGImages", "SegmentationClass", ".jpg", ".png",
            "ImageSets/Segmentation/val.txt", 20, True, False, "cls_voc20.txt", _VOC,
        ),
        DatasetSpec(
            "context60", "Context60", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
            "ImageSets/SegmentationContext/val.txt", 60, False, True, "cls_context60.txt", _CONTEXT,
        ),
        DatasetSpec(
            "context59", "Context59", "VOCdevkit/VOC2010", "JPEGImages", "SegmentationClassContext", ".jpg", ".png",
            "ImageSets/SegmentationContext/val.txt", 59, True, False, "cls_context59.txt", _CONTEXT,
        ),
        DatasetSpec(
            "coco_stuff", "COCO-Stuff", "coco_stuff164k", "images/val2017", "annotations/val2017", ".jpg",
            "_labelTrainIds.png", None, 171, False, False, "cls_coco_stuff.txt", _COCO,
        ),
        DatasetSpec(
            "coco_object", "COCO-Object", "coco_stuff164k", "images/val2017", "annotations/val2017", ".jpg",
            "_instanceTrainIds.png", None, 81, False, True, "cls_coco_object.txt",
            _COCO + "; then `gclip data coco-object`",
        ),
        DatasetSpec(
            "cityscapes", "Cityscapes", "cityscapes", "leftImg8bit/val", "gtFine/val", "_leftImg8bit.png",
            "_gtFine_labelTrainIds.png", None, 19, False, False, "cls_city_scapes.txt",
            "https://www.cityscapes-dataset.com/ (leftImg8bit_trainvaltest.zip, gtFine_trainvaltest.zip; "
            "labelTrainIds made with cityscapesscripts' createTrainIdLabelImgs)",
        ),
        DatasetSpec(
            "ade20k", "ADE20K", "ade/ADEChallengeData2016", "images/validation", "annotations/validation", ".jpg",
            ".png", None, 150, True, False, "cls_ade20k.txt",
            "http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip",
        ),
    ]
}  # fmt: skip

_CATSEG = "CAT-Seg's datasets/{} (github.com/KU-CVLAB/CAT-Seg)"
_CATSEG_CLASSES = (
    "gclip ships no class names for {name}: pass --classes-dir <CAT-Seg clone>/datasets (its {file}, one class per "
    "entry, comma-separated synonyms) or a folder with cls_{name}.txt"
)
_LARGE = [
    DatasetSpec(
        "ade847", "ADE-847", "ADE20K_2021_17_01", "images_detectron2/validation", "annotations_detectron2/validation",
        ".jpg", ".tif", None, 847, False, False, "cls_ade847.txt",
        "https://groups.csail.mit.edu/vision/datasets/ADE20K/ (ADE20K_2021_17_01), then "
        + _CATSEG.format("prepare_ade20k_full.py"),
        ignore_index=65535, family="large", protocol="clearclip", classes_aliases=("ade847.json",),
        classes_from=_CATSEG_CLASSES.format(name="ade847", file="ade847.json"), image_modes=("RGB", "L"),
    ),
    DatasetSpec(
        "context459", "Context-459", "VOCdevkit/VOC2010", "JPEGImages", "annotations_detectron2/pc459_val", ".jpg",
        ".tif", "pascalcontext_val.txt", 459, False, False, "cls_context459.txt",
        "VOC2010 images + https://www.cs.stanford.edu/~roozbeh/pascal-context/ (trainval.tar.gz, labels.txt; "
        "pascalcontext_val.txt from CAT-Seg), then " + _CATSEG.format("prepare_pascal_context_459.py"),
        ignore_index=459, family="large", protocol="clearclip", classes_aliases=("pc459.json",),
        classes_from=_CATSEG_CLASSES.format(name="context459", file="pc459.json"),
    ),
]  # fmt: skip

_SEGEARTH = "then SegEarth-OV's tools/dataset_converters/{} (github.com/likyoo/SegEarth-OV, dataset_prepare.md)"
_GRSET = (
    "https://github.com/xiaoyan07/GRNet_GRSet (GlobalRoadSet_Val: {}); labels 0/255 -> 0/1 as SegEarth-OV's roadval.py"
)
_WHU = "http://gpcv.whu.edu.cn/data/building_dataset.html"


def _remote(name, title, root, images, labels, suffixes, classes, n, download, **kw) -> DatasetSpec:
    kw.setdefault("ignore_written", n > 2)  # the binary sets' converters write 0/1 only
    return DatasetSpec(
        name, title, root, images, labels, suffixes[0], suffixes[1], kw.pop("split", None), n,
        kw.pop("reduce_zero_label", False), True, classes, download, family="remote", protocol="segearth", **kw,
    )  # fmt: skip


_REMOTE = [
    _remote("openearthmap", "OpenEarthMap", "OpenEarthMap", "img_dir/val", "ann_dir/val", (".tif", ".tif"),
            "cls_openearthmap.txt", 9,
            "https://open-earth-map.org (OpenEarthMap_wo_xBD), " + _SEGEARTH.format("openearthmap.py")),
    _remote("loveda", "LoveDA", "LoveDA", "img_dir/val", "ann_dir/val", (".png", ".png"), "cls_loveda.txt", 7,
            "https://zenodo.org/record/5706578 (Val.zip), " + _SEGEARTH.format("loveda.py"), reduce_zero_label=True),
    _remote("isaid", "iSAID", "iSAID", "img_dir/val", "ann_dir/val", (".png", "_instance_color_RGB.png"),
            "cls_iSAID.txt", 16,
            "DOTA-v1.0 images + https://captain-whu.github.io/iSAID/ (val), " + _SEGEARTH.format("isaid.py")),
    _remote("potsdam", "Potsdam", "potsdam", "img_dir/val", "ann_dir/val", (".png", ".png"), "cls_potsdam.txt", 6,
            "ISPRS Potsdam (2_Ortho_RGB.zip, 5_Labels_all_noBoundary.zip), " + _SEGEARTH.format("potsdam.py"),
            reduce_zero_label=True, background_index=5),
    _remote("vaihingen", "Vaihingen", "vaihingen", "img_dir/val", "ann_dir/val", (".png", ".png"),
            "cls_vaihingen.txt", 6, "ISPRS Vaihingen (ISPRS_semantic_labeling_Vaihingen.zip, "
            "..._ground_truth_eroded_COMPLETE.zip), " + _SEGEARTH.format("vaihingen.py"),
            reduce_zero_label=True, background_index=5),
    _remote("uavid", "UAVid", "UAVid", "img_dir/test", "ann_dir/test", (".png", ".png"), "cls_uavid.txt", 7,
            "https://uavid.nl, " + _SEGEARTH.format("uavid.py")),
    _remote("udd5", "UDD5", "UDD/UDD/UDD5", "val/src", "val/gt", (".JPG", ".png"), "cls_udd5.txt", 5,
            "https://github.com/MarcWong/UDD (UDD5, used as it is)", background_index=4),
    _remote("vdd", "VDD", "VDD", "test/src", "test/gt", (".JPG", ".png"), "cls_vdd.txt", 7,
            "https://github.com/RussRobin/VDD (used as it is)"),
    _remote("whu_aerial", "WHU-Aerial", "WHU-BD", "val/image", "val/label_cvt", (".png", ".png"), "cls_whu.txt", 2,
            _WHU + " (aerial, val), " + _SEGEARTH.format("whu.py")),
    _remote("whu_sat2", "WHU-Sat.II", "WHU_Sat_II/Satellite_dataset_\u2161_East_Asia/1.cropped/test", "image",
            "label_cvt", (".tif", ".tif"), "cls_whu.txt", 2,
            _WHU + " (satellite II, test), labels 0/255 -> 0/1 as " + _SEGEARTH.format("whu.py")),
    _remote("inria", "Inria", "Inria/AerialImageDataset/train", "img_dir/split_test", "ann_dir/split_test",
            (".png", ".png"), "cls_inria.txt", 2,
            "https://project.inria.fr/aerialimagelabeling/, " + _SEGEARTH.format("inria.py")),
    _remote("xbd", "xBD-pre", "xBD/test", "images_pre", "targets_cvt_pre", (".png", ".png"), "cls_xBD.txt", 2,
            "https://xview2.org (test), " + _SEGEARTH.format("xBD.py")
            + "; the *_pre_disaster files moved to images_pre/ and targets_cvt_pre/"),
    _remote("chn6_cug", "CHN6-CUG", "CHN6-CUG/val", "image_cvt", "label_cvt", (".jpg", ".png"), "cls_chn6-cug.txt", 2,
            "https://grzy.cug.edu.cn/zhuqiqi/ (CHN6-CUG val), " + _SEGEARTH.format("chn6-cug.py")),
    _remote("deepglobe", "DeepGlobe", "GlobalRoadSet_Val/DeepGlobe_test_1530", "image_cvt", "label_cvt",
            (".jpg", ".png"), "cls_roadval.txt", 2, _GRSET.format("DeepGlobe_test_1530; images in image_cvt/")),
    _remote("massachusetts", "Massachusetts", "GlobalRoadSet_Val/Massachusetts_test_49", "img", "label_cvt",
            (".jpg", ".png"), "cls_roadval.txt", 2, _GRSET.format("Massachusetts_test_49")),
    _remote("spacenet", "SpaceNet", "GlobalRoadSet_Val/SpaceNet_test_567", "img", "label_cvt", (".jpg", ".png"),
            "cls_roadval.txt", 2, _GRSET.format("SpaceNet_test_567")),
    _remote("wbs_si", "WBS-SI", "water-body-segmentation-in-satellite-images/WaterBodiesDatasetPreprocessed/"
            "WaterBodiesDatasetPreprocessed", "Images", "Masks_cvt", (".jpg", ".jpg"), "cls_wbs-si.txt", 2,
            "https://www.kaggle.com/datasets/shirshmall/water-body-segmentation-in-satellite-images, "
            + _SEGEARTH.format("wbs-si.py") + "; copy its wbs-si_val.txt into the set's folder",
            split="wbs-si_val.txt"),
]  # fmt: skip

_MESS_PREPARE = "MESS (pip install mess-benchmark): python -m mess.prepare_datasets.prepare_{}"
_MESS_MANUAL = " after the manual download of {} (MESS's DATASETS.md)"
_MESS_CLASSES = (
    "gclip ships no class names for MESS's sets: install MESS's package (pip install mess-benchmark; gclip reads "
    "its mess/datasets/{file} without importing it) or pass --classes-dir <MESS clone>/mess/datasets, or a folder "
    "with cls_{name}.txt"
)
#: gclip's name of each MESS set -> the name MESS registers it under (``mess.datasets``); the ``mess_`` prefix keeps
#: MESS's sets apart from gclip's own ``isaid`` and ``uavid`` (SegEarth-OV's layouts), and MESS's names are
#: accepted too (:func:`get_dataset`). PAXRay-4 is four registered sets, one per class, averaged in the tables.
MESS_NAMES: dict[str, str] = {}


def _mess(name, title, registered, root, images, labels, suffixes, n, prepare, **kw) -> DatasetSpec:
    """A MESS set: its registration's folders and suffixes, ignore value 255, every class scored by its name
    (MESS's mIoU counts its ``others``/``background`` class like the others: no background class in gclip's sense),
    ClearCLIP's protocol unless a method's preset has a table for it."""
    MESS_NAMES[name] = registered
    register = kw.pop("register", f"register_{prepare}.py")
    return DatasetSpec(
        name, title, root, images, labels, suffixes[0], suffixes[1], None, n, False, False, f"cls_{name}.txt",
        _MESS_PREPARE.format(prepare) + kw.pop("manual", ""), family="mess", protocol="clearclip",
        classes_aliases=(register,), classes_from=_MESS_CLASSES.format(file=register, name=name),
        classes_key=kw.pop("key", "CLASSES"), classes_package="mess/datasets", **kw,
    )  # fmt: skip


_D2 = "images_detectron2/{}", "annotations_detectron2/{}"
# In MESS's result order (mess/evaluation/mess_evaluation.py's dataset_names); the folders, suffixes and class
# counts are those of mess/datasets/register_*.py at blumenstiel/MESS cc701b5 (= mess-benchmark 0.2), the label
# values those its mess/prepare_datasets/prepare_*.py write. ignore_written=False: the script writes no 255 (a mask
# divided by 255, a boolean mask, a lookup that fails on other values), so a 255 is a mask left unconverted.
_MESS = [
    _mess("mess_bdd100k", "BDD100K", "bdd100k_sem_seg_val", "bdd100k", "images/10k/val",
          "annotations_detectron2/val", (".jpg", ".png"), 19, "bdd100k",
          manual=_MESS_MANUAL.format("bdd100k_images_10k.zip and bdd100k_sem_seg_labels_trainval.zip")),
    _mess("mess_dark_zurich", "Dark Zurich", "dark_zurich_sem_seg_val", "Dark_Zurich", "rgb_anon/val/night/GOPR0356",
          "annotations_detectron2/val", ("_rgb_anon.png", "_gt_labelIds.png"), 20, "dark_zurich"),
    _mess("mess_mhp_v1", "MHP v1", "mhp_v1_sem_seg_test", "LV-MHP-v1", *[d.format("test") for d in _D2],
          (".jpg", ".png"), 19, "mhp_v1"),
    _mess("mess_foodseg103", "FoodSeg103", "foodseg103_sem_seg_test", "FoodSeg103", "Images/img_dir/test",
          "Images/ann_dir/test", (".jpg", ".png"), 104, "foodseg"),
    _mess("mess_atlantis", "ATLANTIS", "atlantis_sem_seg_test", "atlantis", *[d.format("test") for d in _D2],
          (".jpg", ".png"), 56, "atlantis"),
    _mess("mess_dram", "DRAM", "dram_sem_seg_test", "DRAM_processed", *[d.format("test") for d in _D2],
          (".jpg", ".png"), 12, "dram"),
    _mess("mess_isaid", "iSAID (MESS)", "isaid_sem_seg_val", "isaid", *[d.format("val") for d in _D2],
          (".png", ".png"), 16, "isaid", image_modes=("RGB", "L")),  # DOTA's panchromatic images stay grayscale
    _mess("mess_isprs_potsdam", "ISPRS Potsdam", "isprs_potsdam_sem_seg_test_irrg", "ISPRS_Potsdam",
          "images_detectron2/test/irrg", "annotations_detectron2/test", (".png", ".png"), 6, "isprs_potsdam",
          manual=_MESS_MANUAL.format("Potsdam.zip")),
    _mess("mess_worldfloods", "WorldFloods", "worldfloods_sem_seg_test_irrg", "WorldFloods",
          "images_detectron2/test/irrg", "annotations_detectron2/test", (".png", ".png"), 3, "worldfloods"),
    _mess("mess_floodnet", "FloodNet", "floodnet_sem_seg_test", "FloodNet-Supervised_v1.0",
          *[d.format("test") for d in _D2], (".jpg", ".png"), 10, "floodnet",
          manual=_MESS_MANUAL.format("FloodNet-Supervised_v1.0")),
    _mess("mess_uavid", "UAVid (MESS)", "uavid_sem_seg_val", "uavid_v1.5", *[d.format("val") for d in _D2],
          (".png", ".png"), 8, "uavid", manual=_MESS_MANUAL.format("uavid_v1.5_official_release_image.zip")),
    _mess("mess_kvasir_instrument", "Kvasir-Instrument", "kvasir_instrument_sem_seg_test", "kvasir-instrument",
          *[d.format("test") for d in _D2], (".png", ".png"), 2, "kvasir_instrument", ignore_written=False),
    _mess("mess_chase_db1", "CHASE DB1", "chase_db1_sem_seg_test", "CHASEDB1", *[d.format("test") for d in _D2],
          (".jpg", ".png"), 2, "chase_db1", ignore_written=False),
    _mess("mess_cryonuseg", "CryoNuSeg", "cryonuseg_sem_seg_test", "CryoNuSeg", "images_detectron2",
          "annotations_detectron2", (".png", ".png"), 2, "cryonuseg", ignore_written=False,
          manual=_MESS_MANUAL.format("the Kaggle folder archive/")),
    *[
        _mess(f"mess_paxray_{part}", f"PAXRay-{part.title()}", f"paxray_sem_seg_test_{part}", "paxray_dataset",
              "images_detectron2/test", f"annotations_detectron2/test/{part}", (".png", ".png"), 2, "paxray",
              key=key, ignore_written=False, table_group="PAXRay-4")
        for part, key in [("lungs", "LUNGS"), ("bones", "BONES"), ("mediastinum", "MEDIANSTINUM"),
                          ("diaphragm", "DIAPHRAGM")]
    ],
    _mess("mess_corrosion_cs", "Corrosion CS", "corrosion_cs_sem_seg_test", "Corrosion Condition State Classification",
          "original/Test/images", "original/Test/masks", (".jpeg", ".png"), 4, "corrosion_cs"),
    _mess("mess_deepcrack", "DeepCrack", "deepcrack_sem_seg_test", "DeepCrack", "test_img",
          "annotations_detectron2/test", (".jpg", ".png"), 2, "deepcrack", ignore_written=False),
    _mess("mess_pst900", "PST900", "pst900_sem_seg_test", "PST900_RGBT_Dataset", "test/thermal", "test/labels",
          (".png", ".png"), 5, "pst900", image_modes=("L",)),  # the thermal images, 8-bit grayscale
    _mess("mess_zerowaste", "ZeroWaste-f", "zerowaste_sem_seg_test", "zerowaste-f",
          "splits_final_deblurred/test/data", "splits_final_deblurred/test/sem_seg", (".PNG", ".PNG"), 5,
          "zerowaste"),
    _mess("mess_suim", "SUIM", "suim_sem_seg_test", "SUIM", "TEST/images", "annotations_detectron2/test",
          (".jpg", ".png"), 8, "suim", ignore_written=False),
    _mess("mess_cub_200", "CUB-200", "cub_200_sem_seg_test", "CUB_200_2011", *[d.format("test") for d in _D2],
          (".jpg", ".png"), 201, "cub_200", ignore_written=False),
    _mess("mess_cwfid", "CWFID", "cwfid_sem_seg_test", "cwfid", "images", "annotations_detectron2/test",
          ("image.png", "annotation.png"), 3, "cwfid", listed_from="labels"),
]  # fmt: skip

DATASETS.update({spec.name: spec for spec in [*_LARGE, *_REMOTE, *_MESS]})
#: MESS's registered names -> gclip's.
_MESS_ALIASES = {registered: name for name, registered in MESS_NAMES.items()}

#: Column order of the tables: the seed paper's five sets, then the three with background.
PAPER_ORDER = ["voc20", "context59", "coco_stuff", "cityscapes", "ade20k", "voc21", "context60", "coco_object"]
#: Every set in table order: the eight of :data:`PAPER_ORDER`, then the others as :data:`DATASETS` lists them.
TABLE_ORDER = PAPER_ORDER + [name for name in DATASETS if name not in PAPER_ORDER]
#: ``--dataset`` names of whole families: ``all`` is the eight classic sets.
FAMILIES = {
    family: [name for name, spec in DATASETS.items() if spec.family == family]
    for family in ("classic", "large", "remote", "mess")
}


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a dataset by name (``-`` and ``_`` are interchangeable)."""
    key = name.strip().lower().replace("-", "_")
    key = _MESS_ALIASES.get(key, key)  # MESS's registered names (paxray_sem_seg_test_lungs)
    if key not in DATASETS:
        raise DatasetError(
            f"unknown dataset {name!r}: choose among {', '.join(TABLE_ORDER)} (or a family: all, "
            f"{', '.join(f for f in FAMILIES if f != 'classic')})"
        )
    return DATASETS[key]


_SPACED = [
    "chest of drawers", "pool table", "screen door", "coffee table", "kitchen island", "swivel chair",
    "arcade machine", "television receiver", "dirt track", "conveyer belt", "swimming pool", "trade name",
    "traffic light", "crt screen", "bulletin board", "fire hydrant", "stop sign", "parking meter", "sports ball",
    "baseball bat", "baseball glove", "tennis racket", "wine glass", "hot dog", "potted plant", "dining table",
    "cell phone", "teddy bear", "hair drier", "traffic sign",
]  # fmt: skip
#: Where the ClearCLIP class files' prompt names differ from the datasets' own class names (mmsegmentation's
#: ``METAINFO``): VOC's ``boat`` is prompted as ``ship`` and its ``diningtable`` as ``table``; ADE20K, COCO-Stuff
#: and Cityscapes names of several words are prompted without their spaces.
NAME_FIXES: dict[str, dict[str, str]] = {
    "voc21": {"ship": "boat", "table": "diningtable"},
    "voc20": {"ship": "boat", "table": "diningtable"},
    **{name: {n.replace(" ", ""): n for n in _SPACED} for name in ("ade20k", "coco_stuff", "cityscapes")},
}


#: The class folder of the datasets' own names (the remote-sensing sets), used when a protocol's folder has no file.
DATASET_CLASSES = "datasets"


def class_order(spec: DatasetSpec) -> list[int] | None:
    """The dataset classes in scored order when the background is not class 0 (``None``: as they are).

    gclip's background is class 0 (``prob_thd`` sends uncertain pixels to it); a set whose background has another
    index (``background_index``) is scored with that class moved first: :func:`read_label` maps the label values,
    and scoring moves the class names and the areas back, so results and saved predictions are in the set's order.

    >>> class_order(get_dataset("potsdam"))
    [5, 0, 1, 2, 3, 4]
    """
    if not spec.has_background or spec.background_index == 0:
        return None
    others = [i for i in range(spec.num_classes) if i != spec.background_index]
    return [spec.background_index, *others]


def class_names(spec: DatasetSpec) -> list[str]:
    """The dataset's own class names, one per scored class (for tables: not the prompts a protocol uses).

    >>> class_names(get_dataset("voc21"))[4], class_names(get_dataset("ade20k"))[44]
    ('boat', 'chest of drawers')
    """
    from importlib import resources

    path = resources.files("gclip") / "data" / "classes" / "clearclip" / spec.classes_file
    if not path.is_file():
        path = resources.files("gclip") / "data" / "classes" / DATASET_CLASSES / spec.classes_file
    if not path.is_file():  # a set gclip has no class file for: no names
        return []
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    fixes = NAME_FIXES.get(spec.name, {})
    return [fixes.get(name, name) for name in (ln.split(",")[0].strip() for ln in lines)]


def _require_dir(path: Path, spec: DatasetSpec, what: str, sub: str) -> None:
    if not path.is_dir():
        raise DatasetMissing(
            f"{spec.name}: {what} folder {path} does not exist (expected the prepared layout "
            f"<data-root>/{spec.root}/{sub}; data: {spec.download})"
        )


def list_samples(spec: DatasetSpec, data_root: str | Path) -> list[Sample]:
    """The validation pairs of ``spec`` under ``data_root``, in a fixed order (split-file order, else sorted):
    the images of its image folder, or the labels of its label folder (``spec.listed_from``).

    Only the folders and the split file are checked here; a missing label file is reported when it is read,
    so that ``--skip-bad`` can skip it.

    Raises:
        DatasetMissing: the dataset's image or label folder is absent.
        DatasetError: the split file is missing or empty, or no image is found.
    """
    root = Path(data_root) / spec.root
    image_dir, label_dir = root / spec.image_dir, root / spec.label_dir
    _require_dir(image_dir, spec, "image", spec.image_dir)
    _require_dir(label_dir, spec, "label", spec.label_dir)
    folder, suffix = (label_dir, spec.label_suffix) if spec.listed_from == "labels" else (image_dir, spec.image_suffix)
    if spec.split is not None:
        split = root / spec.split
        if not split.is_file():
            raise DatasetError(f"{spec.name}: split file {split} does not exist")
        names = [ln.strip() for ln in split.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:  # every image (or, listed from the labels, every label) found
        names = sorted(str(p.relative_to(folder))[: -len(suffix)] for p in folder.rglob(f"*{suffix}") if p.is_file())
    if not names:
        raise DatasetError(f"{spec.name}: no {spec.listed_from} found under {folder}")
    if spec.name == "coco_object" and not any(label_dir.glob(f"*{spec.label_suffix}")):
        raise DatasetMissing(
            f"coco_object: no *{spec.label_suffix} labels in {label_dir}: build them from COCO-Stuff with "
            f"`gclip data coco-object --data-root {data_root}`"
        )
    return [
        Sample(name, image_dir / f"{name}{spec.image_suffix}", label_dir / f"{name}{spec.label_suffix}")
        for name in names
    ]


def reduce_zero_label(label: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """0 -> ``ignore_index``, every other value minus one, ``ignore_index`` kept (as mmseg's loader)."""
    out = label.astype(np.int32) - 1
    out[label == 0] = ignore_index
    out[label == ignore_index] = ignore_index
    return out


def read_label(path: Path, spec: DatasetSpec | None = None) -> np.ndarray:
    """A label map as ``(H, W)`` int32 values, reduced when the spec says so, its background moved to class 0
    when the spec's is another (:func:`class_order`).

    Palettized (``P``) PNGs give their palette indices, grayscale ones and 16-bit TIFFs their values.

    Raises:
        DatasetError: the file is missing, unreadable, or not a single-channel label map.
    """
    if not path.is_file():
        raise DatasetError(f"label {path} does not exist")
    try:
        with Image.open(path) as img:
            if img.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise DatasetError(f"label {path} has image mode {img.mode}: expected a single-channel label map")
            label = np.asarray(img).astype(np.int32)
    except DatasetError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DatasetError(f"label {path} cannot be read ({reason})") from e
    if spec is not None and spec.reduce_zero_label:
        label = reduce_zero_label(label, spec.ignore_index)
    order = class_order(spec) if spec is not None else None
    if order is not None:  # the background first (values outside the classes are kept for the check)
        lut = np.arange(spec.num_classes)  # type: ignore[union-attr]
        lut[order] = np.arange(len(order))
        inside = (label >= 0) & (label < len(lut))
        label = np.where(inside, lut[np.clip(label, 0, len(lut) - 1)], label)
    return label

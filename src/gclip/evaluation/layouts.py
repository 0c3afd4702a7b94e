"""The eight benchmark datasets: where their files lie in the mmsegmentation layouts, and how to read them.

Each :class:`DatasetSpec` is plain data (folders, suffixes, split file, classes, ignore index,
``reduce_zero_label``); :func:`list_samples` turns a spec and a data root into ``(image, label)`` pairs
and :func:`read_label` reads a label map with PIL (palettized PNGs keep their indices).
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
    "get_dataset",
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

#: Column order of the tables: the seed paper's five sets, then the three with background.
PAPER_ORDER = ["voc20", "context59", "coco_stuff", "cityscapes", "ade20k", "voc21", "context60", "coco_object"]


def get_dataset(name: str) -> DatasetSpec:
    """The spec of a dataset by name (``-`` and ``_`` are interchangeable)."""
    key = name.strip().lower().replace("-", "_")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}: choose among {', '.join(PAPER_ORDER)}")
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


def class_names(spec: DatasetSpec) -> list[str]:
    """The dataset's own class names, one per scored class (for tables: not the prompts a protocol uses).

    >>> class_names(get_dataset("voc21"))[4], class_names(get_dataset("ade20k"))[44]
    ('boat', 'chest of drawers')
    """
    from importlib import resources

    path = resources.files("gclip") / "data" / "classes" / "clearclip" / spec.classes_file
    if not path.is_file():  # a set gclip has no class file for: no names
        return []
    lines = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    fixes = NAME_FIXES.get(spec.name, {})
    return [fixes.get(name, name) for name in (ln.split(",")[0].strip() for ln in lines)]


def _require_dir(path: Path, spec: DatasetSpec, what: str, sub: str) -> None:
    if not path.is_dir():
        raise DatasetMissing(
            f"{spec.name}: {what} folder {path} does not exist (expected the mmsegmentation layout "
            f"<data-root>/{spec.root}/{sub}; data: {spec.download})"
        )


def list_samples(spec: DatasetSpec, data_root: str | Path) -> list[Sample]:
    """The validation pairs of ``spec`` under ``data_root``, in a fixed order (split-file order, else sorted).

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
    if spec.split is not None:
        split = root / spec.split
        if not split.is_file():
            raise DatasetError(f"{spec.name}: split file {split} does not exist")
        names = [ln.strip() for ln in split.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        names = sorted(
            str(p.relative_to(image_dir))[: -len(spec.image_suffix)]
            for p in image_dir.rglob(f"*{spec.image_suffix}")
            if p.is_file()
        )
    if not names:
        raise DatasetError(f"{spec.name}: no images found under {image_dir}")
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
    """A label map as ``(H, W)`` int32 values, reduced when the spec says so.

    Palettized (``P``) PNGs give their palette indices, grayscale ones their values.

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
    return label

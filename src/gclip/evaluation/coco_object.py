"""COCO-Object labels from COCO-Stuff: the 80 thing classes become 1..80, the 91 stuff classes background 0.

COCO-Stuff-164k ``*_labelTrainIds.png`` holds train ids 0..170 (0..79 the things, in the order of
``cls_coco_object.txt`` after its background line; 80..170 the stuff) and 255 for unlabeled pixels.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.outputs import atomic_path
from .layouts import DATASETS, DatasetError, read_label

__all__ = ["COCO_THINGS", "stuff_to_object", "build_coco_object"]

COCO_THINGS = 80
_STUFF_SUFFIX = DATASETS["coco_stuff"].label_suffix
_OBJECT_SUFFIX = DATASETS["coco_object"].label_suffix


def stuff_to_object(label: np.ndarray) -> np.ndarray:
    """COCO-Stuff train ids -> COCO-Object ids (``uint8``): things ``t`` -> ``t + 1``, stuff -> 0, 255 kept.

    >>> stuff_to_object(np.array([0, 79, 80, 170, 255])).tolist()
    [1, 80, 0, 0, 255]
    """
    lut = np.full(256, 255, dtype=np.uint8)
    lut[:COCO_THINGS] = np.arange(1, COCO_THINGS + 1)
    lut[COCO_THINGS:171] = 0
    values = np.asarray(label)
    bad = (values < 0) | (values > 255) | ((values > 170) & (values != 255))
    if bad.any():
        raise ValueError(f"COCO-Stuff train ids must be 0..170 or 255, found {int(values[bad][0])}")
    return lut[values.astype(np.int64)]


def build_coco_object(
    data_root: str | Path,
    overwrite: bool = False,
    on_file: Callable[[Path], None] | None = None,
) -> tuple[int, int]:
    """Write ``*_instanceTrainIds.png`` beside every ``*_labelTrainIds.png`` of COCO-Stuff-164k val2017.

    Args:
        data_root: the folder holding ``coco_stuff164k``.
        overwrite: rewrite labels that exist already.
        on_file: called with each written path.

    Returns:
        ``(written, kept)`` counts.

    Raises:
        DatasetError: the annotation folder or its COCO-Stuff labels are missing, or a label is unreadable.
    """
    spec = DATASETS["coco_stuff"]
    folder = Path(data_root) / spec.root / spec.label_dir
    if not folder.is_dir():
        raise DatasetError(f"coco_object: {folder} does not exist (expected <data-root>/{spec.root}/{spec.label_dir})")
    sources = sorted(folder.glob(f"*{_STUFF_SUFFIX}"))
    if not sources:
        raise DatasetError(f"coco_object: no *{_STUFF_SUFFIX} files in {folder}")
    written = kept = 0
    for source in sources:
        target = source.with_name(source.name[: -len(_STUFF_SUFFIX)] + _OBJECT_SUFFIX)
        if target.exists() and not overwrite:
            kept += 1
            continue
        try:
            converted = stuff_to_object(read_label(source))
        except ValueError as e:
            raise DatasetError(f"{source}: {e}") from e
        with atomic_path(target) as tmp:
            Image.fromarray(converted, mode="L").save(tmp, format="PNG")
        written += 1
        if on_file is not None:
            on_file(target)
    return written, kept

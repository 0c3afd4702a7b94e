"""``gclip data check``: is a benchmark prepared as the protocol expects? A wrong score's most frequent cause.

For each set: the number of images against the full validation split, every image paired with a readable label,
label sizes equal to image sizes, label values within the set's range (after ``reduce_zero_label``: the scored
classes and the ignore value; the values found outside it, with their pixel counts), and image modes (a grayscale
file where the set's images are RGB: ``spec.image_modes``). The result is one line per set
(:meth:`SetCheck.verdict`); a set with a missing, unreadable or mismatched label or out-of-range values is broken,
and ``gclip eval`` refuses it with that line (a count below the full split and grayscale images are reported, not
refused: ``--limit`` and COCO's few grayscale photos are legitimate).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .layouts import DatasetError, DatasetMissing, DatasetSpec, Sample, list_samples, read_label

__all__ = ["SetCheck", "check_dataset", "check_samples", "EXPECTED_IMAGES"]

EXPECTED_IMAGES = {
    "voc21": 1449,
    "voc20": 1449,
    "context60": 5105,
    "context59": 5105,
    "coco_stuff": 5000,
    "coco_object": 5000,
    "cityscapes": 500,
    "ade20k": 2000,
    "ade847": 2000,  # ADE20K_2021_17_01's validation images
    "context459": 5104,  # CAT-Seg's pascalcontext_val.txt
    "loveda": 1669,  # Val.zip: 677 urban + 992 rural tiles
    "isaid": 11644,  # 896 x 896 patches, overlap 384 (SegEarth-OV's dataset_prepare.md)
    "potsdam": 2016,  # 512 x 512 clips, stride 256, 14 tiles (dataset_prepare.md)
    "vaihingen": 398,  # 512 x 512 clips, stride 256, 17 areas (dataset_prepare.md)
    "inria": 675,  # 27 split_test tiles of 5000 x 5000 in 1000 x 1000 clips
    "deepglobe": 1530,  # GlobalRoadSet_Val's DeepGlobe_test_1530
    "massachusetts": 49,  # Massachusetts_test_49
    "spacenet": 567,  # SpaceNet_test_567
    "wbs_si": 499,  # SegEarth-OV's wbs-si_val.txt
    # MESS: mess/prepare_all_datasets.py's expected_dataset_length (the four PAXRay sets share their 180 images)
    "mess_bdd100k": 1000,
    "mess_dark_zurich": 50,
    "mess_mhp_v1": 980,
    "mess_foodseg103": 2125,
    "mess_atlantis": 1295,
    "mess_dram": 718,
    "mess_isaid": 4055,  # 1024 x 1024 tiles, zero-padded (labels padded with 255)
    "mess_isprs_potsdam": 504,
    "mess_worldfloods": 160,
    "mess_floodnet": 5571,
    "mess_uavid": 840,
    "mess_kvasir_instrument": 118,
    "mess_chase_db1": 20,
    "mess_cryonuseg": 30,
    **{f"mess_paxray_{part}": 180 for part in ("lungs", "bones", "mediastinum", "diaphragm")},
    "mess_corrosion_cs": 44,
    "mess_deepcrack": 237,
    "mess_pst900": 288,
    "mess_zerowaste": 929,
    "mess_suim": 110,
    "mess_cub_200": 5794,
    "mess_cwfid": 21,
}
"""Images in each set's full validation split (the count every paper scores; a set not listed is not counted:
the conversion scripts do not say their output counts)."""

_EXAMPLES = 3


@dataclasses.dataclass
class SetCheck:
    """What :func:`check_samples` found in one set.

    Attributes:
        spec: the set; images: images checked; expected: images in its full validation split (``None``: unknown).
        missing: (image, reason) for labels that are missing or cannot be read.
        sizes: (image, "image WxH, label WxH") for labels of another size than their image.
        values: ``{value: pixels}`` of label values outside the set's range; value_files: the images holding them.
        modes: (image, mode) of images in another mode than the set's (``spec.image_modes``: RGB for most).
        folders: the reason the set's folders cannot be listed at all (missing folder or split file); absent: the
            set's folders are not under the data root at all.
    """

    spec: DatasetSpec
    images: int = 0
    expected: int | None = None
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    sizes: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    values: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    value_files: list[str] = dataclasses.field(default_factory=list)
    modes: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    folders: str = ""
    absent: bool = False

    @property
    def broken(self) -> bool:
        """A label missing, unreadable or of another size, values out of range, or no folders at all."""
        return bool(self.folders or self.missing or self.sizes or self.values)

    def problems(self) -> list[str]:
        """The faults and notices, most harmful first, each with a few example images."""

        def some(items: Sequence[str]) -> str:
            shown = ", ".join(items[:_EXAMPLES])
            return shown + (", ..." if len(items) > _EXAMPLES else "")

        out = []
        if self.folders:
            out.append(self.folders)
        if self.missing:
            out.append(
                f"{len(self.missing)} labels missing or unreadable ({some([f'{n}: {r}' for n, r in self.missing])})"
            )
        if self.sizes:
            out.append(
                f"{len(self.sizes)} labels not the size of their image ({some([f'{n}: {r}' for n, r in self.sizes])})"
            )
        if self.values:
            found = ", ".join(f"{v} ({c:,} px)" for v, c in sorted(self.values.items())[:8])
            valid = f"0..{self.spec.num_classes - 1}" + (
                f" and {self.spec.ignore_index}" if self.spec.ignore_written else " (labels left at 0/255?)"
            )
            out.append(
                f"label values outside {valid}: {found} in {len(self.value_files)} images ({some(self.value_files)})"
            )
        if self.modes:
            expected = " or ".join(self.spec.image_modes)
            out.append(f"{len(self.modes)} images not {expected} ({some([f'{n}: {m}' for n, m in self.modes])})")
        if self.expected is not None and self.images != self.expected and not self.folders:
            out.append(f"{self.images:,} images where the full validation split has {self.expected:,}")
        return out

    def verdict(self) -> str:
        """One line: ``<set>: OK (N images checked)``, ``OK with notices: ...``, ``BROKEN: ...`` or ``MISSING: ...``."""
        problems = self.problems()
        head = "MISSING" if self.absent else "BROKEN" if self.broken else ("OK with notices" if problems else "OK")
        line = f"{self.spec.name}: {head} ({self.images:,} images checked)"
        return line + (": " + "; ".join(problems) if problems else "")


def check_samples(
    spec: DatasetSpec, samples: Sequence[Sample], workers: int = 4, expected: int | None = None
) -> SetCheck:
    """Check every pair of ``samples`` (module docstring); ``workers`` threads read the files."""
    result = SetCheck(spec, images=len(samples), expected=expected)
    valid = np.zeros(max(spec.num_classes, spec.ignore_index) + 1, dtype=bool)
    valid[: spec.num_classes] = True
    valid[spec.ignore_index] = spec.ignore_written

    def one(sample: Sample) -> Callable[[SetCheck], None]:
        try:
            with Image.open(sample.image) as img:
                size, mode = img.size, img.mode
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            reason = (str(e).splitlines() or [type(e).__name__])[0]
            return lambda r: r.missing.append((sample.name, f"image unreadable ({reason})"))
        try:
            label = read_label(sample.label, spec)
        except DatasetError as e:
            reason = "missing" if not sample.label.is_file() else str(e).split(f"{sample.label} ", 1)[-1]
            return lambda r: r.missing.append((sample.name, reason))
        found = []
        if (label.shape[1], label.shape[0]) != size:
            mismatch = f"image {size[0]}x{size[1]}, label {label.shape[1]}x{label.shape[0]}"
            found.append(lambda r: r.sizes.append((sample.name, mismatch)))
        inside = (label >= 0) & (label < len(valid))
        bad = ~inside
        bad[inside] = ~valid[label[inside]]
        if bad.any():
            counts = collections.Counter(dict(zip(*np.unique(label[bad], return_counts=True))))

            def values(r: SetCheck) -> None:
                r.values.update({int(k): int(v) for k, v in counts.items()})
                r.value_files.append(sample.name)

            found.append(values)
        if mode not in spec.image_modes:
            found.append(lambda r: r.modes.append((sample.name, mode)))
        return lambda r: [f(r) for f in found]

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for record in pool.map(one, samples):  # in sample order: the examples are the first faulty files
            record(result)
    return result


def check_dataset(spec: DatasetSpec, data_root: str | Path, limit: int | None = None, workers: int = 4) -> SetCheck:
    """:func:`check_samples` on a set's layout under ``data_root`` (the first ``limit`` images; the count is then
    compared with ``limit``)."""
    try:
        samples = list_samples(spec, data_root)
    except DatasetMissing as e:
        return SetCheck(spec, folders=str(e).split(": ", 1)[-1], absent=True)
    except DatasetError as e:
        return SetCheck(spec, folders=str(e).split(": ", 1)[-1])
    expected = EXPECTED_IMAGES.get(spec.name)
    if limit is not None:
        samples = samples[:limit]
        expected = min(limit, expected) if expected is not None else None
    return check_samples(spec, samples, workers, expected)

"""Writing one image's outputs (label PNG, overlay, COCO RLE JSON, per-image JSON) and its manifest record."""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError, OutputError
from ..inference.result import SegmentationResult
from .inputs import InputItem
from .outputs import result_record, write_json, write_label_png, write_legend, write_overlay, write_rle_json

__all__ = [
    "FORMATS",
    "FILE_SUFFIXES",
    "parse_formats",
    "settings_hash",
    "OutputWriter",
    "clean_stale_tmp",
    "check_output_folder",
]

#: Output file of each per-image format, as a suffix of the item's key.
FILE_SUFFIXES = {
    "png": ".png",
    "overlay": ".overlay.png",
    "legend": ".legend.png",
    "rle": ".rle.json",
    "json": ".json",
}
#: Every format: the per-image files and the run's JSON-lines ``manifest``.
FORMATS = (*FILE_SUFFIXES, "manifest")
_TMP = re.compile(r"^\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp$")


def parse_formats(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"png,overlay"`` or ``["png", "overlay"]`` -> the formats, in :data:`FORMATS` order.

    Raises:
        ConfigError: an unknown or empty format list.
    """
    names = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    unknown = sorted(set(names) - set(FORMATS))
    if unknown or not names:
        raise ConfigError(f"unknown output format {unknown[0]!r}" if unknown else "no output format given")
    return tuple(f for f in FORMATS if f in names)


def settings_hash(description: dict[str, Any]) -> str:
    """A short stable hash of everything that determines the labels (model, method, settings, classes)."""
    text = json.dumps(description, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


@dataclass
class OutputWriter:
    """Writes the per-image files of a run under ``out``; picklable, so Ray actors can use it too.

    Attributes:
        out: output root; an item with key ``a/x`` gets ``out/a/x.png``, ``out/a/x.overlay.png`` ...
        formats: the formats of the run (see :data:`FORMATS`).
        description: ``Segmenter.describe()`` plus the class names; hashed into the manifest.
        overlay_alpha: opacity of the colours in overlays.
        weights: the weights files of the run (:func:`gclip.backbones.weights_used`), written into the per-image
            JSON and the manifest (not hashed: a copy of the same file elsewhere gives the same labels).
        recipe_hash: a hash of how the Segmenter was asked for (model name, weights file identity, method,
            settings, classes), known before the model loads; recorded so that a rerun with nothing to do can
            tell without loading it (``None``: not recorded).
    """

    out: Path
    formats: tuple[str, ...]
    description: dict[str, Any]
    overlay_alpha: float = 0.5
    weights: dict[str, Any] | None = None
    recipe_hash: str | None = None

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.formats = parse_formats(self.formats)
        self.hash = settings_hash(self.description)

    @property
    def needs_image(self) -> bool:
        """Overlays need the decoded RGB image."""
        return "overlay" in self.formats

    @property
    def needs_probs(self) -> bool:
        """RLE records carry each class's mean probability."""
        return "rle" in self.formats

    def paths(self, item: InputItem) -> dict[str, Path]:
        """The files of one item, by format."""
        return {f: self.out / (item.key + FILE_SUFFIXES[f]) for f in self.formats if f in FILE_SUFFIXES}

    def files_exist(self, item: InputItem) -> bool:
        """Whether every per-image file of ``item`` exists (each was renamed into place whole)."""
        return all(p.is_file() for p in self.paths(item).values())

    def write(
        self, item: InputItem, result: SegmentationResult, image: np.ndarray | None = None, seconds: float = 0.0
    ) -> dict[str, Any]:
        """Write every per-image file of ``item`` (each atomically) and return its manifest record."""
        paths = self.paths(item)
        names, background = result.class_names, result.background
        if "png" in paths:
            write_label_png(result.labels, paths["png"], background)
        if "overlay" in paths:
            if image is None:
                raise ValueError("the overlay format needs the decoded image")
            write_overlay(image, result.labels, names, paths["overlay"], self.overlay_alpha, background)
        if "legend" in paths:
            write_legend(result.labels, names, paths["legend"], background)
        if "rle" in paths:
            write_rle_json(result, paths["rle"], image=item.name)
        if "json" in paths:
            record = {"image": item.name, **result_record(result), "settings": self.description}
            write_json({**record, "weights": self.weights}, paths["json"])
        return self.record(item, result, seconds)

    def record(self, item: InputItem, result: SegmentationResult, seconds: float) -> dict[str, Any]:
        """The manifest line of one segmented image."""
        return {
            "path": item.name,
            "key": item.key,
            "size": list(result.size),
            "classes": {k: round(v, 6) for k, v in result.class_fractions().items()},
            "model": self.description.get("model"),
            "method": self.description.get("method"),
            "settings_hash": self.hash,
            "weights": self.weights,
            **({"recipe_hash": self.recipe_hash} if self.recipe_hash else {}),
            "seconds": round(seconds, 4),
        }

    def failure(self, item: InputItem, message: str) -> dict[str, Any]:
        """The manifest line of an image that could not be segmented."""
        return {"path": item.name, "key": item.key, "error": message, "settings_hash": self.hash}


def check_output_folder(out: str | Path) -> Path:
    """Create the output folder when missing and make sure files can be created in it, before any work is done.

    Raises:
        OutputError: ``out`` is a file, or cannot be created or written in (read-only, no permission, full).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"the output folder {out} is a file: give a folder (a missing one is created)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gclip-write-test.", suffix=".tmp", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(f"cannot write in the output folder {out} ({e.strerror or e})") from e
    return out


def clean_stale_tmp(out: Path, targets: Iterable[Path]) -> int:
    """Delete temporary files left by killed runs (``.<name>.XXXX.tmp``) whose target is in ``targets``.

    Only temporaries of this run's own outputs are removed, so shards writing into the same folder at the
    same time do not disturb each other. Returns how many were removed.
    """
    wanted = {os.path.abspath(t) for t in targets}
    removed = 0
    if not Path(out).is_dir():
        return 0
    for parent, _, files in os.walk(out):
        for f in files:
            match = _TMP.match(f)
            if match and os.path.abspath(os.path.join(parent, match["name"])) in wanted:
                try:
                    Path(parent, f).unlink(missing_ok=True)
                except OSError as e:
                    raise OutputError(f"cannot remove the stale temporary {Path(parent, f)} ({e.strerror or e})") from e
                removed += 1
    return removed

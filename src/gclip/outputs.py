"""Writing results: palettized label PNGs and JSON, always through a temporary name and a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .result import SegmentationResult

__all__ = ["palette", "atomic_path", "write_label_png", "write_json", "read_label_png"]


def palette(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 colours: the PASCAL VOC bit-interleaving colour map (0 is black)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_label_png(labels: np.ndarray, path: str | Path) -> Path:
    """Save ``(H, W)`` labels as a PNG: palettized (mode ``P``) when they fit 8 bits, else 16-bit grayscale."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("labels must be within 0..65535")
    if labels.max(initial=0) < 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(palette(256).flatten().tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint16))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def read_label_png(path: str | Path) -> np.ndarray:
    """Labels back from :func:`write_label_png` (palette indices, not colours)."""
    with Image.open(path) as img:
        return np.asarray(img).astype(np.int32)


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically (UTF-8, indented)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)


def result_record(result: SegmentationResult) -> dict[str, Any]:
    """The JSON written beside a label PNG."""
    return {
        "size": list(result.size),
        "class_names": result.class_names,
        "present": {k: round(v, 6) for k, v in result.class_fractions().items()},
    }

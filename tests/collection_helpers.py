"""Helpers shared by the collection tests: synthetic photos and the tiny segmenter's settings."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASSES = ["cat", "dog", "sky", "grass"]
#: Small windows so the tiny model sees several per image.
SETTINGS = {"short_side": 0, "crop": 32, "stride": 16}
CLI_SETTINGS = ["--short-side", "0", "--crop", "32", "--stride", "16"]


def synthetic_image(seed: int, size: tuple[int, int] = (40, 52)) -> np.ndarray:
    """``HxWx3 uint8``: smooth colour blobs plus noise, different for each seed."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(6 * xx * rng.uniform(0.5, 2) + c) for c in rng.uniform(0, 6, 3)], axis=-1)
    noise = rng.normal(0, 0.2, (h, w, 3))
    return np.clip((base + noise + 1) * 127.5, 0, 255).astype(np.uint8)


def write_images(root: Path, names: list[str], size: tuple[int, int] = (40, 52)) -> list[Path]:
    """Write one synthetic JPEG/PNG per relative name under ``root``."""
    paths = []
    for seed, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synthetic_image(seed, size)).save(path)
        paths.append(path)
    return paths

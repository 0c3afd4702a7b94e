"""Reading images into ``HxWx3 uint8 RGB`` arrays: EXIF orientation, odd modes, bombs and broken files."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps

from ..errors import ImageError

__all__ = ["ImageInput", "load_image", "DEFAULT_MAX_PIXELS"]

ImageInput = Union[str, Path, Image.Image, np.ndarray]
DEFAULT_MAX_PIXELS = 200_000_000


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        gray = np.clip(np.round(arr / top * 255.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if img.mode != "RGB":
        img = img.convert("RGBA").convert("RGB") if "transparency" in img.info else img.convert("RGB")
    return np.array(img, dtype=np.uint8)


def _from_array(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageError(f"image array has shape {arr.shape}: expected HxWx3 (RGB), HxWx4 or HxW")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype == np.uint16:
        arr = np.round(arr / 257.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"image array has dtype {arr.dtype}: expected uint8 (or uint16)")
    return np.ascontiguousarray(arr)


def load_image(image: ImageInput | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, name: str | None = None) -> np.ndarray:
    """Any supported image -> ``HxWx3 uint8 RGB``.

    Args:
        image: a file path, encoded file bytes, a PIL image, or a numpy array (``HxWx3`` RGB / ``HxWx4`` /
            ``HxW``, uint8 or uint16).
        max_pixels: images declaring more pixels are refused (decompression-bomb guard).
        name: how error messages name the image (default: its path, or "image").

    Raises:
        ImageError: the file is missing, not an image, truncated, empty, or too large.
    """
    if isinstance(image, np.ndarray):
        arr = _from_array(image)
    else:
        name = name or (str(image) if isinstance(image, (str, Path)) else "image")
        try:
            if isinstance(image, bytes):
                if not image:
                    raise ImageError(f"{name}: empty file (0 bytes)")
                img = Image.open(io.BytesIO(image))
            elif isinstance(image, (str, Path)):
                path = Path(image)
                if not path.is_file():
                    raise ImageError(f"{path}: no such file")
                if path.stat().st_size == 0:
                    raise ImageError(f"{path}: empty file (0 bytes)")
                img = Image.open(path)
            else:
                img = image
            w, h = img.size
            if w * h > max_pixels:
                raise ImageError(f"{name}: {w}x{h} is {w * h:,} pixels, above the limit of {max_pixels:,}")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            arr = _to_rgb(img)
        except ImageError:
            raise
        except Image.DecompressionBombError as e:
            raise ImageError(f"{name}: refused as a decompression bomb ({e})") from e
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            reason = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise ImageError(f"{name}: cannot decode image ({reason})") from e
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"image has zero size {arr.shape[:2]}")
    return arr

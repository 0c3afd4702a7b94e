"""Resizing, sliding-window tiling and padding: the geometry shared by every method."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "rescale_size",
    "resize_image",
    "normalise",
    "preprocess",
    "single_threaded_opencv",
    "window_boxes",
    "pad_sizes",
]


def rescale_size(h: int, w: int, short_side: int, max_long_side: int) -> tuple[int, int]:
    """mmcv's keep-ratio rescale: the short side becomes ``short_side`` unless the long side would pass
    ``max_long_side``. ``short_side <= 0`` keeps the size.

    >>> rescale_size(375, 500, 448, 2048)
    (448, 597)
    """
    if short_side <= 0:
        return h, w
    scale = min(max_long_side / max(h, w), short_side / min(h, w))
    return int(h * scale + 0.5), int(w * scale + 0.5)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resize of an ``HxWxC uint8`` image to ``size = (h, w)``, exactly as mmcv/mmseg's ``Resize``
    does it: OpenCV's ``INTER_LINEAR`` (half-pixel centres, no antialias, fixed-point weights).

    The result is bit-identical to the peers' preprocessing and does not depend on the number of threads
    (a float resize rounded to 8 bits did: a few values per image changed by one with the thread count).
    OpenCV runs single-threaded (see :func:`single_threaded_opencv`).
    """
    if tuple(image.shape[:2]) == tuple(size):
        return image
    cv2 = single_threaded_opencv()
    return cv2.resize(np.ascontiguousarray(image), (int(size[1]), int(size[0])), interpolation=cv2.INTER_LINEAR)


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``HxWx3 uint8 RGB`` -> ``(3, H, W)`` float32 ``(x / 255 - mean) / std`` (``mean``/``std`` on the 0..1 scale)."""
    tensor = torch.from_numpy(image).permute(2, 0, 1).to(torch.float32, memory_format=torch.contiguous_format)
    scale = 255.0
    return tensor.sub_(torch.tensor(mean).view(3, 1, 1) * scale).div_(torch.tensor(std).view(3, 1, 1) * scale)


def preprocess(
    image: np.ndarray, short_side: int, max_long_side: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """The protocol's input: ``HxWx3 uint8 RGB`` resized (:func:`rescale_size`, :func:`resize_image`) and
    normalised (:func:`normalise`) -> ``(3, h, w)`` float32."""
    h, w = image.shape[:2]
    return normalise(resize_image(image, rescale_size(h, w, short_side, max_long_side)), mean, std)


def single_threaded_opencv():
    """Switch OpenCV (process-wide) to one thread and return the ``cv2`` module.

    Called before decoding workers are forked and at every resize: a forked copy of a running OpenCV thread
    pool hangs at its first use, and the workers, not OpenCV's threads, are the parallelism here (a resize of
    a VOC image takes about half a millisecond on one thread).
    """
    import cv2

    if cv2.getNumThreads() != 1:
        cv2.setNumThreads(1)
    return cv2


def window_boxes(h: int, w: int, crop: int, stride: int) -> list[tuple[int, int, int, int]]:
    """mmseg-style sliding windows ``(y1, y2, x1, x2)`` covering an ``h x w`` image.

    Windows are ``crop`` square, ``stride`` apart, the last row/column shifted back to end at the border;
    an image smaller than the crop gives windows clipped to the image. ``crop <= 0`` gives one window.
    """
    if crop <= 0:
        return [(0, h, 0, w)]
    rows = max(h - crop + stride - 1, 0) // stride + 1
    cols = max(w - crop + stride - 1, 0) // stride + 1
    boxes = []
    for r in range(rows):
        for c in range(cols):
            y2 = min(r * stride + crop, h)
            x2 = min(c * stride + crop, w)
            boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
    return boxes


def pad_sizes(h: int, w: int, patch: int) -> tuple[int, int, int, int]:
    """Zero padding ``(left, right, top, bottom)`` that makes ``h x w`` a multiple of ``patch``, split
    symmetrically (the extra pixel of an odd pad goes right/bottom)."""
    ph = math.ceil(h / patch) * patch - h
    pw = math.ceil(w / patch) * patch - w
    return pw // 2, pw - pw // 2, ph // 2, ph - ph // 2

"""Resizing, sliding-window tiling and padding: the geometry shared by every method."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["rescale_size", "resize_image", "window_boxes", "pad_sizes"]


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


def resize_image(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``(3, H, W)`` 0..255 values (no antialias, half-pixel centres), rounded to integers
    as an 8-bit resize would give."""
    if tuple(image.shape[-2:]) == tuple(size):
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bilinear", align_corners=False)[0]
    return out.round_().clamp_(0, 255)


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

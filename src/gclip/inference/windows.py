"""Resizing, sliding-window tiling and padding: the geometry shared by every method and every path."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "rescale_size",
    "resize_image",
    "single_threaded_opencv",
    "window_boxes",
    "pad_sizes",
    "Window",
    "plan_windows",
    "ImageWindows",
    "tile",
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


Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Window:
    """One window of an image and where its logits go.

    Attributes:
        box: ``(y1, y2, x1, x2)`` of the window on the (resized) model input.
        pads: zero padding ``(left, right, top, bottom)`` that makes the window a patch multiple.
        out_size: ``(H, W)`` the window's patch logits are upsampled to (bilinear).
        keep: ``(top, h, left, w)``: the part of the upsampled logits that is kept.
        target: ``(y1, y2, x1, x2)`` where the kept logits are added on the canvas.
    """

    box: Box
    pads: tuple[int, int, int, int]
    out_size: tuple[int, int]
    keep: tuple[int, int, int, int]
    target: Box

    @property
    def shape(self) -> tuple[int, int]:
        """The crop's ``(h, w)`` before padding (windows of one shape share forward passes)."""
        return self.box[1] - self.box[0], self.box[3] - self.box[2]


def plan_windows(
    size: tuple[int, int], original: tuple[int, int], crop: int, stride: int, padding: str, patch: int
) -> tuple[tuple[int, int], list[Window]]:
    """The windows of one image and the size of the canvas they are averaged on.

    Sliding windows (``crop > 0``, the mmseg ``slide`` mode): :func:`window_boxes` on the model input of
    ``size``; with ``padding="symmetric"`` each window is zero-padded to a patch multiple and the pad is cut
    from its logits upsampled to the padded window (ClearCLIP), with ``"none"`` the pixels past the last whole
    patch are ignored and the logits stretched over the window (SCLIP, NACLIP). The canvas has the model
    input's size and is resized to ``original`` afterwards.

    Whole image (``crop <= 0``, the ``whole`` mode of ClearCLIP, SCLIP and NACLIP): one unpadded window whose
    patch logits are resized once, straight to the ``original`` size, which is then the canvas size.

    Returns:
        ``(canvas size, windows)``.
    """
    h, w = size
    if crop <= 0:
        full = (0, original[0], 0, original[1])
        return tuple(original), [Window((0, h, 0, w), (0, 0, 0, 0), tuple(original), full, full)]
    windows = []
    for box in window_boxes(h, w, crop, stride):
        y1, y2, x1, x2 = box
        ch, cw = y2 - y1, x2 - x1
        pads = pad_sizes(ch, cw, patch) if padding == "symmetric" else (0, 0, 0, 0)
        left, right, top, bottom = pads
        windows.append(Window(box, pads, (ch + top + bottom, cw + left + right), (top, ch, left, cw), box))
    return (h, w), windows


@dataclass
class ImageWindows:
    """All windows of one image, cut, padded and stacked: what a method that sees the windows of an image
    together (``window_mode = "image"``) works on. Built by :func:`tile`.

    Attributes:
        image: the ``(1, C, H, W)`` model input the windows are cut from.
        crop, stride: the sliding-window settings they were cut with.
        boxes: per window ``(y1, y2, x1, x2)`` on ``image`` (:func:`window_boxes`).
        pads: per window its zero padding ``(left, right, top, bottom)`` to a multiple.
        crops: ``(B, C, h, w)`` the padded windows (one shape: :func:`window_boxes` cuts every window of an image
            to ``min(crop, side)``, and so they all pad alike).
    """

    image: torch.Tensor
    crop: int
    stride: int
    boxes: list[Box]
    pads: list[tuple[int, int, int, int]]
    crops: torch.Tensor

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)`` of the image."""
        return int(self.image.shape[-2]), int(self.image.shape[-1])

    def cut(self, data: torch.Tensor, value: float = 0.0) -> torch.Tensor:
        """The same windows of a per-image ``(..., H, W)`` map (e.g. an instance mask), padded with ``value``
        -> ``(B, ..., h, w)``."""
        return torch.stack(
            [F.pad(data[..., y1:y2, x1:x2], pad, value=value) for (y1, y2, x1, x2), pad in zip(self.boxes, self.pads)]
        )

    def merge(self, outputs: torch.Tensor) -> torch.Tensor:
        """Average per-window ``(B, C, h', w')`` outputs over the image -> ``(C, H * s, W * s)``.

        ``s = w' / w`` is the outputs' scale against the padded windows (1 for pixel-level logits, ``r / patch``
        for patch features at ``r`` cells a patch); each window's padding is cut at that scale and the rest is
        added where its box lies, then every cell is divided by the number of windows that cover it.
        """
        scale = outputs.shape[-1] / self.crops.shape[-1]
        if outputs.shape[-2] / self.crops.shape[-2] != scale:
            shapes = f"{tuple(outputs.shape[-2:])} and {tuple(self.crops.shape[-2:])}"
            raise ValueError(f"window outputs and windows differ in aspect: {shapes}")

        def at(v: int) -> int:
            scaled = v * scale
            if scaled != int(scaled):
                raise ValueError(f"window edge {v} does not fall on the outputs' grid (scale {scale})")
            return int(scaled)

        h, w = self.size
        canvas = outputs.new_zeros((outputs.shape[1], at(h), at(w)))
        count = outputs.new_zeros((1, at(h), at(w)))
        for (y1, y2, x1, x2), (left, _, top, _), window in zip(self.boxes, self.pads, outputs):
            rows, cols = slice(at(y1), at(y2)), slice(at(x1), at(x2))
            canvas[:, rows, cols] += window[:, at(top) : at(top) + at(y2 - y1), at(left) : at(left) + at(x2 - x1)]
            count[:, rows, cols] += 1
        return canvas / count


def tile(image: torch.Tensor, crop: int, stride: int, multiple: int = 1, padding: str = "symmetric") -> ImageWindows:
    """The sliding windows of a ``(1, C, H, W)`` model input (:func:`window_boxes`), each zero-padded
    symmetrically to a multiple of ``multiple`` (``padding="symmetric"``) or cut as they are (``"none"``; the
    caller makes the sizes multiples)."""
    h, w = int(image.shape[-2]), int(image.shape[-1])
    boxes = window_boxes(h, w, crop, stride)
    pads = [
        pad_sizes(y2 - y1, x2 - x1, multiple) if padding == "symmetric" else (0, 0, 0, 0) for y1, y2, x1, x2 in boxes
    ]
    crops = torch.cat([F.pad(image[..., y1:y2, x1:x2], pad) for (y1, y2, x1, x2), pad in zip(boxes, pads)])
    return ImageWindows(image, crop, stride, boxes, pads, crops)

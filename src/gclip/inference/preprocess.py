"""The one preprocessor: decode, resize (mmcv's keep-ratio rescale) and normalise, picklable without the model.

The Segmenter owns one (:attr:`gclip.Segmenter.preprocessor`); the local engine's decoding workers, the Ray
tasks, the evaluation loader, the benchmark and the backbone inspection all use it, so every path feeds the
model the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..io.images import DEFAULT_MAX_PIXELS, ImageInput, load_image
from .windows import rescale_size, resize_image

__all__ = ["Prepared", "Preprocessor", "pixel_constants", "normalise", "OPENAI_MEAN", "OPENAI_STD"]

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The peers' data preprocessors (SCLIP, ClearCLIP, NACLIP and their descendants) write OpenAI CLIP's constants
# on the 0..255 scale with three decimals; 255 * OPENAI_MEAN differs from them by up to 1.4e-5, which flips a
# few near-tie pixels. Those exact values are used whenever a model's constants are OpenAI's.
PEER_MEAN_255 = (122.771, 116.746, 104.094)
PEER_STD_255 = (68.501, 66.632, 70.323)


@dataclass
class Prepared:
    """An image decoded, resized and normalised (the CPU half of inference; picklable for workers).

    Attributes:
        image: ``(3, h, w)`` float32 normalised tensor at the inference resolution.
        size: ``(H, W)`` of the original image.
        key: caller's identifier (e.g. the path), passed through to the result.
        original: the decoded ``HxWx3 uint8 RGB`` pixels, kept only for methods that look at them again
            (:attr:`gclip.methods.Method.needs_original`, e.g. Trident's SAM), else ``None``.
    """

    image: torch.Tensor
    size: tuple[int, int]
    key: Any = None
    original: np.ndarray | None = None


def pixel_constants(mean: Sequence[float], std: Sequence[float]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std (0..1 scale, RGB) -> the constants on the 0..255 scale the pixels are normalised with.

    >>> pixel_constants((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))[0]
    (122.771, 116.746, 104.094)
    >>> pixel_constants((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))[0]
    (127.5, 127.5, 127.5)
    """
    if np.allclose(mean, OPENAI_MEAN, rtol=0, atol=1e-7) and np.allclose(std, OPENAI_STD, rtol=0, atol=1e-7):
        return PEER_MEAN_255, PEER_STD_255
    return tuple(float(m) * 255.0 for m in mean), tuple(float(s) * 255.0 for s in std)


def normalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """``HxWx3 uint8 RGB`` -> ``(3, H, W)`` float32 ``(x - mean) / std`` with :func:`pixel_constants`
    (``mean``/``std`` given on the 0..1 scale)."""
    mean_255, std_255 = pixel_constants(mean, std)
    array = np.ascontiguousarray(image)
    if not array.flags.writeable:  # e.g. np.asarray of a PIL image: torch wants a writable buffer
        array = array.copy()
    tensor = torch.from_numpy(array).permute(2, 0, 1).to(torch.float32)
    tensor = tensor.contiguous()
    return tensor.sub_(torch.tensor(mean_255).view(3, 1, 1)).div_(torch.tensor(std_255).view(3, 1, 1))


@dataclass(frozen=True)
class Preprocessor:
    """Decode -> keep-ratio resize -> normalise, as the protocol does it. Holds no model: pickles into workers.

    Attributes:
        short_side, max_long_side, max_pixels: as in :class:`gclip.Settings`.
        mean, std: the model's normalisation (0..1 scale, RGB).
        keep_original: also keep the decoded pixels in :attr:`Prepared.original`.
    """

    short_side: int = 448
    max_long_side: int = 2048
    max_pixels: int = DEFAULT_MAX_PIXELS
    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    keep_original: bool = False

    def decode(self, image: ImageInput) -> np.ndarray:
        """A path, bytes, PIL image or array -> ``HxWx3 uint8 RGB`` (one-line :class:`~gclip.errors.ImageError`)."""
        return load_image(image, self.max_pixels)

    def transform(self, array: np.ndarray) -> torch.Tensor:
        """``HxWx3 uint8 RGB`` -> the ``(3, h, w)`` float32 model input."""
        h, w = array.shape[:2]
        resized = resize_image(array, rescale_size(h, w, self.short_side, self.max_long_side))
        return normalise(resized, self.mean, self.std)

    def pack(self, array: np.ndarray, normalised: torch.Tensor, image: ImageInput, key: Any = None) -> Prepared:
        """The :class:`Prepared` record of a decoded ``array`` and its model input (``key``: default ``image``)."""
        original = array if self.keep_original else None
        return Prepared(normalised, array.shape[:2], key if key is not None else image, original)

    def __call__(self, image: ImageInput, key: Any = None) -> Prepared:
        array = self.decode(image)
        return self.pack(array, self.transform(array), image, key)

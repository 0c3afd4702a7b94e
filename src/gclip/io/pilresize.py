"""Pillow's 8-bit bicubic ``Image.resize`` on batched tensors, value for value.

Some authors' code sends a crop through PIL before their second model (CASS: ``Image.fromarray(...).resize``).
torch's own uint8 antialiased bicubic differs from Pillow by one grey level on ~0.3% of the values, so the
reference is reproduced here: Pillow's separable passes (horizontal first) with its filter support, its
coefficients normalised per output pixel and rounded to 22-bit fixed point, its rounding and clipping after each
pass. The fixed-point sums are exact in float64, so the result is identical on any device.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = ["pil_bicubic_resize"]

_PRECISION_BITS = 22  # Pillow's 32 - 8 - 2 for 8-bit images
_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel (a = -0.5)."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _weights(in_size: int, out_size: int) -> np.ndarray:
    """``(in_size, out_size)`` integer-valued fixed-point weights of one pass (Pillow's ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc``)."""
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _SUPPORT * filterscale
    weights = np.zeros((in_size, out_size), dtype=np.float64)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(math.trunc(center - support + 0.5), 0)
        xmax = min(math.trunc(center + support + 0.5), in_size)
        taps = np.arange(xmin, xmax)
        k = _bicubic((taps - center + 0.5) / filterscale)
        total = k.sum()
        if total != 0.0:
            k = k / total
        fixed = k * (1 << _PRECISION_BITS)
        weights[taps, xx] = np.trunc(np.where(k < 0, fixed - 0.5, fixed + 0.5))
    return weights


def _pass(pixels: torch.Tensor, out_size: int, dim: int) -> torch.Tensor:
    in_size = pixels.shape[dim]
    w = torch.from_numpy(_weights(in_size, out_size)).to(pixels.device)
    moved = pixels.movedim(dim, -1).double()
    acc = moved @ w + float(1 << (_PRECISION_BITS - 1))
    out = torch.floor(acc / float(1 << _PRECISION_BITS)).clamp_(0, 255)
    return out.movedim(-1, dim)


def pil_bicubic_resize(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``(..., H, W)`` integer pixel values (0..255, any float or integer dtype) -> ``(..., h, w)`` as Pillow's
    ``Image.resize((w, h), Image.BICUBIC)`` gives them, as float32 with integer values."""
    h, w = int(size[0]), int(size[1])
    out = pixels
    if out.shape[-1] != w:
        out = _pass(out, w, -1)
    if out.shape[-2] != h:
        out = _pass(out, h, -2)
    return out.float()

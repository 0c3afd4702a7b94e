"""Measuring a backbone: per-block token norms and where high-norm (global) tokens emerge.

GCLIP's ``emerging_blocks="auto"`` uses :func:`auto_emerging_blocks`: the first block whose output holds
patch tokens with a norm far above the median (the "registers" artefact), and the block after it.
"""

from __future__ import annotations

import warnings

import torch

from .backbone import DenseViT

__all__ = ["calibration_images", "block_token_norms", "first_emerging_block", "auto_emerging_blocks"]

HIGH_NORM_RATIO = 4.0
_AUTO_CACHE: dict[tuple[int, int], list[int]] = {}


def calibration_images(vit: DenseViT, n: int = 4, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Deterministic smooth synthetic images ``(n, 3, size, size)`` (already normalised-scale values)."""
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(n, 3, 7, 7, generator=gen)
    images = torch.nn.functional.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return images.to(device=vit.device, dtype=vit.dtype)


@torch.no_grad()
def block_token_norms(vit: DenseViT, images: torch.Tensor) -> torch.Tensor:
    """L2 norms of every token at the output of blocks ``0..L-2``: ``(L-1, B, 1+N)`` in fp32."""
    x, _ = vit.embed(images)
    norms = []
    for i in range(vit.depth - 1):
        x = vit.run_block(i, x)
        norms.append(x.float().norm(dim=-1))
    return torch.stack(norms)


def first_emerging_block(norms: torch.Tensor, ratio: float = HIGH_NORM_RATIO) -> int | None:
    """First block whose output has a patch token with norm > ``ratio`` x the median patch norm."""
    patch = norms[:, :, 1:]
    median = patch.median(dim=-1).values  # (L-1, B)
    peak = patch.max(dim=-1).values
    hits = (peak > ratio * median).any(dim=1)
    idx = torch.nonzero(hits).flatten()
    return int(idx[0]) if len(idx) else None


def auto_emerging_blocks(vit: DenseViT, images: torch.Tensor | None = None) -> list[int]:
    """The detected emerging block and the next (at most L-2); the default when nothing is detected."""
    key = (id(vit.visual), vit.depth)
    if images is None and key in _AUTO_CACHE:
        return _AUTO_CACHE[key]
    norms = block_token_norms(vit, images if images is not None else calibration_images(vit))
    first = first_emerging_block(norms)
    if first is None:
        from .methods.gclip import default_emerging_blocks

        blocks = default_emerging_blocks(vit.depth)
        warnings.warn(
            f"no high-norm tokens found in any block; using the default emerging blocks {blocks}", stacklevel=2
        )
    else:
        blocks = sorted({first, min(first + 1, vit.depth - 2)})
    if images is None:
        _AUTO_CACHE[key] = blocks
    return blocks

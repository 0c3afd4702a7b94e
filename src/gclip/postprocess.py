"""From merged window logits to labels: resize to the image, softmax, synonyms, thresholds, PAMR.

The final resize and the per-pixel reduction run in row tiles, so full-resolution logits for all classes
never exist at once: peak memory is ``classes x tile_rows x width`` instead of ``classes x height x width``.
The tiled bilinear resize reproduces ``F.interpolate(..., mode="bilinear", align_corners=False)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["Reduction", "bilinear_indices", "resize_rows", "reduce_logits", "pamr"]

TILE_ELEMENTS = 1 << 24  # floats per tile (64 MiB in fp32)


def bilinear_indices(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of a 1-D bilinear resize (align_corners=False, no antialias)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0.to(device), i1.to(device), (src - i0.float()).to(device)


def resize_rows(
    logits: torch.Tensor,
    rows: tuple[int, int],
    cols_index: tuple[torch.Tensor, ...],
    rows_index: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the bilinear resize of ``(Q, h, w)`` logits, given precomputed axis indices."""
    r0, r1 = rows
    i0, i1, lam = (t[r0:r1] for t in rows_index)
    lam = lam[None, :, None]
    band = logits[:, i0] * (1 - lam) + logits[:, i1] * lam
    j0, j1, mu = cols_index
    return band[:, :, j0] * (1 - mu) + band[:, :, j1] * mu


@dataclass
class Reduction:
    """Output of :func:`reduce_logits`: labels ``(H, W)`` int64, and per-class probabilities if asked."""

    labels: torch.Tensor
    probs: torch.Tensor | None = None


def _class_probs(tile: torch.Tensor, logit_scale: float, query_to_class: torch.Tensor, n_classes: int) -> torch.Tensor:
    probs = torch.softmax(tile * logit_scale, dim=0)
    if probs.shape[0] == n_classes:
        return probs
    out = probs.new_zeros((n_classes,) + probs.shape[1:])
    index = query_to_class.view(-1, *([1] * (probs.dim() - 1))).expand_as(probs)
    return out.scatter_reduce_(0, index, probs, "amax", include_self=True)


def reduce_logits(
    logits: torch.Tensor,
    size: tuple[int, int],
    query_to_class: list[int],
    logit_scale: float = 50.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    return_probs: bool = False,
    tile_elements: int = TILE_ELEMENTS,
) -> Reduction:
    """Labels at ``size`` from merged cosine logits.

    Args:
        logits: ``(Q, h, w)`` cosine similarities per query (synonyms are separate queries).
        size: ``(H, W)`` output size (the original image).
        query_to_class: class index of each query; a class's probability is the max over its queries.
        logit_scale: multiplies the logits before the softmax over queries.
        prob_thd: pixels whose top probability is below it become class 0 (background).
        area_thd: classes 1.. predicted on less than this fraction of the foreground-predicted pixels get
            probability 0 (then labels are recomputed).
        return_probs: also return ``(C, H, W)`` class probabilities (after ``area_thd``).

    Returns:
        A :class:`Reduction`.
    """
    device = logits.device
    logits = logits.float()
    height, width = size
    n_classes = max(query_to_class) + 1
    q2c = torch.tensor(query_to_class, device=device)
    rows_index = bilinear_indices(logits.shape[1], height, device)
    cols_index = bilinear_indices(logits.shape[2], width, device)
    cols_index = (cols_index[0], cols_index[1], cols_index[2][None, None, :])
    step = max(1, tile_elements // max(1, logits.shape[0] * width))
    tiles = [(r, min(r + step, height)) for r in range(0, height, step)]

    def probs_of(rows: tuple[int, int]) -> torch.Tensor:
        tile = resize_rows(logits, rows, cols_index, rows_index)
        return _class_probs(tile, logit_scale, q2c, n_classes)

    keep = torch.ones(n_classes, device=device)
    if area_thd is not None and area_thd > 0 and n_classes > 1:
        counts = torch.zeros(n_classes, device=device)
        for rows in tiles:
            counts += torch.bincount(probs_of(rows).argmax(0).flatten(), minlength=n_classes).float()
        foreground = counts[1:]
        keep[1:] = (foreground > area_thd * foreground.sum()).float()
    labels = torch.empty((height, width), dtype=torch.long, device=device)
    probs_out = torch.empty((n_classes, height, width), device=device) if return_probs else None
    for r0, r1 in tiles:
        probs = probs_of((r0, r1)) * keep[:, None, None]
        top, lab = probs.max(0)
        if prob_thd > 0:
            lab[top < prob_thd] = 0
        labels[r0:r1] = lab
        if probs_out is not None:
            probs_out[:, r0:r1] = probs
    return Reduction(labels, probs_out)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` (B, C, H, W) read at offset (dy, dx) with border replication."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) + dy).clamp_(0, h - 1)
    cols = (torch.arange(w, device=x.device) + dx).clamp_(0, w - 1)
    return x[:, :, rows][:, :, :, cols]


def pamr(
    image: torch.Tensor, logits: torch.Tensor, steps: int = 10, dilations: tuple[int, ...] = (8, 16)
) -> torch.Tensor:
    """Pixel-Adaptive Mask Refinement (Araslanov & Roth, CVPR 2020) of ``(B, C, H, W)`` logits.

    Each pixel's affinity to its 8 neighbours at every dilation is a softmax of minus their colour distance,
    scaled by the local colour spread; the logits are then repeatedly replaced by the affinity-weighted mean
    of the neighbours' logits.

    Args:
        image: ``(B, 3, H', W')`` image (any normalisation); resized to the logits' size (align_corners=True).
        logits: ``(B, C, H, W)``.
        steps: number of propagation steps.
        dilations: neighbourhood dilations in pixels.
    """
    image = F.interpolate(image.float(), size=logits.shape[-2:], mode="bilinear", align_corners=True)
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    stack = torch.stack([_shift(image, dy, dx) for dy, dx in window], dim=2)  # (B, 3, 9*D, H, W)
    spread = stack.std(dim=2, keepdim=True)
    del stack
    diffs = torch.stack([(_shift(image, dy, dx) - image).abs() for dy, dx in offsets], dim=2)
    affinity = torch.softmax((-diffs / (1e-8 + 0.1 * spread)).mean(dim=1), dim=1)  # (B, K, H, W)
    del diffs
    out = logits.float()
    for _ in range(steps):
        new = torch.zeros_like(out)
        for k, (dy, dx) in enumerate(offsets):
            new += _shift(out, dy, dx) * affinity[:, k : k + 1]
        out = new
    return out.to(logits.dtype)

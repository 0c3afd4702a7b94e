"""NACLIP: key-key attention plus a Gaussian neighbourhood prior over the patch grid; no residual, no FFN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbones.base import Backbone
from .base import Method, Trace, attend, register


def neighbourhood_prior(grid: tuple[int, int], std: float) -> torch.Tensor:
    """``(1+N, 1+N)`` additive attention prior: ``exp(-|p_i - p_j|² / (2 std²))`` between patches, 0 for CLS.

    Patch positions are ``(row, col)`` in patch units; N = gh * gw.
    """
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    prior = torch.zeros(gh * gw + 1, gh * gw + 1, dtype=torch.float64)
    prior[1:, 1:] = torch.exp(-dist2 / (2.0 * std**2))
    return prior.float()


def cached_prior(cache: dict, grid: tuple[int, int], std: float, device: torch.device) -> torch.Tensor:
    """:func:`neighbourhood_prior` on ``device``, kept in ``cache`` per grid, std and device."""
    key = (grid, std, device)
    if key not in cache:
        cache[key] = neighbourhood_prior(grid, std).to(device)
    return cache[key]


@register
@dataclass
class NaClip(Method):
    name = "naclip"
    protocol = "sclip"
    summary = "softmax(k kᵀ s + Gaussian prior, std in patches); residual and FFN dropped"
    gaussian_std: float = 5.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def prior(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return cached_prior(self._cache, grid, self.gaussian_std, device)

    def warm(self, vit: Backbone, grid: tuple[int, int]) -> None:
        super().warm(vit, grid)
        self.prior(grid, vit.device)

    def last_block(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        prior = self.prior(trace.grid, x.device)
        last = vit.depth - 1
        return vit.block(last, x, attention=lambda q, k, v: attend(k, k, v, bias=prior), residual=False, ffn=False)

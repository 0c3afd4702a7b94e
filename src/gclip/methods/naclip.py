"""NACLIP: key-key attention plus a Gaussian neighbourhood prior over the patch grid; no residual, no FFN."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..backbones.base import Backbone
from .base import BlockChange, Method, Trace, attend, register


def neighbourhood_prior(grid: tuple[int, int], std: float, prefix: int = 1) -> torch.Tensor:
    """``(P+N, P+N)`` additive attention prior: ``exp(-|p_i - p_j|² / (2 std²))`` between patches, 0 for the
    ``P = prefix`` tokens before the grid (CLS, registers).

    Patch positions are ``(row, col)`` in patch units; N = gh * gw.
    """
    gh, gw = grid
    rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw)
    cols = torch.arange(gw, dtype=torch.float64).repeat(gh)
    dist2 = (rows[:, None] - rows[None, :]) ** 2 + (cols[:, None] - cols[None, :]) ** 2
    prior = torch.zeros(gh * gw + prefix, gh * gw + prefix, dtype=torch.float64)
    prior[prefix:, prefix:] = torch.exp(-dist2 / (2.0 * std**2))
    return prior.float()


def cached_prior(cache: dict, grid: tuple[int, int], std: float, device: torch.device, prefix: int = 1) -> torch.Tensor:
    """:func:`neighbourhood_prior` on ``device``, kept in ``cache`` per grid, std, device and prefix."""
    key = (grid, std, device, prefix)
    if key not in cache:
        cache[key] = neighbourhood_prior(grid, std, prefix).to(device)
    return cache[key]


@register
@dataclass
class NaClip(Method):
    """NACLIP's options.

    Attributes:
        gaussian_std: standard deviation (in patches) of the Gaussian neighbourhood prior Ω added to the key-key
            scores.
    """

    name = "naclip"
    protocol = "sclip"
    summary = "softmax(k kᵀ s + Gaussian prior, std in patches); residual and FFN dropped"
    table_row = (
        "last block",
        "`softmax(k kᵀ s + Ω)`, where Ω is a Gaussian over the patch grid (std 5 patches)",
        "dropped",
    )
    gaussian_std: float = 5.0
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def prior(self, vit: Backbone, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
        return cached_prior(self._cache, grid, self.gaussian_std, device, vit.prefix_tokens)

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        prior = self.prior(vit, trace.grid, vit.device)
        keykey = lambda q, k, v: attend(k, k, v, bias=prior)  # noqa: E731
        return {vit.depth - 1: BlockChange(attention=keykey, residual=False, ffn=False)}

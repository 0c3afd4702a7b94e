"""ResCLIP (CVPR 2025, yvhangyang/ResCLIP) on top of NACLIP, ClearCLIP, SCLIP or CLIP's last block.

RCS (residual cross-correlation self-attention): the last block's attention is mixed with the mean attention of
intermediate blocks, ``tau_r ((1 - lam_r) A + lam_r mean(A_5..A_8))``. SFR (semantic feedback refinement): a
first pass predicts the window (PAMR-refined, thresholded); patches of one predicted class that are connected by
a straight path of that class attend to each other (others decay with distance); that matrix, blurred and
normalised, is mixed into the attention scores, ``tau_s ((1 - lam_s) S + lam_s M)``, and the last block runs
again. Everything is computed as the authors' code does, their fp16 rounding of ``M`` included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..inference.postprocess import pamr
from ._purify import scaled_index
from .base import BlockChange, Method, Trace, cosine_logits, grid_features, register
from .naclip import cached_prior
from .pieces import run_block

_BASES = ("naclip", "clearclip", "sclip", "clip")


def patch_classes(probs: torch.Tensor, patch: int, temp_thd: float) -> torch.Tensor:
    """``(Q, H, W)`` first-pass probabilities -> ``(H // patch, W // patch)`` class per patch: the most frequent
    pixel label in the patch (the smallest label on ties), pixels below ``temp_thd`` counting as class 0."""
    top, labels = probs.max(dim=0)
    labels = torch.where(top < temp_thd, torch.zeros_like(labels), labels)
    gh, gw = labels.shape[0] // patch, labels.shape[1] // patch
    blocks = labels[: gh * patch, : gw * patch].reshape(gh, patch, gw, patch).permute(0, 2, 1, 3).reshape(gh, gw, -1)
    counts = (blocks[..., None] == torch.arange(probs.shape[0], device=probs.device)).sum(dim=2)  # (gh, gw, Q)
    return counts.argmax(dim=-1)  # first maximum: the smallest label


def _paths_valid(classes: torch.Tensor, rows: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """For every ordered patch pair (p, q), whether the points ``round(a (1 - t_k) + b t_k)``, ``t_k = k / S``
    (``S`` the largest Chebyshev distance of any pair), ``k <= steps(p, q)``, all have p's class; with the
    Chebyshev steps and ``S``. (As the authors' code: the points are spaced by ``1 / S``, not ``1 / steps``.)"""
    gh, gw = classes.shape
    n = gh * gw
    idx = torch.arange(n, device=classes.device)
    coords = torch.stack([idx // gw, idx % gw], dim=-1)  # (n, 2) long
    steps = (coords[None, :, :] - coords[:, None, :]).abs().max(dim=-1).values  # (p, q)
    most = max(gh, gw) - 1  # the largest of them (known from the grid: no device sync)
    t = torch.linspace(0, 1, steps=most + 1, device=classes.device).view(1, -1, 1)
    flat = classes.reshape(-1)
    valid = torch.empty((n, n), dtype=torch.bool, device=classes.device)
    k = torch.arange(most + 1, device=classes.device)
    for start in range(0, n, rows):
        a = coords[start : start + rows]  # (r, 2)
        r = a.shape[0]
        starts = a[:, None, :].expand(r, n, 2).reshape(-1, 2)
        ends = coords[None].expand(r, n, 2).reshape(-1, 2)
        points = (starts.unsqueeze(1) * (1 - t) + ends.unsqueeze(1) * t).round().long()  # (r*n, S+1, 2)
        values = flat[points[..., 0] * gw + points[..., 1]]
        within = k[None, :] <= steps[start : start + r].reshape(-1, 1)
        same = (values == flat[starts[:, 0] * gw + starts[:, 1]][:, None]) | ~within
        valid[start : start + r] = same.all(dim=1).reshape(r, n)
    return valid, steps, most


def feedback_matrix(
    classes: torch.Tensor, gaussian_std: float, delete_same_entity: bool = True, prefix: int = 1
) -> torch.Tensor:
    """SFR's ``(P+N, P+N)`` attention matrix from ``(gh, gw)`` patch classes (zero rows and columns for the ``P``
    prefix tokens: the CLS token, registers; none on a tower without them)."""
    gh, gw = classes.shape
    n = gh * gw
    flat = classes.reshape(-1)
    same = (flat[:, None] == flat[None, :]).float()
    same.diagonal().fill_(1)
    if delete_same_entity:
        valid, steps, most = _paths_valid(classes)
        same = torch.where(valid, same, same * torch.exp(-steps / max(most, 1)))
    size = min(n, int(6 * gaussian_std + 1))
    size = size if size % 2 == 1 else size + 1
    x = torch.arange(size, device=classes.device) - size // 2
    kernel = torch.exp(-(x**2) / (2 * gaussian_std**2))
    kernel = kernel / kernel.sum()
    blurred = F.relu(F.conv1d(same.unsqueeze(1), kernel.view(1, 1, -1), padding=size // 2).squeeze(1))
    out = torch.zeros((prefix + n, prefix + n), device=classes.device)
    out[prefix:, prefix:] = blurred / (blurred.sum(dim=1, keepdim=True) + 1e-8)
    return out


@register
@dataclass
class ResClip(Method):
    """ResCLIP's options (the authors' configs set ``rcs_weights``, ``sfr_weights`` and ``temp_thd`` per dataset).

    Attributes:
        base: the last block it improves: ``"naclip"`` (the authors' default ``resclip`` strategy: k-k attention plus
            NACLIP's neighbourhood prior), ``"clearclip"`` (q-q), both without residual and FFN, or ``"sclip"``
            (q-q + k-k) and ``"clip"`` (q-k), both with them.
        rcs, sfr: switch each part on.
        rcs_blocks: blocks whose attention maps are averaged (for 12 blocks; same relative depth otherwise).
        rcs_weights: ``(tau_r, lam_r)`` of RCS; the protocol sets them per dataset.
        sfr_weights: ``(tau_s, lam_s)`` of SFR; the protocol sets them per dataset.
        temp_thd: first-pass pixels whose top probability is below it count as class 0.
        gaussian_std: NACLIP's prior's and the SFR row blur's standard deviation (in patches).
        delete_same_entity: decay same-class pairs that are not connected by a path of their class.
        first_logit_scale, first_pamr_steps, first_pamr_dilations: the first pass's softmax scale and PAMR.
    """

    name = "resclip"
    protocol = "resclip"
    summary = "RCS (mid-block attention mixed in) + SFR (first-pass semantic attention) on naclip/clearclip/sclip/clip"
    table_row = (
        "last block; a first prediction feeds a second pass",
        "a base (`naclip`, `clearclip`, `sclip`, `clip`) mixed with blocks 5..8's attention and a semantic matrix",
        "as the base",
    )
    base: Literal["naclip", "clearclip", "sclip", "clip"] = "naclip"
    rcs: bool = True
    sfr: bool = True
    rcs_blocks: list[int] = field(default_factory=lambda: [5, 6, 7, 8])
    rcs_weights: tuple[float, float] = (2.0, 0.3)
    sfr_weights: tuple[float, float] = (2.2, 0.7)
    temp_thd: float = 0.5
    gaussian_std: float = 5.0
    delete_same_entity: bool = True
    first_logit_scale: float = 40.0
    first_pamr_steps: int = 10
    first_pamr_dilations: tuple[int, ...] = (8, 16)
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def _rcs_blocks(self, vit: Backbone) -> list[int]:
        if self.base not in _BASES:
            raise ConfigError(f"resclip base must be one of {', '.join(_BASES)}, got {self.base!r}")
        blocks = list(self.rcs_blocks) if vit.depth == 12 else [scaled_index(b, vit.depth) for b in self.rcs_blocks]
        if not blocks or any(not 0 <= b <= vit.depth - 2 for b in blocks):
            raise ConfigError(f"resclip rcs_blocks {self.rcs_blocks} must be non-empty and within 0..{vit.depth - 2}")
        return blocks

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        changes = {b: BlockChange(keep=True) for b in self._rcs_blocks(vit)} if self.rcs else {}
        changes[vit.depth - 1] = self._last(vit, trace, None)
        return changes

    def _rcs(self, vit: Backbone, trace: Trace) -> torch.Tensor | None:
        """The mean attention map of the RCS blocks (once per pass)."""
        if not self.rcs:
            return None
        if "rcs" not in trace.extras:
            maps = []
            for b in self._rcs_blocks(vit):
                q, k, _ = vit.qkv(b, trace.inputs[b])
                maps.append(torch.softmax((q.float() * q.shape[-1] ** -0.5) @ k.float().transpose(-1, -2), dim=-1))
            trace.extras["rcs"] = torch.stack(maps).mean(dim=0)
        return trace.extras["rcs"]

    def _last(self, vit: Backbone, trace: Trace, sfr: torch.Tensor | None) -> BlockChange:
        """The last block with the base attention, SFR mixed into its scores and RCS into its weights."""
        prior = None
        if self.base == "naclip":
            prior = cached_prior(self._cache, trace.grid, self.gaussian_std, vit.device, vit.prefix_tokens)

        def mix(scores: torch.Tensor) -> torch.Tensor:
            if sfr is None:
                return scores
            tau, lam = self.sfr_weights
            m16 = (sfr / sfr.amax(dim=(-2, -1), keepdim=True)).to(torch.float16)[:, None]  # as the authors: fp16
            return tau * ((1 - lam) * scores + lam * m16)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k = q.float(), k.float()
            scale = q.shape[-1] ** -0.5
            if self.base == "naclip":
                weights = torch.softmax(mix(k @ k.transpose(-1, -2) * scale) + prior, dim=-1)
            elif self.base == "clearclip":
                weights = torch.softmax(mix(q @ q.transpose(-1, -2) * scale), dim=-1)
            elif self.base == "sclip":
                weights = torch.softmax(mix(q @ q.transpose(-1, -2) * scale), dim=-1) + torch.softmax(
                    mix(k @ k.transpose(-1, -2) * scale), dim=-1
                )
            else:
                weights = torch.softmax(mix((q * scale) @ k.transpose(-1, -2)), dim=-1)
            rcs = self._rcs(vit, trace)
            if rcs is not None:
                tau, lam = self.rcs_weights
                weights = tau * ((1 - lam) * weights + lam * rcs)
            return (weights @ v.float()).to(v.dtype)

        kept = self.base in ("sclip", "clip")  # naclip and clearclip drop the residual and the FFN
        return BlockChange(attention=attention, residual=kept, ffn=kept)

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """Without text (or SFR) one pass with RCS; with text, a first prediction gives the semantic matrix of the
        second pass."""
        if trace.text is None or not self.sfr:
            return super().features(vit, x, trace)
        if trace.images is None:
            raise ConfigError("resclip's semantic feedback needs the crops (trace.images)")
        first = cosine_logits(super().features(vit, x, trace).float(), trace.text)
        images = trace.images.float()
        first = F.interpolate(first, size=images.shape[-2:], mode="bilinear", align_corners=False)
        if self.first_pamr_steps > 0:
            first = pamr(images, first, self.first_pamr_steps, tuple(self.first_pamr_dilations))
        probs = torch.softmax(first * self.first_logit_scale, dim=1)
        classes = [patch_classes(p, vit.patch_size, self.temp_thd) for p in probs]
        sfr = torch.stack(
            [feedback_matrix(c, self.gaussian_std, self.delete_same_entity, vit.prefix_tokens) for c in classes]
        )
        last = vit.depth - 1
        return grid_features(vit, run_block(vit, last, x, self._last(vit, trace, sfr), trace), trace.grid)

"""GLA-CLIP (CVPR 2026, 2btlFe/GLA-CLIP): ProxyCLIP's attention with every window's keys and values extended by all the
other windows' of the image, a proxy anchor and a dynamic normalisation.

The engine hands the method all windows of an image in one pass (``window_mode = "cross"``). Each window goes
through the second model (DINO ViT-B/8 by default, as in :mod:`gclip.methods.proxyclip`); the unit patch features of
ALL windows are the keys ``K`` (``N = windows x patches`` of them). For every query patch ``i``:

1. proxy anchor: starting from its own feature, ``anchor_iters`` times take the mean of the keys whose similarity to
   the current anchor exceeds ``anchor_threshold`` (the patch itself where none does), normalised; the attention
   logits are the anchor's cosine similarity to every key;
2. dynamic normalisation: minus ``β`` times the row's mean (clamped at 0), times ``γ``, with ``β = 1 + beta_alpha
   log(1 + windows)`` and ``γ = 1 + gamma_alpha / n`` (``n``: the keys counted in the last anchor step);
3. the entries below ``min(row max, cutting)`` masked, a softmax (``/ temperature``) over all ``N`` keys, applied to
   the last CLIP block's values of all windows (each resized to the second model's grid, as ProxyCLIP), then
   ``out_proj``, with no residual and no FFN; the logits are on the second model's grid.

Every row depends on the keys only, so the attention is computed one window's queries at a time (memory
``patches x N``, not ``N x N``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import Trace, grid_features, register
from .proxyclip import ProxyAttention, ProxyClip, resized_values


@register
@dataclass
class GlaClip(ProxyClip):
    """GLA-CLIP's options (the defaults: the repository's ``predict.sh``).

    Attributes:
        proxy: the second backbone (:func:`gclip.backbones.second_models.list_second_models`; the authors' default
            ``dino_vitb8``).
        proxy_checkpoint: its weights file (``None``: timm's cached pretrained weights).
        beta, gamma: ProxyCLIP's shift (times the mean similarity) and scale, used where ``dynamic_beta`` /
            ``dynamic_gamma`` is off.
        proxy_anchor: the attention logits are the proxy anchor's similarity to the keys (``proxy_sim``); off: the
            query patch's own.
        anchor_iters: the anchor's refinement steps (``mini_iters``; 0: no anchor step, the count for ``γ`` is then
            taken on the patch's own similarities).
        anchor_threshold: the similarity above which a key joins the anchor (``initial_crit_pos``; ``predict.sh``
            sets 0.6 in a variable it never passes, so the run uses the argument default 0.55).
        token_norm: the shift is each query's own mean similarity, clamped at 0 (off: ProxyCLIP's mean over the
            whole attention, with ``beta`` and ``gamma``, and no dynamic normalisation).
        dynamic_beta, beta_alpha: ``β = 1 + beta_alpha · log(1 + number of windows)``.
        dynamic_gamma, gamma_alpha: ``γ = 1 + gamma_alpha / n``, ``n`` the keys in the query's last anchor step.
        temperature: the softmax temperature.
        cutting: entries below ``min(row max, cutting)`` are masked (``cutting_hp``).
    """

    name = "glaclip"
    protocol = "glaclip"
    window_mode = "cross"
    summary = "ProxyCLIP's attention over the keys and values of all windows, with a proxy anchor and dynamic norm"
    table_row = (
        "last block; a second model (DINO) on every window; all windows of an image in one pass",
        (
            "`softmax(γ (S - β mean S))` over the entries above `min(max, 0)`, `S` the cosine of a proxy anchor "
            "(mean of the DINO patches of any window similar to the query) to the DINO patches of ALL windows, "
            "`β`, `γ` from the number of windows and the anchor's size, applied to CLIP's values of all windows"
        ),
        "dropped",
    )
    proxy_anchor: bool = True
    anchor_iters: int = 2
    anchor_threshold: float = 0.55
    token_norm: bool = True
    dynamic_beta: bool = True
    beta_alpha: float = 0.3
    dynamic_gamma: bool = True
    gamma_alpha: float = 30.0
    temperature: float = 1.0
    cutting: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.anchor_iters, bool) or not isinstance(self.anchor_iters, int) or self.anchor_iters < 0:
            raise ConfigError(f"glaclip anchor_iters must be an integer >= 0, got {self.anchor_iters!r}")
        if not -1.0 <= self.anchor_threshold < 1.0:
            raise ConfigError(f"glaclip anchor_threshold must be in [-1, 1) (a cosine), got {self.anchor_threshold}")
        if self.temperature <= 0:
            raise ConfigError(f"glaclip temperature must be > 0, got {self.temperature}")
        if self.dynamic_gamma and self.gamma_alpha <= -1:
            raise ConfigError(f"glaclip gamma_alpha must be > -1 (γ = 1 + gamma_alpha / n > 0), got {self.gamma_alpha}")

    @property
    def second_model(self) -> ProxyFeatures:  # type: ignore[override]
        return ProxyFeatures(self.proxy, self.proxy_checkpoint, self.beta, self.gamma)

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The last block's values of all the pass's windows mixed by the cross-window attention: patch tokens on
        the second model's grid."""
        index = vit.depth - 1
        _, _, v = vit.qkv(index, x)  # (B, H, 1+N, d)
        feats = trace.extras["proxy_features"]  # (B, C, h, w)
        size = tuple(feats.shape[-2:])
        heads = self.attend_across(feats, resized_values(vit, v, trace.grid, size)).to(v.dtype)
        return grid_features(vit, vit.out_proj(index, heads), size, prefix=False)

    def attend_across(self, feats: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``(B, C, h, w)`` second-model features and ``(B, H, M, d)`` values of the B windows of one image -> ``(B,
        H, M, d)``: each window's patches attending to the patches of all B windows."""
        b, h, m, d = values.shape
        keys = F.normalize(feats.float().flatten(2).transpose(1, 2).reshape(b * m, -1), dim=-1)  # (N, C)
        anchors, counts = self.anchors(keys, m)
        flat = values.transpose(0, 1).reshape(h, b * m, d)  # (H, N, d)
        beta = 1.0 + self.beta_alpha * math.log1p(b) if self.dynamic_beta else self.beta
        mean = None if self.token_norm else (anchors.sum(0) @ keys.sum(0)) / (b * m) ** 2
        out = values.new_empty((b, h, m, d))
        for i in range(b):
            rows = slice(i * m, (i + 1) * m)
            sim = anchors[rows] @ keys.T  # (M, N)
            if self.token_norm:
                gamma = 1.0 + self.gamma_alpha / counts[rows, None] if self.dynamic_gamma else self.gamma
                sim = (sim - sim.mean(dim=-1, keepdim=True).clamp(min=0) * beta) * gamma
            else:
                sim = (sim - mean * self.beta) * self.gamma
            cut = sim.amax(dim=-1, keepdim=True).clamp(max=self.cutting)
            attn = torch.softmax(sim.masked_fill(sim < cut, float("-inf")) / self.temperature, dim=-1)
            out[i] = attn @ flat
        return out

    def anchors(self, keys: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(N, C)`` unit keys -> each query's ``(N, C)`` unit proxy anchor (its own key without ``proxy_anchor``),
        and the number of keys in its last anchor step (``None`` where neither the anchor nor ``dynamic_gamma``
        needs it); computed ``chunk`` queries at a time."""
        if not (self.proxy_anchor or self.dynamic_gamma):
            return keys, None
        anchors, counts = torch.empty_like(keys), keys.new_empty(keys.shape[0])
        for start in range(0, keys.shape[0], chunk):
            rows = torch.arange(start, min(start + chunk, keys.shape[0]), device=keys.device)
            anchor = F.normalize(keys[rows], dim=-1)
            sim = anchor @ keys.T
            mask = (sim > self.anchor_threshold).to(keys.dtype)
            for _ in range(self.anchor_iters):
                mask = (sim > self.anchor_threshold).to(keys.dtype)
                alone = mask.sum(dim=-1) == 0
                mask[alone, rows[alone]] = 1.0  # a query with no key above the threshold keeps itself
                anchor = F.normalize((mask @ keys) / (mask.sum(dim=-1, keepdim=True) + 1e-6), dim=-1)
                sim = anchor @ keys.T
            anchors[rows], counts[rows] = anchor, mask.sum(dim=-1)
        return (anchors if self.proxy_anchor else keys), counts


@dataclass(frozen=True)
class ProxyFeatures(ProxyAttention):
    """GLA-CLIP's second model: its renormalised patch features of the pass's windows, kept as
    ``trace.extras["proxy_features"]`` ``(B, C, h, w)`` (the attention needs all windows at once)."""

    def __call__(self, vit: Backbone, trace: Trace) -> None:
        trace.extras["proxy_features"] = self.proxy_features(vit, trace, "glaclip")

"""GCLIP (arXiv 2502.06818): Attention Map Fusion + Channel Suppression, on ClearCLIP's last block.

Attention Map Fusion: the last block attends with a weighted mean of its query-query attention and the
query-key attention of the "global-token emerging" blocks. Channel Suppression: in the blocks after
emergence, the FFN output channel with the largest weight norm is scaled down to the norm of the others.
Both are applied functionally: the model's weights are never modified. The docs' GCLIP page says what the
defaults are based on.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..backbones.auto import CS_WEIGHT, abnormal_channel, auto_settings, default_emerging_blocks
from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import BlockChange, Method, Trace, attend, attention_map, register


def suppress_channel(weight: torch.Tensor, rule: str = "mean") -> tuple[torch.Tensor, int, float]:
    """Scale the row (residual channel) of an FFN output weight with the largest L2 norm down to the others'.

    Args:
        weight: ``mlp.c_proj.weight``, shape ``(width, hidden)``.
        rule: ``"mean"`` or ``"median"`` of the other rows' norms as the target norm.

    Returns:
        ``(new_weight, channel, ratio)`` where ``ratio`` is the channel's norm over the target (before).
    """
    channel, ratio = abnormal_channel(weight, rule)
    new = weight.clone()
    new[channel] = (weight[channel].float() / ratio).to(weight.dtype)
    return new, channel, ratio


@register
@dataclass
class Gclip(Method):
    """GCLIP's options.

    Attributes:
        emerging_blocks: block indices whose attention is fused, ``"auto"`` (measured on the backbone, see
            :func:`gclip.diagnostics.auto_settings`), or ``None`` for the default ({6, 7} on 12 blocks).
        fusion_weights: weights of [last block's q-q map, each emerging block's map]; ``None``: equal.
        fusion: ``"mean"`` fuses head-averaged maps (one map for all heads); ``"per_head"`` fuses head by head.
        channel_suppression: apply Channel Suppression.
        cs_blocks: blocks whose FFN channel is suppressed; ``None``: from the last emerging block to L-2, or,
            with ``emerging_blocks="auto"``, the measured choice; ``"auto"``: the measured choice (the blocks
            from the last measured emerging block on whose channel norm ratio is abnormal).
        cs_rule: target norm of the suppressed channel: ``"mean"`` or ``"median"`` of the other channels.
    """

    name = "gclip"
    protocol = "clearclip"
    summary = "fused q-q + emerging-block attention, channel suppression; residual and FFN dropped"
    table_row = (
        "last block; FFN weights of blocks 7..10",
        "fused `softmax(q qᵀ s)` and the emerging blocks' `softmax(qᵢ kᵢᵀ s)`, plus Channel Suppression",
        "dropped",
    )
    emerging_blocks: list[int] | Literal["auto"] | None = None
    fusion_weights: list[float] | None = None
    fusion: Literal["mean", "per_head"] = "mean"
    channel_suppression: bool = True
    cs_blocks: list[int] | Literal["auto"] | None = None
    cs_rule: Literal["mean", "median"] = "mean"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)
    # How the fusion is computed (same result): "auto" (fused attention on GPU and for per_head; head-looped
    # maps on CPU for "mean"), "sdpa", "looped", or "maps" (every map materialised: the plain reference).
    _impl: Literal["auto", "sdpa", "looped", "maps"] = field(default="auto", repr=False, compare=False)

    def blocks_for(self, vit: Backbone) -> list[int]:
        """The emerging blocks used for this backbone (resolving ``None`` and ``"auto"``)."""
        if self.emerging_blocks is None:
            return default_emerging_blocks(vit.depth)
        if self.emerging_blocks == "auto":
            return list(auto_settings(vit).emerging_blocks)
        blocks = sorted({int(b) for b in self.emerging_blocks})
        bad = [b for b in blocks if not 0 <= b <= vit.depth - 2]
        if bad or not blocks:
            raise ConfigError(
                f"gclip emerging_blocks {self.emerging_blocks} must be non-empty and within 0..{vit.depth - 2} "
                f"for a {vit.depth}-block model (or use 'auto')"
            )
        return blocks

    def suppressed_blocks(self, vit: Backbone) -> list[int]:
        """The blocks whose abnormal FFN channel is suppressed (resolving ``None`` and ``"auto"``)."""
        if not self.channel_suppression:
            return []
        if self.cs_blocks == "auto" or (self.cs_blocks is None and self.emerging_blocks == "auto"):
            return list(auto_settings(vit).cs_blocks)
        if self.cs_blocks is None:
            return list(range(max(self.blocks_for(vit)), vit.depth - 1))
        bad = [b for b in self.cs_blocks if not 0 <= b <= vit.depth - 2]
        if bad:
            raise ConfigError(f"gclip cs_blocks {self.cs_blocks} must be within 0..{vit.depth - 2}")
        return sorted(set(self.cs_blocks))

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        """The emerging blocks keep their inputs, the suppressed ones run with the scaled FFN output weight, and the
        last block attends with the fused maps, without residual and FFN."""
        changes = {i: BlockChange(weights=weights) for i, weights in self.suppressed_weights(vit).items()}
        for i in self.blocks_for(vit):
            changes[i] = dataclasses.replace(changes.get(i, BlockChange()), keep=True)
        fused = functools.partial(self._fused, vit, trace)
        changes[vit.depth - 1] = BlockChange(attention=fused, residual=False, ffn=False)
        return changes

    def suppressed_weights(self, vit: Backbone) -> dict[int, dict[str, torch.Tensor]]:
        """Per suppressed block, its FFN output weight with the abnormal channel scaled down (computed once per
        backbone)."""
        key = (id(vit.module), vit.dtype, vit.device, self.cs_rule, tuple(self.suppressed_blocks(vit)))
        if key not in self._cache:
            self._cache.clear()
            out = {}
            for i in self.suppressed_blocks(vit):
                weight = vit.ffn_out_weight(i).detach()
                out[i] = {CS_WEIGHT: suppress_channel(weight, self.cs_rule)[0]}
            self._cache[key] = out
        return self._cache[key]

    def weights(self, n_maps: int) -> list[float]:
        if self.fusion_weights is None:
            return [1.0 / n_maps] * n_maps
        if len(self.fusion_weights) != n_maps or sum(self.fusion_weights) <= 0:
            raise ConfigError(
                f"gclip fusion_weights needs {n_maps} positive weights (last block first, then each emerging "
                f"block), got {self.fusion_weights}"
            )
        total = float(sum(self.fusion_weights))
        return [float(w) / total for w in self.fusion_weights]

    def _fused(self, vit: Backbone, trace: Trace, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The last block's heads: the fused attention of its q-q map and the emerging blocks' q-k maps."""
        pairs = [(q, q)]
        for i in self.blocks_for(vit):
            qi, ki, _ = vit.qkv(i, trace.inputs[i])
            pairs.append((qi, ki))
        weights = self.weights(len(pairs))
        impl = self._impl
        if impl == "auto":
            impl = "sdpa" if (self.fusion == "per_head" or v.device.type == "cuda") else "looped"
        if impl == "maps":
            return self._explicit(pairs, weights, v)
        if self.fusion == "per_head":  # sum_m w_m softmax(q_m k_mᵀ s) v, head by head: plain fused attention
            return sum(w * attend(qm, km, v) for w, (qm, km) in zip(weights, pairs))
        if impl == "sdpa":
            return fused_mean_attention(pairs, weights, v)
        return looped_mean_attention(pairs, weights, v)

    def _explicit(
        self, pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], v: torch.Tensor
    ) -> torch.Tensor:
        """The plain formulation: every ``(B, H, N, N)`` map materialised in fp32 (reference and fallback)."""
        maps = [attention_map(a, b) for a, b in pairs]
        if self.fusion == "mean":
            fused = sum(w * m.mean(dim=1) for w, m in zip(weights, maps))  # (B, N, N)
            return (fused @ merge_heads(v).float()).to(v.dtype)
        fused_heads = sum(w * m for w, m in zip(weights, maps))  # (B, H, N, N)
        return (fused_heads @ v.float()).to(v.dtype)


def merge_heads(v: torch.Tensor) -> torch.Tensor:
    """``(B, H, N, d)`` -> ``(B, N, H*d)``."""
    b, h, n, d = v.shape
    return v.transpose(1, 2).reshape(b, n, h * d)


def fused_mean_attention(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], v: torch.Tensor
) -> torch.Tensor:
    """``sum_m w_m mean_h softmax(q_mh k_mhᵀ s) V`` with fused attention, returned per head ``(B, H, N, d)``.

    ``V`` is the full-width value matrix ``[v_1 .. v_H]``, so output head ``j`` is
    ``sum_m w_m / H sum_h softmax(q_mh k_mhᵀ s) v_j``: one attention call whose batch runs over
    (value head ``j``, attention head ``h``), i.e. a sum of ``H x H`` ordinary attention outputs. No
    ``N x N`` map is materialised (flash / memory-efficient kernels on GPU), at ``H`` times the value
    product's arithmetic: the right trade on a GPU, not on a CPU (see :func:`looped_mean_attention`).
    """
    b, h, n, d = v.shape
    # Batch index (b, j), head index h; 4-D so that the fused kernels apply.
    values = v[:, :, None].expand(b, h, h, n, d).reshape(b * h, h, n, d)  # [(b, j), h] -> v_j
    out = None
    for w, (qm, km) in zip(weights, pairs):
        qx = qm[:, None].expand(b, h, h, n, d).reshape(b * h, h, n, d)  # [(b, j), h] -> q_h
        kx = km[:, None].expand(b, h, h, n, d).reshape(b * h, h, n, d)
        term = attend(qx, kx, values).reshape(b, h, h, n, d).sum(dim=2) * (w / h)
        out = term if out is None else out + term
    return out


def looped_mean_attention(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float], v: torch.Tensor
) -> torch.Tensor:
    """The same fusion with one fp32 ``(B, N, N)`` map accumulated head by head, then one product with ``V``.

    Peak memory is two ``(B, N, N)`` maps instead of ``len(pairs) x H`` of them. Returns ``(B, N, H*d)``.
    """
    b, h, n, d = v.shape
    scale = d**-0.5
    fused = torch.zeros((b, n, n), dtype=torch.float32, device=v.device)
    for w, (qm, km) in zip(weights, pairs):
        for head in range(h):
            scores = torch.bmm(qm[:, head].float(), km[:, head].float().transpose(1, 2)).mul_(scale)
            fused.add_(torch.softmax(scores, dim=-1), alpha=w / h)
            del scores
    return (fused @ merge_heads(v).float()).to(v.dtype)

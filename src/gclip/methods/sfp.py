"""SFP (Self-adaptive Feature Purifier, ICCV 2025, Kimsure/SFP): outlier tokens found on block L-2 (by the CLS
token's attention, by norm, or by local outlier factor) and repaired; the last block runs two branches, both
without residual and FFN: the purified tokens with ``(k-k + q-q + similarity prior) / 3`` attention, and the sum
of intermediate blocks' outputs with the similarity prior alone; both are smoothed by shallow feature affinity.
Block numbers are for a 12-block ViT and move to the same relative depth on others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..backbones.base import Backbone
from ..errors import ConfigError
from ._purify import (
    AffinityBlocks,
    aggregate,
    cosine_affinity,
    fill_outliers,
    lof_outliers,
    masked_softmax,
    patch_grid_features,
    threshold,
    top_mask,
)
from .base import BlockChange, Method, Trace, attend, register


@register
@dataclass
class Sfp(Method):
    """SFP's options.

    Attributes:
        pm: how outliers are found on block L-2's output: ``"SOM"`` (patches the CLS token attends to more than
            they attend to themselves, the ``top_k`` strongest), ``"L2"`` (the ``top_k`` largest norms) or
            ``"LOF"`` (local outlier factor, as SC-CLIP).
        res_cls: weight of the CLS token added back in both branches; SOM scales the CLS attention by
            ``res_cls * 5`` before comparing.
        top_k: outliers kept by SOM and L2.
        pre_block, post_block: blocks whose outputs give the similarity prior (repaired) and the smoothing.
        multi_start, multi_end: outputs of blocks ``[start, end)`` are summed for the second branch.
        beta: affinities below it are dropped.
        prior_scale: temperature of the prior's masked softmax.
    """

    name = "sfp"
    protocol = "sfp"
    summary = "outlier purification (SOM/L2/LOF) + (k-k + q-q + prior)/3 attention and a multi-level prior branch"
    table_row = (
        "tokens after block L-2; last block run as two branches",
        "`(softmax(k kᵀ s) + softmax(q qᵀ s) + P) / 3`, and `P` alone",
        "dropped",
    )
    pm: Literal["SOM", "L2", "LOF"] = "SOM"
    res_cls: float = 0.3
    top_k: int = 10
    pre_block: int = 8
    post_block: int = 3
    multi_start: int = 3
    multi_end: int = 10
    beta: float = 0.4
    prior_scale: float = 3.0

    def _blocks(self, vit: Backbone) -> AffinityBlocks:
        if self.pm not in ("SOM", "L2", "LOF"):
            raise ConfigError(f"sfp pm must be 'SOM', 'L2' or 'LOF', got {self.pm!r}")
        return AffinityBlocks.resolve(
            "sfp", vit.depth, self.pre_block, self.post_block, self.multi_start, self.multi_end
        )

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        keep = self._blocks(vit).keep(vit.depth) | {vit.depth - 2}  # SOM reads block L-2's attention from its input
        return {i: BlockChange(keep=True) for i in keep}

    def _outliers(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> list[torch.Tensor]:
        """Per window, the ``(P,)`` boolean mask of the outlier patches."""
        if self.pm == "L2":
            return [top_mask(patches.norm(dim=-1), self.top_k) for patches in vit.patches(x)]
        if self.pm == "LOF":
            return [lof_outliers(patches) for patches in vit.patches(x)]
        if not vit.has_cls:
            raise ConfigError(
                "sfp pm='SOM' reads the CLS token's attention and this tower has none: use pm='L2' or 'LOF'"
            )
        p = vit.prefix_tokens
        q, k, _ = vit.qkv(vit.depth - 2, trace.inputs[vit.depth - 2])
        probs = torch.softmax((q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5, dim=-1).mean(dim=1)
        cls_to_patch = probs[:, 0, p:] * (self.res_cls * 5.0)
        to_itself = probs.diagonal(dim1=-2, dim2=-1)[:, p:]
        salient = torch.where(cls_to_patch > to_itself, cls_to_patch, torch.full_like(cls_to_patch, float("-inf")))
        return [top_mask(scores, self.top_k) for scores in salient]

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        blocks, last = self._blocks(vit), vit.depth - 1
        p = vit.prefix_tokens  # CLS (and registers): the patches follow
        pre = blocks.output(blocks.pre, vit.depth, x, trace.inputs)
        post = blocks.output(blocks.post, vit.depth, x, trace.inputs)
        multi_sum = blocks.multi_sum(vit.depth, x, trace.inputs)
        rows = []
        for b, outliers in enumerate(self._outliers(vit, x, trace)):
            sim = threshold(cosine_affinity(fill_outliers(pre[b, p:], outliers, trace.grid)), self.beta)
            prior = masked_softmax(sim, self.prior_scale)
            smooth = threshold(cosine_affinity(post[b, p:]), self.beta)
            purified = aggregate(sim, fill_outliers(x[b, p:], outliers, trace.grid))
            q, k, v = vit.qkv(last, purified[None])
            heads = (attend(k, k, v) + attend(q, q, v) + prior.to(v.dtype) @ v) / 3
            main = vit.out_proj(last, heads)[0] + self.res_cls * vit.cls(x)[b : b + 1]
            _, _, v = vit.qkv(last, multi_sum[b : b + 1, p:])
            deep = vit.out_proj(last, prior.to(v.dtype) @ v)[0] + self.res_cls * vit.cls(multi_sum)[b : b + 1]
            rows.append(aggregate(smooth, main) + aggregate(smooth, deep))
        return patch_grid_features(vit, rows, trace.grid)

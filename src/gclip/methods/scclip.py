"""SC-CLIP (Self-Calibrated CLIP, SuleBai/SC-CLIP): anomaly-token repair, affinity-calibrated attention and
multi-level features through the last block; residual and FFN dropped.

On the output of block L-2 the anomalous patch tokens are found with SC-CLIP's local outlier factor and
replaced by the mean of their neighbours. The last block's attention becomes the mean of a similarity prior
(from the repaired features of an intermediate block) and key-key attention; it runs twice, on the repaired
tokens and on the sum of several intermediate blocks' outputs, and both results are smoothed by feature
affinity. Numbers of blocks are for a 12-block ViT and are moved to the same relative depth on others.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from ._purify import (
    AffinityBlocks,
    aggregate,
    cosine_affinity,
    fill_outliers,
    lof_outliers,
    masked_softmax,
    patch_grid_features,
    threshold,
)
from .base import BlockChange, Method, Trace, attend, register


@register
@dataclass
class ScClip(Method):
    """SC-CLIP's options (the names of its code; block indices for 12 blocks).

    Attributes:
        pre_adjust_idx: block whose repaired output gives the similarity prior of the attention and the
            pre-aggregation of the repaired tokens.
        post_adjust_idx: block whose output gives the affinity that smooths the last block's outputs.
        multi_start_idx, multi_end_idx: outputs of blocks ``[start, end)`` are summed for the multi-level pass.
        res_cls: weight of the CLS token added back after the last block's attention.
        beta: affinities below it are dropped from the aggregations.
        lof_neighbours, lof_contamination: the outlier detector (neighbours, fraction of tokens flagged).
        prior_scale: temperature of the similarity prior's masked softmax.
    """

    name = "scclip"
    protocol = "scclip"
    summary = "LOF anomaly repair + affinity prior ½(sim + k-k) attention, two passes (repaired, multi-level)"
    table_row = (
        "tokens after block L-2; last block run twice",
        "`½(P + softmax(k kᵀ s))`, with `P` a similarity prior from block 8",
        "dropped",
    )
    pre_adjust_idx: int = 8
    post_adjust_idx: int = 3
    multi_start_idx: int = 3
    multi_end_idx: int = 10
    res_cls: float = 0.3
    beta: float = 0.4
    lof_neighbours: int = 30
    lof_contamination: float = 0.05
    prior_scale: float = 3.0

    def _blocks(self, vit: Backbone) -> AffinityBlocks:
        return AffinityBlocks.resolve(
            "scclip", vit.depth, self.pre_adjust_idx, self.post_adjust_idx, self.multi_start_idx, self.multi_end_idx
        )

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        return {i: BlockChange(keep=True) for i in self._blocks(vit).keep(vit.depth)}

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        blocks, last = self._blocks(vit), vit.depth - 1
        p = vit.prefix_tokens  # CLS (and registers): the patches follow
        pre = blocks.output(blocks.pre, vit.depth, x, trace.inputs)
        post = blocks.output(blocks.post, vit.depth, x, trace.inputs)
        multi_sum = blocks.multi_sum(vit.depth, x, trace.inputs)
        rows = []
        for b in range(x.shape[0]):
            patches = x[b, p:]
            outliers = lof_outliers(patches, self.lof_neighbours, self.lof_contamination)
            repaired = fill_outliers(patches, outliers, trace.grid)
            sim = cosine_affinity(fill_outliers(pre[b, p:], outliers, trace.grid))
            prior = masked_softmax(sim, self.prior_scale)
            smooth = threshold(cosine_affinity(post[b, p:]), self.beta)
            pooled = aggregate(threshold(sim, self.beta), repaired)
            main = self._attend(vit, last, pooled, prior) + self.res_cls * vit.cls(x)[b : b + 1]
            deep = self._attend(vit, last, multi_sum[b, p:], prior) + self.res_cls * vit.cls(multi_sum)[b : b + 1]
            rows.append(aggregate(smooth, main) + aggregate(smooth, deep))
        return patch_grid_features(vit, rows, trace.grid)

    @staticmethod
    def _attend(vit: Backbone, index: int, tokens: torch.Tensor, prior: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s projections on ``(P, D)`` tokens with attention ``½(prior + softmax(k kᵀ s))``."""
        _, k, v = vit.qkv(index, tokens[None])
        heads = 0.5 * (prior.to(v.dtype) @ v + attend(k, k, v))
        return vit.out_proj(index, heads)[0]

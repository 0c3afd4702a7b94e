"""CLIPtrase (ECCV 2024, leaves162/CLIPtrase): self-correlation recalibration of the last block.

The last block attends with the SUM ``softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)`` per head and keeps its
residual and FFN; everything before it is unchanged. With ``cls_multiply`` (the authors' VOC20 setting) each
class's patch logits are multiplied by the CLS token's logit of that class. The authors' label refinement by
DBSCAN clustering of block L-2's patch affinities is not part of gclip yet (see the README).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..vit import DenseViT
from .base import Method, Trace, attend, register


def self_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)) v`` (rows of the map sum to three)."""
    return attend(q, q, v) + attend(k, k, v) + attend(v, v, v)


@register
@dataclass
class ClipTrase(Method):
    """CLIPtrase's options.

    Attributes:
        cls_multiply: multiply each class's patch logits by the CLS token's logit of that class (the authors
            do it on VOC20 only).
    """

    name = "cliptrase"
    summary = "softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s); residual and FFN kept"
    cls_multiply: bool = False

    def last_block(self, vit: DenseViT, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        return vit.block(vit.depth - 1, x, attention=self_correlation)

    def features(self, vit: DenseViT, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        tokens = vit.project(self.last_block(vit, x, trace))
        trace.extras["cls"] = tokens[:, 0]
        return tokens[:, 1:].reshape(tokens.shape[0], trace.grid[0], trace.grid[1], -1)

    def refine(
        self, vit: DenseViT, logits: torch.Tensor, feats: torch.Tensor, text: torch.Tensor, trace: Trace
    ) -> torch.Tensor:
        if not self.cls_multiply:
            return logits
        cls = trace.extras["cls"].float()
        cls_logits = (cls / cls.norm(dim=-1, keepdim=True)) @ text.to(cls.device, torch.float32).t()  # (B, Q)
        return logits * cls_logits[:, :, None, None]

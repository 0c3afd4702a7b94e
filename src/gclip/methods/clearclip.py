"""ClearCLIP: query-query attention, no residual, no FFN."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import DenseViT
from .base import Method, attend, register


@register
@dataclass
class ClearClip(Method):
    name = "clearclip"
    summary = "softmax(q qᵀ s); residual and FFN dropped"

    def last_block(
        self, vit: DenseViT, x: torch.Tensor, kept: dict[int, torch.Tensor], grid: tuple[int, int]
    ) -> torch.Tensor:
        last = vit.depth - 1
        q, _, v = vit.qkv(last, x)
        return vit.out_proj(last, attend(q, q, v))

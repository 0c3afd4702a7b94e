"""SCLIP: correlative self-attention, the sum of query-query and key-key attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import DenseViT
from .base import Method, attend, register


@register
@dataclass
class Sclip(Method):
    name = "sclip"
    summary = "softmax(q qᵀ s) + softmax(k kᵀ s); residual and FFN kept"

    def last_block(
        self, vit: DenseViT, x: torch.Tensor, kept: dict[int, torch.Tensor], grid: tuple[int, int]
    ) -> torch.Tensor:
        last = vit.depth - 1
        q, k, v = vit.qkv(last, x)
        out = attend(q, q, v) + attend(k, k, v)
        x = x + vit.attn_residual(last, vit.out_proj(last, out))
        return x + vit.ffn(last, x)

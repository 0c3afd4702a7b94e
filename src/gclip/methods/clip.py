"""Vanilla CLIP: the last block unchanged, read at every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import DenseViT
from .base import Method, attend, register


@register
@dataclass
class Clip(Method):
    name = "clip"
    summary = "softmax(q kᵀ s) attention; residual and FFN kept (the unmodified last block)"

    def last_block(
        self, vit: DenseViT, x: torch.Tensor, kept: dict[int, torch.Tensor], grid: tuple[int, int]
    ) -> torch.Tensor:
        last = vit.depth - 1
        q, k, v = vit.qkv(last, x)
        x = x + vit.attn_residual(last, vit.out_proj(last, attend(q, k, v)))
        return x + vit.ffn(last, x)

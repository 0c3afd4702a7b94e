"""MaskCLIP: every token attends only to itself, so the block outputs its projected values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbone import DenseViT
from .base import Method, register


@register
@dataclass
class MaskClip(Method):
    name = "maskclip"
    summary = "identity attention: out_proj(v); residual and FFN dropped"

    def last_block(
        self, vit: DenseViT, x: torch.Tensor, kept: dict[int, torch.Tensor], grid: tuple[int, int]
    ) -> torch.Tensor:
        last = vit.depth - 1
        _, _, v = vit.qkv(last, x)
        return vit.out_proj(last, v)

"""MaskCLIP: every token attends only to itself, so the block outputs its projected values."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from .base import Method, Trace, register


@register
@dataclass
class MaskClip(Method):
    name = "maskclip"
    protocol = "clearclip"
    summary = "identity attention: out_proj(v); residual and FFN dropped"
    table_row = (
        "last block",
        "identity: `out_proj(v)`",
        "dropped",
    )

    def last_block(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        return vit.block(vit.depth - 1, x, attention=lambda q, k, v: v, residual=False, ffn=False)

"""MaskCLIP: every token attends only to itself, so the block outputs its projected values."""

from __future__ import annotations

from dataclasses import dataclass

from ..backbones.base import Backbone
from .base import BlockChange, Method, Trace, register


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

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        return {vit.depth - 1: BlockChange(attention=lambda q, k, v: v, residual=False, ffn=False)}

"""SCLIP: correlative self-attention, the sum of query-query and key-key attention."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from .base import BlockChange, Method, Trace, attend, register


def correlative(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SCLIP's correlative self-attention ``(softmax(q qᵀ s) + softmax(k kᵀ s)) v``."""
    return attend(q, q, v) + attend(k, k, v)


@register
@dataclass
class Sclip(Method):
    name = "sclip"
    protocol = "sclip"
    summary = "softmax(q qᵀ s) + softmax(k kᵀ s); residual and FFN kept"
    table_row = (
        "last block",
        "`softmax(q qᵀ s) + softmax(k kᵀ s)`",
        "kept",
    )

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        return {vit.depth - 1: BlockChange(attention=correlative)}

"""Vanilla CLIP: the last block unchanged, read at every token."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..backbones.base import Backbone
from .base import Method, Trace, register


@register
@dataclass
class Clip(Method):
    name = "clip"
    protocol = "clearclip"
    summary = "softmax(q kᵀ s) attention; residual and FFN kept (the unmodified last block)"
    table_row = (
        "nothing",
        "`softmax(q kᵀ s)`",
        "kept",
    )

    def last_block(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        return vit.block(vit.depth - 1, x)

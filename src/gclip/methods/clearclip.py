"""ClearCLIP: query-query attention, no residual, no FFN (or, as its shipped configs, q-k attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..backbones.base import Backbone
from .base import BlockChange, Method, Trace, attend, register


@register
@dataclass
class ClearClip(Method):
    """ClearCLIP's options.

    Attributes:
        attention: ``"qq"``: ``softmax(q qᵀ s)`` (the paper); ``"qk"``: the ordinary ``softmax(q kᵀ s)``, the
            setting ClearCLIP's evaluation configs ship (``model_type='vanilla'``); both drop residual and FFN.
    """

    name = "clearclip"
    protocol = "clearclip"
    summary = "softmax(q qᵀ s); residual and FFN dropped"
    table_row = (
        "last block",
        '`softmax(q qᵀ s)`, or `softmax(q kᵀ s)` with `attention="qk"`',
        "dropped",
    )
    attention: Literal["qq", "qk"] = "qq"

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        attention = query_query if self.attention == "qq" else attend
        return {vit.depth - 1: BlockChange(attention=attention, residual=False, ffn=False)}


def query_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ClearCLIP's ``softmax(q qᵀ s) v``."""
    return attend(q, q, v)

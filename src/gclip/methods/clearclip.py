"""ClearCLIP: query-query attention, no residual, no FFN (or, as its shipped configs, q-k attention)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import Method, Trace, attend, register


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

    def last_block(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        if self.attention == "qq":
            attention = lambda q, k, v: attend(q, q, v)  # noqa: E731
        elif self.attention == "qk":
            attention = attend
        else:
            raise ConfigError(f"clearclip attention must be 'qq' or 'qk', got {self.attention!r}")
        return vit.block(vit.depth - 1, x, attention=attention, residual=False, ffn=False)

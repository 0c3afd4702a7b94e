"""Vanilla CLIP: the last block unchanged, read at every token."""

from __future__ import annotations

from dataclasses import dataclass

from .base import Method, register


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

    # no BlockChange: every block runs unchanged, the last one's tokens read at every patch

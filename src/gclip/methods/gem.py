"""GEM, the Grounding Everything Module (CVPR 2024, WalBouss/GEM): self-self attention on a parallel path.

From block ``L - (depth - 1)`` on, the ordinary blocks keep running (the "original path") and a second token
stream (the "GEM path") starts from their input. Each of those blocks adds to the GEM path, with no FFN, the
projected output of a self-self attention computed from the ORIGINAL path's ``ln_1`` tokens: for each of
``v``, ``k`` and ``q`` (per head), ``ss_attn_iter`` times ``x <- softmax(x̂ x̂ᵀ t) x`` with ``x̂`` the L2-normalised
``x``, then ``softmax(x̂ x̂ᵀ t) v``; the three results are averaged. The inverse temperature ``t`` is
``ss_attn_temp`` or, by default, the image's mean ``ln_1`` token norm times ``head_dim^-0.5``. The features are
the GEM path after the last block, through ``ln_post`` and ``proj``. The position embedding is resampled as GEM
does (bicubic with antialias).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import BlockChange, Method, Trace, grid_features, register


def _attend(x: torch.Tensor, v: torch.Tensor, inv_temp: torch.Tensor | float) -> torch.Tensor:
    """``softmax(x xᵀ t) v`` per head (``x`` already normalised)."""
    return F.scaled_dot_product_attention(x * inv_temp, x, v, scale=1.0)


def self_self_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_temp: torch.Tensor | float, iterations: int
) -> torch.Tensor:
    """GEM's ensemble of v-v, k-k and q-q self-self attention, each iterated, applied to ``v``; ``(B, H, N, d)``."""
    out = torch.zeros_like(v)
    for x in (v, k, q):
        for _ in range(iterations):
            x = F.normalize(x, dim=-1)
            x = _attend(x, x, inv_temp)
        out = out + _attend(F.normalize(x, dim=-1), v, inv_temp)
    return out / 3


@register
@dataclass
class Gem(Method):
    """GEM's options (the authors' names).

    Attributes:
        depth: GEM runs on the last ``depth - 1`` blocks (the authors' ``gem_depth``; on a model with fewer
            blocks, on all of them).
        ss_attn_iter: iterations of the self-self attention before the final assignment to ``v``.
        ss_attn_temp: the inverse temperature of the self-self attention; ``None``: the mean token norm of the
            block's ``ln_1`` output times ``head_dim^-0.5`` (per image).
        pos_embed: ``"antialias"`` (GEM's position-embedding resampling) or ``"sclip"`` (the baselines').
    """

    name = "gem"
    protocol = "clearclip"
    summary = "parallel path of iterated q-q/k-k/v-v self-self attention through the last blocks"
    table_row = (
        "a second token path through the last 6 blocks; position-embedding resampling",
        (
            "on that path, the mean of iterated self-self attention of `v`, `k` and `q` (normalised, inverse "
            "temperature `t`)"
        ),
        "residual kept, FFN dropped (on the GEM path)",
    )
    depth: int = 7
    ss_attn_iter: int = 1
    ss_attn_temp: float | None = None
    pos_embed: Literal["antialias", "sclip"] = "antialias"

    @property
    def pos_rule(self) -> str:
        if self.pos_embed not in ("antialias", "sclip"):
            raise ConfigError(f"gem pos_embed must be 'antialias' or 'sclip', got {self.pos_embed!r}")
        return self.pos_embed

    def _first_block(self, vit: Backbone) -> int:
        if self.depth < 2 or self.ss_attn_iter < 0:
            raise ConfigError(f"gem depth must be >= 2 and ss_attn_iter >= 0, got {self.depth} and {self.ss_attn_iter}")
        return max(0, vit.depth - (self.depth - 1))

    def _gem_step(self, vit: Backbone, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor):
        """What block ``index`` adds to the GEM path, from the original path's tokens ``x`` and their q, k, v."""
        if self.ss_attn_temp is None:
            norms = vit.pre_norm(index, x).float().norm(dim=-1).mean(dim=-1)  # (B,)
            inv_temp: torch.Tensor | float = (norms * q.shape[-1] ** -0.5).to(q.dtype)[:, None, None, None]
        else:
            inv_temp = float(self.ss_attn_temp)
        heads = self_self_attention(q, k, v, inv_temp, self.ss_attn_iter)
        return vit.attn_residual(index, vit.out_proj(index, heads))

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        """From the first GEM block on, each block (unchanged itself) also advances the GEM path, which starts from
        the first one's input (``trace.extras["gem_path"]``)."""
        first = self._first_block(vit)

        def enter(index: int, x: torch.Tensor) -> None:  # the original path's tokens entering block ``index``
            if index == first:
                trace.extras["gem_path"] = x
            trace.extras["gem_input"] = x

        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            step = self._gem_step(vit, index, q, k, v, trace.extras["gem_input"])
            trace.extras["gem_path"] = trace.extras["gem_path"] + step
            return F.scaled_dot_product_attention(q, k, v)  # the original path's own attention

        return {
            i: BlockChange(attention=functools.partial(attention, i), before=functools.partial(enter, i))
            for i in range(first, vit.depth - 1)
        }

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The GEM path after the last block's step (from the original path's tokens ``x``)."""
        index = vit.depth - 1
        q, k, v = vit.qkv(index, x)
        gem = trace.extras.get("gem_path", x)  # no earlier GEM block: the path starts at the last block
        return grid_features(vit, gem + self._gem_step(vit, index, q, k, v, x), trace.grid)

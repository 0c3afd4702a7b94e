"""ProxyCLIP (ECCV 2024, mc-lan/ProxyCLIP): a vision foundation model's patch similarity as the last block's attention.

The crop also goes through a second backbone (``proxy``, e.g. DINO ViT-B/8, see
:mod:`gclip.backbones.second_models`), renormalised
for it. Its last block's normalised patch tokens give a cosine similarity ``S`` over ITS patch grid; the attention
is ``softmax(γ (S - β mean(S)))`` with the negative entries masked out, the same for every head. It is applied to
the last CLIP block's values, bilinearly resized from CLIP's patch grid to the proxy's, then ``out_proj``, with no
residual and no FFN; the logits are on the proxy's (finer) grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.second_models import SecondModel, second_model_for
from ..errors import ConfigError
from .base import Method, Trace, register


def proxy_attention(feats: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """``(B, C, h, w)`` proxy features -> ``(B, h*w, h*w)`` attention: ``softmax(γ (S - β mean S))`` over the
    entries that stay non-negative, ``S`` the patch cosine similarity (its mean taken per crop)."""
    unit = F.normalize(feats.flatten(2).float(), dim=1)
    sim = unit.transpose(1, 2) @ unit
    sim = (sim - sim.mean(dim=(1, 2), keepdim=True) * beta) * gamma
    return torch.softmax(sim.masked_fill(sim < 0, float("-inf")), dim=-1)


def values_attention(
    vit: Backbone, index: int, v: torch.Tensor, grid: tuple[int, int], attn: torch.Tensor, size: tuple[int, int]
) -> torch.Tensor:
    """A second model's attention over CLIP's values: block ``index``'s values ``v`` ``(B, H, P+N, d)`` on CLIP's
    patch ``grid``, bilinearly resized to the second model's grid ``size``, mixed by ``attn`` ``(B, M, M)`` (the
    same for every head), then ``out_proj`` -> ``(B, M, D)`` (no residual, no FFN)."""
    b, h, _, d = v.shape
    values = v[:, :, vit.prefix_tokens :].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
    values = F.interpolate(values.float(), size=size, mode="bilinear", align_corners=False)
    heads = (attn[:, None] @ values.permute(0, 2, 3, 1).reshape(b, h, -1, d)).to(v.dtype)  # (B, H, M, d)
    return vit.out_proj(index, heads)


@register
@dataclass
class ProxyClip(Method):
    """ProxyCLIP's options.

    Attributes:
        proxy: the second backbone (:func:`gclip.backbones.second_models.list_second_models`; the authors' default
            ``dino_vitb8``).
        proxy_checkpoint: its weights file (``None``: timm's cached pretrained weights).
        beta, gamma: the shift (times the mean similarity) and the scale of the proxy attention.
    """

    name = "proxyclip"
    protocol = "proxyclip"
    summary = "a second model's patch similarity as the last block's attention on CLIP's values"
    table_row = (
        "last block; a second model (DINO) on the same crop",
        (
            "`softmax(γ (S - β mean S))` over the non-negative entries, `S` the DINO patch cosine similarity, "
            "applied to CLIP's values resized to DINO's grid"
        ),
        "dropped",
    )
    proxy: str = "dino_vitb8"
    proxy_checkpoint: str | None = None
    beta: float = 1.2
    gamma: float = 3.0

    def _proxy(self, vit: Backbone) -> SecondModel:
        if self.gamma <= 0:
            raise ConfigError(f"proxyclip gamma must be > 0, got {self.gamma}")
        return second_model_for(vit, self.proxy, self.proxy_checkpoint)

    def window_multiple(self, vit: Backbone) -> int:
        return math.lcm(vit.patch_size, self._proxy(vit).window_patch)  # both models see whole patches

    def output_grid(self, vit: Backbone, size: tuple[int, int]) -> tuple[int, int]:
        return self._proxy(vit).grid(size)

    def warm(self, vit: Backbone, grid: tuple[int, int]) -> None:
        self._proxy(vit).warm((grid[0] * vit.patch_size, grid[1] * vit.patch_size))

    def second_pass(self, vit: Backbone, trace: Trace) -> None:
        if trace.images is None:
            raise ConfigError("proxyclip needs the crops' pixels (trace.images) for its second model")
        proxy = self._proxy(vit)
        images = trace.images
        p = proxy.window_patch
        h, w = images.shape[-2] // p * p, images.shape[-1] // p * p
        images = images[..., :h, :w]  # unpadded windows: the pixels past the last whole patch are ignored, as by CLIP
        feats = proxy.features(proxy.renormalise(images.to(vit.dtype), vit.mean, vit.std))
        trace.extras["proxy_attention"] = proxy_attention(feats, self.beta, self.gamma)  # (B, M, M)
        trace.extras["proxy_grid"] = tuple(feats.shape[-2:])

    def last_block(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        if "proxy_attention" not in trace.extras:
            self.second_pass(vit, trace)
        attn, size = trace.extras["proxy_attention"], trace.extras["proxy_grid"]
        index = vit.depth - 1
        _, _, v = vit.qkv(index, x)  # (B, H, 1+N, d)
        return values_attention(vit, index, v, trace.grid, attn, size)

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        tokens = vit.project(self.last_block(vit, x, trace))  # patch tokens only, on the proxy's grid
        gh, gw = trace.extras["proxy_grid"]
        return tokens.reshape(tokens.shape[0], gh, gw, -1)

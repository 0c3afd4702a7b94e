"""ProxyCLIP (ECCV 2024, mc-lan/ProxyCLIP): a vision foundation model's patch similarity as the last block's attention.

The crop also goes through a second backbone (``proxy``, e.g. DINO ViT-B/8, see
:mod:`gclip.backbones.second_models`), renormalised
for it. Its last block's normalised patch tokens give a cosine similarity ``S`` over ITS patch grid; the attention
is ``softmax(γ (S - β mean(S)))`` with the negative entries masked out, the same for every head. It is applied to
the last CLIP block's values, bilinearly resized from CLIP's patch grid to the proxy's, then ``out_proj``, with no
residual and no FFN; the logits are on the proxy's (finer) grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.second_models import SecondModel, second_model_for
from ..errors import ConfigError
from .base import Method, Trace, grid_features, register
from .pieces import SecondModelPass


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
    heads = (attn[:, None] @ resized_values(vit, v, grid, size)).to(v.dtype)  # (B, H, M, d)
    return vit.out_proj(index, heads)


def resized_values(vit: Backbone, v: torch.Tensor, grid: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """A block's values ``v`` ``(B, H, P+N, d)`` on CLIP's patch ``grid`` -> its patch values bilinearly resized to a
    second model's grid ``size``: ``(B, H, M, d)`` float32."""
    b, h, _, d = v.shape
    values = v[:, :, vit.prefix_tokens :].reshape(b * h, grid[0], grid[1], d).permute(0, 3, 1, 2)
    values = F.interpolate(values.float(), size=size, mode="bilinear", align_corners=False)
    return values.permute(0, 2, 3, 1).reshape(b, h, -1, d)


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

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gamma <= 0:
            raise ConfigError(f"{self.name} gamma must be > 0, got {self.gamma}")

    @property
    def second_model(self) -> ProxyAttention:  # type: ignore[override]
        return ProxyAttention(self.proxy, self.proxy_checkpoint, self.beta, self.gamma)

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The last block's values mixed by the second model's attention: patch tokens on ITS grid."""
        index = vit.depth - 1
        _, _, v = vit.qkv(index, x)  # (B, H, 1+N, d)
        attn, size = trace.extras["proxy_attention"], trace.extras["proxy_grid"]
        return grid_features(vit, values_attention(vit, index, v, trace.grid, attn, size), size, prefix=False)


@dataclass(frozen=True)
class ProxyAttention(SecondModelPass):
    """ProxyCLIP's second model: its patch similarity as an attention (:func:`proxy_attention`) over its own grid,
    kept as ``trace.extras["proxy_attention"]`` and ``["proxy_grid"]``; windows padded so that both models see whole
    patches."""

    name: str
    checkpoint: str | None
    beta: float
    gamma: float

    def model(self, vit: Backbone) -> SecondModel:
        return second_model_for(vit, self.name, self.checkpoint)

    def __call__(self, vit: Backbone, trace: Trace) -> None:
        feats = self.proxy_features(vit, trace)
        trace.extras["proxy_attention"] = proxy_attention(feats, self.beta, self.gamma)  # (B, M, M)
        trace.extras["proxy_grid"] = tuple(feats.shape[-2:])

    def proxy_features(self, vit: Backbone, trace: Trace, method: str = "proxyclip") -> torch.Tensor:
        """The second model's ``(B, C, h, w)`` features of the pass's crops, renormalised for it."""
        if trace.images is None:
            raise ConfigError(f"{method} needs the crops' pixels (trace.images) for its second model")
        proxy = self.model(vit)
        images = trace.images
        p = proxy.window_patch
        h, w = images.shape[-2] // p * p, images.shape[-1] // p * p
        images = images[..., :h, :w]  # unpadded windows: the pixels past the last whole patch are ignored, as by CLIP
        return proxy.features(proxy.renormalise(images.to(vit.dtype), vit.mean, vit.std))

    def multiple(self, vit: Backbone) -> int:
        return self.model(vit).window_patch

    def grid(self, vit: Backbone, size: tuple[int, int]) -> tuple[int, int]:
        return self.model(vit).grid(size)

    def warm(self, vit: Backbone, grid: tuple[int, int]) -> None:
        self.model(vit).warm((grid[0] * vit.patch_size, grid[1] * vit.patch_size))

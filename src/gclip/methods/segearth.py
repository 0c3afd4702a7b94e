"""SegEarth-OV (CVPR 2025, likyoo/SegEarth-OV): CLIP for remote sensing, training-free.

Three changes to CLIP, all per crop:

- the last block attends with the SUM ``softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)`` per head and drops
  its residual and FFN (the authors' ``model_type='SegEarth'`` with ``ignore_residual=True``);
- "global bias alleviation": the CLS token of that same last-block output, projected and normalised, has its
  cosine logits added to every patch's, times ``cls_token_lambda`` (-0.3: a subtraction; 0 on xBD in the authors'
  configs, which the ``segearth`` preset sets per dataset);
- SimFeatUp (``feature_up``): a trained joint bilateral upsampler (the ``jbu_one`` architecture of FeatUp) takes the
  patch features 16 times finer (the crop's pixels on a ViT-B/16), guided by the crop, before the cosine logits
  (the CLS term is added there). It needs the authors' checkpoint (``xclip_jbu_one_million_aid.ckpt``):
  ``upsampler_checkpoint``. Without one the features stay on the patch grid (the authors' ``feature_up=False``) and
  the logits are resized bilinearly. On other patch sizes the 16x grid is resized to the crop (the authors' code
  handles 16-pixel patches only).

One JBU step (radius ``r``, ``D = 2r + 1``) doubles the feature map: the guidance (the crop average-pooled to the
output size) gives per output pixel a softmax over its ``D x D`` neighbourhood of the dot products of a learnt
32-channel projection (temperature ``exp(range_temp)``), times a Gaussian of the offsets (``sigma_spatial``),
renormalised and corrected by a learnt 1x1 convolution of that kernel and the guidance (times 0.1); the source,
resized bicubically to the output size and reflect-padded by ``r``, is averaged with that kernel. ``jbu_one``
applies the same step four times (16x), then adds 0.1 times a 1x1 convolution of the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.base import Backbone
from ..errors import ConfigError, WeightsError
from .base import BlockChange, Method, Trace, attend, cls_cosine, register
from .clearclip import query_query
from .cliptrase import self_correlation
from .pieces import SecondModelPass, run_block
from .sclip import correlative

_ATTENTION = {"segearth": self_correlation, "clearclip": query_query, "sclip": correlative, "vanilla": attend}


@register
@dataclass
class SegEarth(Method):
    """SegEarth-OV's options.

    Attributes:
        attention: the last block's attention (the authors' ``model_type``): ``"segearth"``: ``softmax(q qᵀ s) +
            softmax(k kᵀ s) + softmax(v vᵀ s)``; ``"clearclip"``: ``softmax(q qᵀ s)``; ``"sclip"``: ``softmax(q qᵀ s)
            + softmax(k kᵀ s)``; ``"vanilla"``: ``softmax(q kᵀ s)``.
        residual: keep the last block's residual and FFN (the authors' ``ignore_residual=False``); by default both
            are dropped.
        cls_token_lambda: weight of the CLS token's cosine logits added to every patch's (-0.3 subtracts them; 0:
            no CLS term, the authors' xBD setting).
        upsampler_checkpoint: the SimFeatUp ``jbu_one`` upsampler's weights (the authors'
            ``xclip_jbu_one_million_aid.ckpt``, a Lightning checkpoint whose ``state_dict`` keys start with
            ``upsampler.``); ``None``: no upsampler (``feature_up=False``), the logits stay on the patch grid.
    """

    name = "segearth"
    protocol = "segearth"
    summary = "softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s); residual and FFN dropped; minus 0.3 × CLS logits"
    table_row = (
        "last block; CLS logits subtracted; optional JBU feature upsampler",
        "`softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)`",
        "dropped",
    )
    attention: Literal["segearth", "clearclip", "sclip", "vanilla"] = "segearth"
    residual: bool = False
    cls_token_lambda: float = -0.3
    upsampler_checkpoint: str | None = None

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        change = BlockChange(attention=_ATTENTION[self.attention], residual=self.residual, ffn=self.residual)
        return {vit.depth - 1: change}

    @property
    def second_model(self) -> FeatureUpsampler | None:  # type: ignore[override]
        if self.upsampler_checkpoint is None:
            return None
        return FeatureUpsampler(self.upsampler_checkpoint)

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        last = vit.depth - 1
        tokens = vit.project(run_block(vit, last, x, trace.changes[last], trace))
        if self.cls_token_lambda != 0:
            if not vit.has_cls:
                raise ConfigError(
                    "segearth: this tower has no CLS token to subtract (SigLIP 2); run it with cls_token_lambda=0 "
                    """(--method-options '{"cls_token_lambda": 0}')"""
                )
            trace.extras["cls"] = vit.cls(tokens)
        feats = vit.patches(tokens).reshape(tokens.shape[0], trace.grid[0], trace.grid[1], -1)
        if self.second_model is not None:
            feats = self.second_model.upsample(vit, feats, trace)
        return feats

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        logits = super().logits(vit, feats, text, trace)
        if self.cls_token_lambda == 0:
            return logits
        return logits + self.cls_token_lambda * cls_cosine(trace.extras["cls"], text)[:, :, None, None]


@dataclass(frozen=True)
class FeatureUpsampler(SecondModelPass):
    """SimFeatUp as a method piece: its weights loaded before any image (:meth:`check`), the features on the crop's
    pixel grid (:meth:`grid`); :meth:`upsample` runs it on a pass's patch features, guided by the pass's crops."""

    checkpoint: str

    def __call__(self, vit: Backbone, trace: Trace) -> None:
        """Nothing runs before the features: the upsampler needs them (:meth:`upsample`)."""

    def grid(self, vit: Backbone, size: tuple[int, int]) -> tuple[int, int]:
        """16 times CLIP's patch grid (four 2x steps): the crop's pixels on a ViT with 16-pixel patches."""
        return int(size[0]) // vit.patch_size * 16, int(size[1]) // vit.patch_size * 16

    def check(self, device: Any, dtype: torch.dtype) -> None:
        load_upsampler(self.checkpoint, device, dtype)

    def upsample(self, vit: Backbone, feats: torch.Tensor, trace: Trace) -> torch.Tensor:
        """``(B, gh, gw, E)`` patch features -> ``(B, gh p, gw p, E)``, guided by the crops (``trace.images``)."""
        gh, gw = trace.grid
        guidance = trace.images[..., : gh * vit.patch_size, : gw * vit.patch_size]  # whole patches, as CLIP saw
        model = load_upsampler(self.checkpoint, feats.device, feats.dtype)
        up = model(feats.permute(0, 3, 1, 2), guidance.to(feats.dtype))
        return up.permute(0, 2, 3, 1)


class JointBilateralStep(nn.Module):
    """One 2x step of FeatUp's learnt joint bilateral upsampler (the module doc); parameter names as FeatUp's
    ``JBULearnedRange``, so its checkpoints load strictly."""

    def __init__(self, feat_dim: int, guidance_dim: int = 3, key_dim: int = 32, radius: int = 5):
        super().__init__()
        self.radius = radius
        self.diameter = 2 * radius + 1
        d2 = self.diameter**2
        self.range_temp = nn.Parameter(torch.tensor(0.0))
        # nn.Identity where FeatUp has Dropout2d (inference): the indices, hence the names, stay
        self.range_proj = nn.Sequential(
            nn.Conv2d(guidance_dim, key_dim, 1), nn.GELU(), nn.Identity(), nn.Conv2d(key_dim, key_dim, 1)
        )
        self.fixup_proj = nn.Sequential(
            nn.Conv2d(guidance_dim + d2, d2, 1), nn.GELU(), nn.Identity(), nn.Conv2d(d2, d2, 1)
        )
        self.sigma_spatial = nn.Parameter(torch.tensor(1.0))

    def offsets(self):
        """The ``(dy, dx)`` of the neighbourhood, row-major (the kernel's channel order)."""
        return [(i, j) for i in range(self.diameter) for j in range(self.diameter)]

    def kernel(self, guidance: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` guidance -> ``(B, D*D, H, W)`` per-pixel weights over the neighbourhood."""
        h, w = guidance.shape[-2:]
        proj = self.range_proj(guidance)
        padded = F.pad(proj, [self.radius] * 4, mode="reflect")
        sims = torch.stack([(padded[..., i : i + h, j : j + w] * proj).sum(1) for i, j in self.offsets()], dim=1)
        temp = self.range_temp.exp().clamp(1e-4, 1e4)
        range_kernel = torch.softmax(temp * sims, dim=1)
        steps = torch.linspace(-1, 1, self.diameter, device=guidance.device, dtype=guidance.dtype)
        dist = (steps[:, None] ** 2 + steps[None, :] ** 2).reshape(1, -1, 1, 1)
        spatial = torch.exp(-dist / (2 * self.sigma_spatial**2))
        combined = range_kernel * spatial
        combined = combined / combined.sum(1, keepdim=True).clamp(1e-7)
        return combined + 0.1 * self.fixup_proj(torch.cat([combined, guidance], dim=1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        h, w = guidance.shape[-2:]
        weights = self.kernel(guidance).to(source.dtype)
        hr = F.interpolate(source, size=(h, w), mode="bicubic", align_corners=False)
        hr = F.pad(hr, [self.radius] * 4, mode="reflect")
        out = source.new_empty((*source.shape[:2], h, w))
        # FeatUp's adaptive convolution: the sum over the offsets, in bands of rows that stay in the CPU's cache
        # (about 2^20 values a band; one band on a GPU)
        band = h if source.device.type != "cpu" else max(1, 2**20 // (source.shape[0] * source.shape[1] * w))
        for r in range(0, h, band):
            rows = min(band, h - r)
            acc = source.new_zeros((*source.shape[:2], rows, w))
            for n, (i, j) in enumerate(self.offsets()):
                acc.addcmul_(hr[..., r + i : r + i + rows, j : j + w], weights[:, n : n + 1, r : r + rows])
            out[..., r : r + rows, :] = acc
        return out


class JbuOne(nn.Module):
    """FeatUp's ``JBUOne``: one :class:`JointBilateralStep` (radius 5) applied four times, guided by the image
    average-pooled to each output size, then ``x + 0.1 * conv1x1(x)``."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.up = JointBilateralStep(feat_dim)
        self.fixup_proj = nn.Sequential(nn.Identity(), nn.Conv2d(feat_dim, feat_dim, 1))

    def forward(self, source: torch.Tensor, guidance: torch.Tensor) -> torch.Tensor:
        for _ in range(4):
            small = F.adaptive_avg_pool2d(guidance, (source.shape[-2] * 2, source.shape[-1] * 2))
            source = self.up(source, small)
        return self.fixup_proj(source) * 0.1 + source


_UPSAMPLERS: dict[tuple[str, str, torch.dtype], JbuOne] = {}


def load_upsampler(path: str, device: Any, dtype: torch.dtype) -> JbuOne:
    """The ``jbu_one`` upsampler of a SimFeatUp checkpoint, built once per process, device and dtype.

    Raises:
        WeightsError: a missing or unreadable file, or one that is not a ``jbu_one`` upsampler (one line).
    """
    key = (str(path), str(torch.device(device)), dtype)
    if key not in _UPSAMPLERS:
        from ..backbones.weights import read_checkpoint

        state, _ = read_checkpoint(path, "upsampler_checkpoint")
        state = {k.removeprefix("upsampler."): v for k, v in state.items()}
        weight = state.get("fixup_proj.1.weight")
        if weight is None or weight.ndim != 4:
            raise WeightsError(f"checkpoint {path} is not a SimFeatUp jbu_one upsampler (no fixup_proj.1.weight)")
        model = JbuOne(weight.shape[0])
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1].strip()[:160]
            raise WeightsError(f"checkpoint {path} does not fit SimFeatUp's jbu_one upsampler: {first}") from e
        _UPSAMPLERS[key] = model.eval().to(device=device, dtype=dtype)
    return _UPSAMPLERS[key]


def random_upsampler_state(feat_dim: int = 512, seed: int = 0) -> dict[str, torch.Tensor]:
    """A deterministic random ``jbu_one`` state dict (FeatUp's names, ``upsampler.`` prefix) for tests and goldens:
    every weight ``N(0, 1 / fan_in)`` from ``numpy.random.default_rng(seed)``, biases ``N(0, 0.01)``, temperature
    ``exp(0.5)``, ``sigma_spatial`` 0.7."""
    import numpy as np

    rng = np.random.default_rng(seed)
    model = JbuOne(feat_dim)
    state = {}
    for name, value in model.state_dict().items():
        if name.endswith("range_temp"):
            v = np.float32(0.5)
        elif name.endswith("sigma_spatial"):
            v = np.float32(0.7)
        elif name.endswith("weight"):
            fan_in = math.prod(value.shape[1:])
            v = rng.standard_normal(value.shape, dtype=np.float32) / np.sqrt(fan_in, dtype=np.float32)
        else:
            v = rng.standard_normal(value.shape, dtype=np.float32) * np.float32(0.1)
        state[f"upsampler.{name}"] = torch.as_tensor(np.asarray(v, dtype=np.float32)).reshape(value.shape)
    return state

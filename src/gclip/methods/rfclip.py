"""RF-CLIP (AAAI 2026, liblacklucy/RF-CLIP): sink-channel denoising after every block, and a last block that
attends with the mean of all blocks' key-key maps, run on similarity-aggregated tokens; CASS's object-level text.

As its released code runs (``clip/model.py`` and ``custom_segmentor.py``):

- after every block, each patch token whose largest share on the "distraction" channels (its channels shifted to
  be non-negative and divided by their sum) exceeds ``denoise_sigma`` / width is replaced by the mean of its 3 x 3
  neighbourhood (zero-padded at the border), blended as ``(1 - alpha) x + alpha x'``; the channels were found on
  OpenAI's ViT-B/16 (and, in a comment, ViT-L/14);
- blocks ``0..L-2`` attend as usual (``refocus``: the paper's attention redistribution, which the released forward
  never switches on: columns that take more than ``refocus_threshold`` of the patches' attention on average give up
  ``1 - refocus_beta`` of it to the other patch columns, in proportion); each records ``softmax(k kᵀ s)``;
- the last block runs unchanged once (its CLS token is the crop's global embedding; its denoised output is one of
  the "guide" states), then twice without residual and FFN: on the tokens entering it and on the mean of the
  ``L`` guide states (the denoised outputs of every block), each with its patches replaced by ``S x`` where ``S`` is
  the guide mean's patch cosine similarity with entries below ``enhance_beta`` zeroed; its attention is the mean
  over all ``L`` blocks of ``softmax(k kᵀ s)`` (each over CLS and patches, then cut to the patches), the last
  block's own computed on its input; the two outputs are averaged;
- the logits are CASS's object-level text (complete-linkage clusters here, Ward there) with the global similarity
  mixed in; the global embedding is the whole image's (through the same encoder) in sliding-window mode and the
  crop's own on Cityscapes and with the whole image as one window.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import BlockChange, Method, Trace, attend, attention_map, register
from .cass import object_level_logits, text_clusters
from .pieces import ImageContext

SINK_CHANNELS = {
    768: (4, 162, 189, 326, 429, 474, 633, 713),  # the authors' list for OpenAI's ViT-B/16
    1024: (250, 261, 437, 650, 720, 779, 936, 1005),  # their commented list for OpenAI's ViT-L/14
}
"""The distraction channels of the authors' code by tower width (they were found on OpenAI's weights)."""

_GLOBAL_ONLY = "rfclip_global_only"  # trace.extras flag: a pass for the global embedding (no key-key maps kept)


@register
@dataclass
class RfClip(Method):
    """RF-CLIP's options (defaults: the authors' code and their VOC21 config).

    Attributes:
        sink_channels: the distraction channels of the denoising; ``None``: the authors' list for the tower's width
            (768: ViT-B/16's, 1024: ViT-L/14's; other widths: none, with a warning); ``[]``: no denoising.
        denoise_sigma: a patch is denoised when its largest normalised value on those channels exceeds
            ``denoise_sigma / width``.
        denoise_alpha: weight of the 3 x 3 neighbourhood mean in a denoised token.
        enhance_beta: patch similarities below it are dropped from the last block's token aggregation.
        refocus: redistribute the attention of blocks ``0..L-2`` away from sink columns (the paper's refocusing;
            the released code's default, used for every reported number, is off).
        refocus_threshold: a column is a sink when the patches' attention to it, summed and divided by the number
            of tokens, exceeds this.
        refocus_beta: the share of a sink column's attention it keeps.
        global_source: whose CLS embedding is the global one: ``"image"`` (the whole model input's, the authors'
            sliding-window default) or ``"crop"`` (each window's own: their Cityscapes and whole-image settings).
        global_semantics_weight: share of the global (CLS) similarity mixed into each patch's logits.
        mean_vector_weight: how far each text cluster's chosen class moves towards its two closest patches.
        h_threshold: the complete-linkage distance at which the text clusters are cut.
    """

    name = "rfclip"
    protocol = "rfclip"
    summary = "sink-channel denoising after every block; last block: mean key-key map of all blocks (+ CASS text)"
    table_row = (
        "every block's output denoised; last block run twice on similarity-aggregated tokens; text per crop",
        "mean over all blocks of `softmax(k kᵀ s)`, patches only",
        "dropped",
    )
    sink_channels: list[int] | None = None
    denoise_sigma: float = 5.0
    denoise_alpha: float = 0.4
    enhance_beta: float = 0.4
    refocus: bool = False
    refocus_threshold: float = 0.1
    refocus_beta: float = 0.6
    global_source: Literal["image", "crop"] = "image"
    global_semantics_weight: float = 0.1
    mean_vector_weight: float = 0.03
    h_threshold: float = 0.1

    @property
    def image_context(self) -> WholeImageCls | None:  # type: ignore[override]
        return WholeImageCls(self) if self.global_source == "image" else None

    def channels(self, vit: Backbone) -> tuple[int, ...]:
        """The distraction channels for this tower: ``sink_channels``, else the authors' list for its width (none,
        with a warning, for other widths); a one-line error for a channel the tower does not have."""
        if self.sink_channels is None:
            if vit.width not in SINK_CHANNELS and not torch.compiler.is_compiling():  # warned by the eager warm-up
                _warn_no_channels(vit.width)
            return SINK_CHANNELS.get(vit.width, ())
        bad = [c for c in self.sink_channels if not 0 <= int(c) < vit.width]
        if bad:
            raise ConfigError(f"rfclip sink_channels must be channels 0..{vit.width - 1}, got {self.sink_channels}")
        return tuple(int(c) for c in self.sink_channels)

    def denoise(self, vit: Backbone, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """Tokens after a block -> the same with the distraction patches blended with their 3 x 3 mean."""
        channels = list(self.channels(vit))
        if not channels:
            return x
        p, feat = vit.prefix_tokens, vit.patches(x)
        shifted = feat - feat.amin(dim=-1, keepdim=True)
        share = shifted / shifted.sum(dim=-1, keepdim=True).clamp(min=1e-8)
        mask = share[..., channels].amax(dim=-1) > self.denoise_sigma / feat.shape[-1]
        b, n, c = feat.shape
        planes = feat.transpose(1, 2).reshape(b, c, *grid)
        mean = F.avg_pool2d(planes, 3, stride=1, padding=1, count_include_pad=True).reshape(b, c, n).transpose(1, 2)
        blended = (1 - self.denoise_alpha) * feat + self.denoise_alpha * torch.where(mask[..., None], mean, feat)
        return torch.cat([x[:, :p], blended], dim=1)

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        self.channels(vit)  # a one-line error before any image
        p = vit.prefix_tokens

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            if not trace.extras.get(_GLOBAL_ONLY):
                kk = attention_map(k, k)[..., p:, p:]
                trace.extras["rfclip_kk"] = kk if "rfclip_kk" not in trace.extras else trace.extras["rfclip_kk"] + kk
            if not self.refocus:
                return attend(q, k, v)
            maps = refocused(attention_map(q, k), self.refocus_threshold, self.refocus_beta, p)
            return (maps @ v.float()).to(v.dtype)

        def denoised(x: torch.Tensor) -> torch.Tensor:
            return self.denoise(vit, x, trace.grid)

        last = vit.depth - 1
        return {i: BlockChange(attention=attention, before=denoised if i else None, keep=i > 0) for i in range(last)}

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        last, p = vit.depth - 1, vit.prefix_tokens
        x = self.denoise(vit, x, trace.grid)
        out = self.denoise(vit, vit.block(last, x), trace.grid)
        trace.extras["global"] = vit.pooled(out).float()  # the crop's own CLS embedding (a tower's own pooling)
        guide = torch.stack([trace.inputs[i] for i in range(1, last)] + [x, out]).mean(dim=0)
        kk = trace.extras.pop("rfclip_kk")
        first = self.last_attention(vit, self.enhance(x, guide, p), kk)
        second = self.last_attention(vit, self.enhance(guide, guide, p), kk)
        feats = vit.project(torch.stack([first, second]).mean(dim=0))
        return feats.reshape(feats.shape[0], trace.grid[0], trace.grid[1], -1)

    def enhance(self, x: torch.Tensor, guide: torch.Tensor, p: int) -> torch.Tensor:
        """``x`` with its patches replaced by ``S x``: ``S`` the guide's patch cosine similarity, entries below
        ``enhance_beta`` zeroed (not normalised: the block's norm follows)."""
        g = F.normalize(guide[:, p:].float(), dim=-1)
        sim = g @ g.transpose(1, 2)
        sim = torch.where(sim < self.enhance_beta, torch.zeros_like(sim), sim)
        return torch.cat([x[:, :p], (sim @ x[:, p:].float()).to(x.dtype)], dim=1)

    def last_attention(self, vit: Backbone, tokens: torch.Tensor, kk: torch.Tensor) -> torch.Tensor:
        """The last block's attention on ``tokens`` (no residual, no FFN), patches only: the mean of the earlier
        blocks' key-key maps ``kk`` (summed) and its own, applied to its patch values."""
        last, p = vit.depth - 1, vit.prefix_tokens
        _, k, v = vit.qkv(last, tokens)
        maps = (kk + attention_map(k, k)[..., p:, p:]) / vit.depth
        return vit.out_proj(last, (maps @ v[:, :, p:].float()).to(v.dtype))

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        """CASS's object-level text and global similarity (:func:`gclip.methods.cass.object_level_logits`), the
        text clustered with complete linkage; the global embedding the whole image's (``image_context``) or the
        crop's."""
        text = text.to(feats.device, torch.float32)
        given = trace.extras.get("image_context")
        glob = F.normalize((given if given is not None else trace.extras["global"]).float(), dim=-1)
        clusters = text_clusters(text, self.h_threshold, "complete").to(feats.device)
        return object_level_logits(
            feats, text, glob @ text.T, clusters, self.mean_vector_weight, self.global_semantics_weight
        )


def refocused(maps: torch.Tensor, threshold: float, beta: float, p: int) -> torch.Tensor:
    """RF-CLIP's attention redistribution of ``(B, H, T, T)`` maps with ``p`` prefix tokens: per head, the patch
    columns whose summed attention from the patch rows, divided by ``T``, exceeds ``threshold`` keep ``beta`` of
    each patch row's weight; the rest goes to that row's other patch columns in proportion to their weights. The
    prefix rows and columns are unchanged."""
    pp = maps[..., p:, p:]
    sink = (pp.sum(dim=-2) / maps.shape[-1] > threshold)[..., None, :]  # (B, H, 1, N)
    removed = torch.where(sink, pp, torch.zeros_like(pp)).sum(dim=-1, keepdim=True) * (1 - beta)
    kept = torch.where(sink, pp * beta, pp)
    others = torch.where(sink, torch.zeros_like(pp), kept)
    patches = kept + removed * (others / (others.sum(dim=-1, keepdim=True) + 1e-8))
    return torch.cat([maps[..., :p, :], torch.cat([maps[..., p:, :p], patches], dim=-1)], dim=-2)


@functools.cache
def _warn_no_channels(width: int) -> None:
    warnings.warn(
        f"rfclip: no distraction channels are known for width {width} (the authors give them for 768, ViT-B/16, "
        "and 1024, ViT-L/14): the denoising is off; set sink_channels",
        UserWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class WholeImageCls(ImageContext):
    """RF-CLIP's global embedding with ``global_source="image"``: the whole model input's CLS embedding ``(1, E)``
    through the same denoised (and, with ``refocus``, refocused) encoder."""

    method: RfClip

    def __call__(self, vit: Backbone, image: torch.Tensor) -> torch.Tensor:
        from ..inference.forward import encode, end_pass

        x, trace = encode(vit, self.method, image, extras={_GLOBAL_ONLY: True})
        end_pass(trace)
        out = vit.block(vit.depth - 1, self.method.denoise(vit, x, trace.grid))
        return vit.pooled(out).float()

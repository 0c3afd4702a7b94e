"""Trident (YuHengsss/Trident): ProxyCLIP's DINO attention per window, then SAM's attention over the whole image.

Each window of the (patch-aligned) model input goes through CLIP with ProxyCLIP's last block: DINO's patch
similarity (here shifted by its mean over ALL the image's windows, as the authors batch them) masks and weights
attention over CLIP's values, then ``out_proj``. The windows' outputs are spliced (averaged) into one map of the
whole image, resized to SAM's feature grid and mixed by SAM's last-block attention: the head-mean of SAM's
attention probabilities, kept where the cosine similarity of SAM's values exceeds ``cos_fac`` times its row mean
(capped at 0.9), renormalised per row. Then ln_post, the projection and the cosine logits, on SAM's grid. SAM sees
the decoded image resized to patch multiples (cv2) and then to its input side (``ResizeLongestSide``), as in the
authors' code, so the method runs whole images itself (``window_mode = "image"``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.sam_vit import SamViT
from ..backbones.second_models import SecondModel, second_model_for
from ..errors import ConfigError, WeightsError
from ..inference.windows import ImageWindows
from .base import Method, register
from .proxyclip import values_attention


def aligned_shape(h: int, w: int, patch: int, crop: int) -> tuple[int, int]:
    """The authors' ``preprocess_image`` size: unchanged if both sides are patch multiples, else the long side to
    the next multiple, the short side scaled alike and rounded up to a multiple, both at least ``crop``."""
    if h % patch == 0 and w % patch == 0:
        return h, w
    longer = max(h, w)
    target = math.ceil(longer / patch) * patch
    new_h, new_w = int(h * target / longer), int(w * target / longer)
    new_h, new_w = math.ceil(new_h / patch) * patch, math.ceil(new_w / patch) * patch
    return max(new_h, crop), max(new_w, crop)


def sam_pixels(original: np.ndarray, patch: int) -> np.ndarray:
    """The authors' first step for SAM: the decoded pixels resized (cv2, bilinear) up to patch multiples."""
    import cv2

    h, w = original.shape[:2]
    return cv2.resize(original, (math.ceil(w / patch) * patch, math.ceil(h / patch) * patch))


def sam_input(pixels: np.ndarray, side: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``HxWx3 uint8`` pixels -> SAM's padded ``(1, 3, side, side)`` input and the resized size:
    ``ResizeLongestSide(side)`` (segment-anything's transform), SAM's pixel normalisation and zero padding
    (``SamPredictor.set_image``)."""
    try:
        from segment_anything.utils.transforms import ResizeLongestSide
    except ImportError:
        raise ConfigError("trident needs SAM's package: pip install 'gclip[sam]'") from None
    resized = ResizeLongestSide(side).apply_image(np.ascontiguousarray(pixels))
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    mean = torch.tensor([123.675, 116.28, 103.53]).view(1, 3, 1, 1)
    std = torch.tensor([58.395, 57.12, 57.375]).view(1, 3, 1, 1)
    x = (x - mean) / std
    size = (int(x.shape[-2]), int(x.shape[-1]))
    return F.pad(x, (0, side - size[1], 0, side - size[0])), size


def sam_last_attention(encoder: torch.nn.Module | SamViT, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's image encoder (its module, or its :class:`~gclip.backbones.sam_vit.SamViT` adapter) up to its last
    (global) block: that block's attention probabilities ``(1, heads, N, N)`` (relative positions included) and values
    ``(1, heads, h, w, d)``."""
    vit = encoder if isinstance(encoder, SamViT) else SamViT(encoder)
    last = vit.depth - 1
    if vit.windowed(last):
        raise ConfigError("trident needs a SAM encoder whose last block attends globally")
    tokens, (h, w) = vit.embed(x)
    for i in range(last):
        tokens = vit.block(i, tokens)
    q, k, v = vit.qkv(last, tokens)
    attn = vit.attention_logits(last, q, k).softmax(dim=-1)
    b, heads = v.shape[:2]
    return attn, v.reshape(b, heads, h, w, -1)


def sam_guidance(attn: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], cos_fac: float, refine_neg_cos: bool):
    """SAM's attention on its valid ``grid`` (the unpadded part), kept where the values' cosine similarity exceeds
    ``cos_fac`` times its mean (over heads, then the row), capped at 0.9 (and with ``refine_neg_cos=False`` a
    negative threshold set to 0.6); head-mean, rows renormalised -> ``(M, M)``."""
    b, heads, sh, sw, d = v.shape
    gh, gw = grid
    full = attn.view(b, heads, sh, sw, sh, sw)[:, :, :gh, :gw, :gh, :gw].reshape(b, heads, gh * gw, gh * gw)
    unit = F.normalize(v[:, :, :gh, :gw].reshape(b, heads, gh * gw, d), dim=-1)
    sim = unit @ unit.transpose(-1, -2)
    thresh = cos_fac * sim.mean(dim=1, keepdim=True).mean(dim=-1, keepdim=True)
    if not refine_neg_cos:
        thresh = torch.where(thresh < 0.0, 0.6, thresh)
    thresh = torch.where(thresh > 0.9, 0.9, thresh)
    kept = torch.where(sim > thresh, full, torch.zeros_like(full)).mean(dim=1)[0]
    return kept / kept.sum(dim=-1, keepdim=True)


@register
@dataclass
class Trident(Method):
    """Trident's options (its base config: CLIP ViT-B/16, DINO ViT-B/16, SAM ViT-B, no SAM refinement).

    Attributes:
        proxy, proxy_checkpoint: the DINO model and its weights file.
        sam, sam_checkpoint: SAM's image encoder (``sam_vitb``) and its weights file (e.g. sam_vit_b_01ec64.pth).
        beta, gamma: ProxyCLIP's shift and scale of the DINO similarity.
        cos_fac, refine_neg_cos: SAM's value-similarity threshold (times its mean) and how negative ones are kept.
        split_halves: SAM on the left and right halves separately (the authors' Cityscapes setting).
    """

    name = "trident"
    protocol = "trident"
    summary = "ProxyCLIP's DINO attention per window, then SAM's last-block attention over the spliced image"
    table_row = (
        (
            "last block per window (ProxyCLIP's, DINO ViT-B/16); then the windows spliced and mixed by SAM's "
            "attention over the whole image"
        ),
        "per window as `proxyclip`; then SAM's last-block attention, kept where SAM's values agree, on the spliced map",
        "dropped",
    )
    window_mode = "image"
    needs_original = True
    proxy: str = "dino_vitb16"
    proxy_checkpoint: str | None = None
    sam: str = "sam_vitb"
    sam_checkpoint: str | None = None
    beta: float = 1.2
    gamma: float = 3.0
    cos_fac: float = 1.2
    refine_neg_cos: bool = True
    split_halves: bool = False

    def dino(self, vit: Backbone) -> SecondModel:
        return second_model_for(vit, self.proxy, self.proxy_checkpoint)

    def sam_encoder(self, vit: Backbone) -> SecondModel:
        try:
            sam = second_model_for(vit, self.sam, self.sam_checkpoint, option="sam_checkpoint")
        except WeightsError as e:
            raise WeightsError(f"trident's SAM: {e}") from e
        if sam.spec.family != "sam":
            raise ConfigError(f"trident's sam must be a SAM image encoder (e.g. sam_vitb), got {self.sam!r}")
        return sam

    def _window_tokens(
        self, vit: Backbone, crops: torch.Tensor, stage: Callable[[str], contextlib.AbstractContextManager]
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``(B, 3, c, c)`` windows -> ProxyCLIP's last-block output ``(B, D, h, w)`` on DINO's grid, the DINO
        similarity shifted by its mean over all ``B`` windows."""
        from ..inference.forward import encode

        with stage("second_model"):
            dino = self.dino(vit)
            feats = dino.features(dino.renormalise(crops.to(vit.dtype), vit.mean, vit.std))  # (B, C, h, w)
            size = tuple(feats.shape[-2:])
            unit = F.normalize(feats.flatten(2).float(), dim=1)
            sim = unit.transpose(1, 2) @ unit
            sim = (sim - sim.mean() * self.beta) * self.gamma  # the mean over every window of the image
            attn = torch.softmax(sim.masked_fill(sim < 0, float("-inf")), dim=-1)
        with stage("encoder"):
            x, trace = encode(vit, self, crops)
        with stage("head"):
            index = vit.depth - 1
            _, _, v = vit.qkv(index, x)
            out = values_attention(vit, index, v, trace.grid, attn, size)  # (B, M, D)
        return out.transpose(1, 2).reshape(out.shape[0], -1, *size), trace.grid

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        p, crop, stride = vit.patch_size, windows.crop, windows.stride
        if crop > 0 and (crop % p or stride % p):
            raise ConfigError(f"trident needs crop and stride multiples of the patch {p}, got {crop} and {stride}")
        sam = self.sam_encoder(vit)
        with stage("second_model"):
            pixels = sam_pixels(np.asarray(item.original), p)
            half = pixels.shape[1] // 2
            parts = [pixels[:, :half], pixels[:, half:]] if self.split_halves else [pixels]
            guides = []
            for part in parts:
                x, resized = sam_input(part, sam.spec.input_size)
                attn, values = sam_last_attention(sam.vit, x.to(vit.device, vit.dtype))
                grid = (resized[0] // sam.patch_size, resized[1] // sam.patch_size)
                guides.append(
                    (sam_guidance(attn.float(), values.float(), grid, self.cos_fac, self.refine_neg_cos), grid)
                )
                del attn, values
        tokens, clip_grid = self._window_tokens(vit, windows.crops, stage)
        with stage("head"):
            ratio = tokens.shape[-1] // clip_grid[1]
            if tokens.shape[-1] % clip_grid[1]:  # DINO's grid is not a multiple of CLIP's: resize to one
                ratio = int(round(tokens.shape[-2] / clip_grid[0]))
                tokens = F.interpolate(tokens, size=(clip_grid[0] * ratio, clip_grid[1] * ratio), mode="bilinear")
            spliced = windows.merge(tokens)[None].float()
            cut = spliced.shape[-1] // 2
            pieces = [spliced[..., :cut], spliced[..., cut:]] if self.split_halves else [spliced]
            mixed = []
            for piece, (guide, grid) in zip(pieces, guides):
                resized = F.interpolate(piece, size=grid, mode="bilinear")[0]
                mixed.append((guide @ resized.flatten(1).T).reshape(*grid, -1))  # (h, w, D)
            out = torch.cat(mixed, dim=1)  # the halves side by side
            sam_grid = tuple(out.shape[:2])
            feats = F.normalize(vit.project(out.reshape(1, -1, out.shape[-1]).to(vit.dtype)).float(), dim=-1)[0]
            logits = feats @ text.to(feats.device, torch.float32).T
            return logits.T.reshape(-1, *sam_grid)

    def input_shape(self, shape: tuple[int, int], patch: int, crop: int) -> tuple[int, int]:
        return aligned_shape(int(shape[0]), int(shape[1]), patch, crop)

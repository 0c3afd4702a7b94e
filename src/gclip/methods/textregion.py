"""TextRegion (TMLR 2025, avaxiao/TextRegion): SAM 2 regions pool the last block's values into text-aligned tokens.

Per image (``window_mode = "image"``):

- views: the whole model input resized to ``crop_size`` square (two halves side by side with ``split_halves``, the
  authors' Cityscapes setting), plus, with ``resize_method="multi_resolution"``, a ``rows x cols`` grid of tiles
  (``rows = max(H // crop_size, 1)``, likewise ``cols``) each resized to ``crop_size`` square (bicubic with
  antialias on the 0..1 pixels, then normalised, as the authors' torchvision transform);
- the last block's values of every view (its attention input norm, then ``v``) on one map of ``rows x cols``
  view grids: the whole view's values resized (bilinear) to the map, plus each tile's values on its cell;
- region masks (pre-generated, or SAM's automatic generator) resized (bilinear) to the map and clamped to 0..1
  (``mask_type="soft"``) or made 0/1; with ``remove_global_patch``, the patches whose mean value-similarity to the
  regions they lie in exceeds that to the regions they lie outside by less than ``global_patch_threshold`` are
  taken out of every region;
- one token per region: the mask-weighted sum of the values (unit-normalised ones in the authors' default mode,
  ``unit_values``), the block's ``out_proj``, the final norm and the
  projection; its cosine with each text;
- the logits at the image's size: the sum over regions of a region's cosines times its mask (clamped); pixels no
  region covers take SCLIP's logits (the last block with ``softmax(q qᵀ) + softmax(k kᵀ)``, residual and FFN kept)
  combined over the views as the values are, resized to the image.

On the towers that pool with a MAP head, SigLIP 2 (an open_clip timm ``VisionTransformer`` tower,
:class:`~gclip.backbones.timm_clip.TimmClipViT`) and PE-Core (a timm ``Eva`` tower,
:class:`~gclip.backbones.timm_clip.TimmClipEva`), the authors' path for that tower (their
``siglip_value_with_sam2_attn`` and ``pe_value_with_sam2_attn``: one reading of the head) instead:

- views of the tower's native size (``crop_size=None``; 224 for the B/16 towers, 336 for ``PE-Core-L-14-336``),
  resized bicubically on SigLIP 2 and bilinearly on PE-Core, no ``split_halves``;
- the map holds the last block's output tokens after the final norm (what the MAP head reads), the whole view's
  resized at half weight under every tile; the global-patch test runs on those tokens;
- one feature per region: the MAP head's latent query over the map with one key shared by every token (SigLIP 2:
  the mean key; PE-Core: the pool's norm of the mean token), masked to the region's support (``mask > 0``), so
  uniform weights: the head's value projection of the support's mean token, its ``proj``, ``fc_norm`` and the
  tower's heads, without the head's residual MLP (:meth:`~gclip.backbones.timm_clip.TimmClipViT.projection`);
- logits: SigLIP's ``exp(logit_scale) cos + logit_bias`` on SigLIP 2 (the model's: the adapter's
  ``sigmoid_logits``), the cosine on PE-Core; summed over the regions times their masks; no fallback: pixels no
  region covers keep zero logits (uniform probabilities), and every logit is 0 when the global-patch test empties
  every region.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.timm_clip import TimmClipEva, TimmClipViT
from ..errors import ConfigError
from ..inference.preprocess import pixel_constants
from ..inference.windows import ImageWindows
from ..io.masks import generate_region_masks, is_sam2, load_sam, read_region_masks
from .base import Method, cosine_logits, grid_features, register
from .corrclip import InstanceMasks
from .sclip import correlative

NO_MASKS = (
    "textregion needs region masks: pass masks=FOLDER of pre-generated <stem>.npz (--masks FOLDER), or "
    "mask_generator='sam_vitb' with sam_checkpoint=PATH (--mask-generator sam_vitb --sam-checkpoint PATH)"
)


@dataclass(frozen=True)
class Views:
    """The views of one image: ``images`` ``(V, 3, c, c)`` normalised, the first ``wholes`` of them the whole image
    (or its two halves), then the tiles of a ``rows x cols`` grid in raster order."""

    images: torch.Tensor
    wholes: int
    rows: int
    cols: int


def view_images(pixels: torch.Tensor, crop: int, multi: bool, halves: bool, mean, std, mode: str = "bicubic") -> Views:
    """``(1, 3, H, W)`` pixels on the 0..1 scale -> the :class:`Views` (each resized to ``crop`` square with ``mode``
    interpolation and antialias, then normalised with ``mean``/``std``)."""
    h, w = int(pixels.shape[-2]), int(pixels.shape[-1])
    parts = [pixels[..., : w // 2], pixels[..., w // 2 :]] if halves else [pixels]
    rows, cols = (max(h // crop, 1), max(w // crop, 1)) if multi else (0, 0)
    if multi:
        ch, cw = math.ceil(h / rows), math.ceil(w / cols)
        for r in range(rows):
            for c in range(cols):
                y2, x2 = min(r * ch + ch, h), min(c * cw + cw, w)
                parts.append(pixels[..., max(y2 - ch, 0) : y2, max(x2 - cw, 0) : x2])
    size = (crop, crop)
    resized = torch.cat([F.interpolate(p, size=size, mode=mode, align_corners=False, antialias=True) for p in parts])
    m = torch.tensor(mean, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=resized.dtype, device=resized.device).view(1, 3, 1, 1)
    return Views((resized - m) / s, 2 if halves else 1, rows, cols)


def combine(maps: torch.Tensor, views: Views) -> torch.Tensor:
    """Per-view ``(V, C, g, g)`` maps -> ``(C, rows*g, cols*g)`` (``g x g`` with one view): the whole view(s)
    resized (bilinear) to the map, plus each tile's map on its cell."""
    g = maps.shape[-1]
    if views.rows == 0:
        return maps[0]
    size = (g * views.rows, g * views.cols)
    if views.wholes == 2:
        half = (size[0], size[1] // 2)
        out = torch.cat([F.interpolate(maps[i : i + 1], size=half, mode="bilinear") for i in range(2)], dim=-1)
    else:
        out = F.interpolate(maps[:1], size=size, mode="bilinear")
    out = out[0].clone()
    tile = views.wholes
    for r in range(views.rows):
        for c in range(views.cols):
            out[:, r * g : (r + 1) * g, c * g : (c + 1) * g] += maps[tile]
            tile += 1
    return out


def remove_global_patches(masks: torch.Tensor, values: torch.Tensor, threshold: float) -> torch.Tensor:
    """TextRegion's global-patch removal: ``(R, M)`` masks on the grid and ``(M, D)`` values -> the masks with every
    patch zeroed whose mean cosine to the regions it lies in, less that to the regions it lies outside (a patch's
    similarity to a region: its mean over the region's patches), is below ``threshold``."""
    unit = values / values.norm(dim=-1, keepdim=True)
    inside = (masks > 0).float()
    to_region = (unit @ unit.T) @ inside.T / inside.sum(dim=-1)  # (M, R)
    belong = (to_region * inside.T).sum(dim=-1) / (inside.sum(dim=0) + 1e-9)
    outside = (masks == 0).float()
    away = (to_region * outside.T).sum(dim=-1) / (outside.sum(dim=0) + 1e-9)
    out = masks.clone()
    out[:, (belong - away) < threshold] = 0
    return out


@register
@dataclass
class TextRegion(Method):
    """TextRegion's options (its base config: CLIP ViT-B/16, SAM 2.1 Hiera-L masks, views of 336).

    Attributes:
        masks: a folder of pre-generated region masks, ``<image stem>.npz`` (``region_masks``, ``(R, H, W)`` soft
            or 0/1, at the image's size; or an ``instance_mask``) or ``.png``.
        mask_generator, sam_checkpoint: or a mask generator and its weights file: SAM 2 (``sam2.1_hiera_l``, the
            authors', made as their own generator makes its masks: see the method's notes; extra ``sam2``) or SAM
            (``sam_vitb``, ...; extra ``sam``).
        points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh: the generator's point grid and
            mask filters (the authors' base config).
        fuse_mask, fuse_mask_threshold: fuse overlapping generated masks (box IoU > 0.2, containment above the
            threshold) into their maximum.
        crop_size: the side every view is resized to. ``None``: the authors' choice for the tower: 336 on CLIP, the
            tower's native input size on SigLIP 2 and PE-Core (224 for the B/16 towers; their code resizes to it
            whatever ``crop_size`` says).
        resize_method: ``multi_resolution`` (the whole image and a grid of tiles) or ``single`` (the whole image).
        split_halves: the whole image as its left and right halves (the authors' Cityscapes setting).
        remove_global_patch, global_patch_threshold: take patches that are no closer to their regions than to the
            rest out of the regions.
        mask_type: ``soft`` (masks clamped to 0..1) or ``hard`` (0/1).
        unit_values: pool unit-normalised values. ``None``: as the authors' code does, which normalises the values
            it pools in the multi-resolution mode with ``remove_global_patch`` (the global-patch test normalises
            them in place, and there they share memory with the pooled ones) and pools the raw values otherwise; on
            PE-Core, raw tokens.
    """

    name = "textregion"
    protocol = "textregion"
    summary = "SAM 2 regions pool the last block's values (out_proj, ln_post, proj): one text-aligned token each"
    table_row = (
        "last block's values, pooled per mask region over multi-resolution views; SCLIP's last block where no "
        "region lies",
        "none for regions (a mask-weighted sum of the values); `softmax(q qᵀ s) + softmax(k kᵀ s)` elsewhere",
        "dropped for regions; kept elsewhere",
    )
    window_mode = "image"
    masks: str | None = None
    mask_generator: str | None = None
    sam_checkpoint: str | None = None
    points_per_side: int = 16
    pred_iou_thresh: float = 0.6
    stability_score_thresh: float = 0.6
    box_nms_thresh: float = 0.9
    fuse_mask: bool = True
    fuse_mask_threshold: float = 0.8
    crop_size: int | None = None
    resize_method: Literal["multi_resolution", "single"] = "multi_resolution"
    split_halves: bool = False
    remove_global_patch: bool = True
    global_patch_threshold: float = 0.07
    mask_type: Literal["soft", "hard"] = "soft"
    unit_values: bool | None = None

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        """The decoded pixels are kept only for the mask generator (a masks folder needs the file name only)."""
        return self.mask_generator is not None

    @property
    def second_model(self) -> InstanceMasks:  # type: ignore[override]
        return InstanceMasks(self.masks, self.mask_generator, self.sam_checkpoint, NO_MASKS)

    def region_masks(self, vit: Backbone, item: Any, pixels: torch.Tensor | None = None) -> torch.Tensor:
        """The image's ``(R, H, W)`` float32 region masks at its original size. A SAM 2 generator sees the model
        input ``pixels`` (``(1, 3, h, w)``, 0..1 scale) where given, as in the authors' code; SAM the decoded
        pixels."""
        size = tuple(item.size)
        if self.masks is not None:
            masks = read_region_masks(self.masks, item.key, size)
        elif self.mask_generator is not None:
            sam = load_sam(self.mask_generator, self.sam_checkpoint, vit.device, torch.float32)
            if is_sam2(sam) and pixels is not None:
                source = (pixels[0].permute(1, 2, 0).float() * 255.0).round().cpu().numpy()
            elif item.original is None:
                raise ConfigError(
                    "textregion's mask generator needs the decoded pixels: prepare images with the Segmenter"
                )
            else:
                source = np.asarray(item.original)
            masks = generate_region_masks(
                sam,
                source,
                self.points_per_side,
                self.pred_iou_thresh,
                self.stability_score_thresh,
                self.box_nms_thresh,
                self.fuse_mask_threshold if self.fuse_mask else None,
                size=size,
            )
        else:
            raise ConfigError(NO_MASKS)
        return torch.from_numpy(masks).to(vit.device, torch.float32)

    def _clamp(self, masks: torch.Tensor) -> torch.Tensor:
        return masks.clamp(0, 1) if self.mask_type == "soft" else (masks > 0).float()

    def pixel_logits(
        self,
        vit: Backbone,
        pixels: torch.Tensor,
        masks: torch.Tensor,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager] | None = None,
    ) -> torch.Tensor:
        """``(1, 3, H, W)`` pixels (0..1 scale), ``(R, H0, W0)`` region masks and ``(Q, E)`` unit text -> ``(Q, H0,
        W0)`` logits."""
        from ..inference.forward import autocast_for, encode, end_pass

        stage = stage or (lambda _: contextlib.nullcontext())
        if _pools_with_map_head(vit):
            return self._map_head_pixel_logits(vit, pixels, masks, text, stage)
        crop = 336 if self.crop_size is None else self.crop_size
        if crop % vit.patch_size:
            raise ConfigError(f"textregion crop_size must be a multiple of the patch {vit.patch_size}")
        views = view_images(
            pixels.float(),
            crop,
            self.resize_method == "multi_resolution",
            self.split_halves,
            vit.mean,
            vit.std,
        )
        with stage("encoder"):
            x, trace = encode(vit, self, views.images.to(vit.dtype))
            end_pass(trace)
        with stage("head"), autocast_for(vit):
            last, grid = vit.depth - 1, trace.grid
            _, _, v = vit.qkv(last, x)  # (V, heads, P+N, d)
            v = vit.patches(v.transpose(1, 2).flatten(2))  # (V, N, D)
            values = combine(v.transpose(1, 2).reshape(v.shape[0], -1, *grid).float(), views)  # (D, h, w)
            csa = vit.block(last, x, attention=correlative)
            csa = combine(cosine_logits(grid_features(vit, csa, grid), text), views)  # (Q, h, w)
            size = tuple(values.shape[-2:])
            if not len(masks):  # no region (a generator that kept no mask): SCLIP's logits everywhere
                return F.interpolate(csa[None], size=tuple(masks.shape[-2:]), mode="bilinear")[0]
            feature = self._clamp(F.interpolate(masks[None], size=size, mode="bilinear")[0]).flatten(1)  # (R, M)
            seen = feature.sum(dim=1) > 0  # masks that miss every grid point are dropped first
            feature, masks = feature[seen], masks[seen]
            values = values.flatten(1).T  # (M, D)
            if self.remove_global_patch and len(feature):
                feature = remove_global_patches(feature, values, self.global_patch_threshold)
            unit = self.unit_values
            if unit is None:
                unit = self.remove_global_patch and self.resize_method == "multi_resolution"
            if unit:
                values = values / values.norm(dim=-1, keepdim=True)
            kept = feature.sum(dim=1) > 0
            feature, masks = feature[kept], self._clamp(masks[kept])
            tokens = vit.out_proj(last, (feature @ values)[None].to(vit.dtype))
            region = cosine_logits(vit.project(tokens)[:, :, None].float(), text)[0, :, :, 0].T  # (R, Q)
            out = torch.einsum("rq,rhw->qhw", region, masks)
            null = masks.sum(dim=0) == 0
            if null.any():
                full = F.interpolate(csa[None], size=tuple(masks.shape[-2:]), mode="bilinear")[0]
                out[:, null] = full[:, null]
            return out

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        mean, std = pixel_constants(vit.mean, vit.std)  # the model input back to its 0..1 pixels
        m = torch.tensor(mean, device=windows.image.device).view(1, 3, 1, 1)
        s = torch.tensor(std, device=windows.image.device).view(1, 3, 1, 1)
        pixels = (windows.image.float() * s + m) / 255.0
        with stage("masks"):
            masks = self.region_masks(vit, item, pixels)
        return self.pixel_logits(vit, pixels, masks, text, stage)

    # --- SigLIP 2 and PE-Core: the authors' siglip_value_with_sam2_attn / pe_value_with_sam2_attn -------------------
    def _map_head_pixel_logits(
        self,
        vit: Backbone,
        pixels: torch.Tensor,
        masks: torch.Tensor,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """:meth:`pixel_logits` on a tower that pools with a MAP head (SigLIP 2, PE-Core): see the module docstring."""
        from ..inference.forward import autocast_for, encode, end_pass

        siglip = isinstance(vit, TimmClipViT)  # else PE-Core (a timm Eva)
        tower = "SigLIP 2" if siglip else "PE-Core"
        if siglip and vit.sigmoid_logits is None:  # type: ignore[attr-defined]
            raise ConfigError(
                "textregion on SigLIP 2 needs the model's logit scale and bias: build the backbone with "
                "backbone_for(model.visual, clip=model) (the Segmenter does)"
            )
        if self.split_halves:
            raise ConfigError(
                f"textregion split_halves: not on {tower} (the authors' {tower} code reads one whole view, no "
                "split_halves)"
            )
        crop = vit.native_grid[0] * vit.patch_size if self.crop_size is None else self.crop_size
        if crop % vit.patch_size:
            raise ConfigError(f"textregion crop_size must be a multiple of the patch {vit.patch_size}")
        multi = self.resize_method == "multi_resolution"
        mode = "bicubic" if siglip else "bilinear"  # each tower's own transform in the authors' code
        views = view_images(pixels.float(), crop, multi, False, vit.mean, vit.std, mode=mode)
        with stage("encoder"):
            x, trace = encode(vit, self, views.images.to(vit.dtype))
            end_pass(trace)
        with stage("head"), autocast_for(vit):
            tokens = vit.patches(vit.final_norm(vit.block(vit.depth - 1, x)))  # what the MAP head reads
            maps = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *trace.grid).float()  # (V, D, g, g)
            if multi:  # the whole view at half weight under every tile
                maps = torch.cat([0.5 * maps[:1], maps[1:]])
            tokens = combine(maps, views)  # (D, h, w)
            size = tuple(tokens.shape[-2:])
            tokens = tokens.flatten(1).T  # (M, D)
            feature = self._clamp(F.interpolate(masks[None], size=size, mode="bilinear")[0]).flatten(1)  # (R, M)
            seen = feature.sum(dim=1) > 0
            feature, masks = feature[seen], masks[seen]
            if self.remove_global_patch and len(feature):
                feature = remove_global_patches(feature, tokens, self.global_patch_threshold)
            kept = feature.sum(dim=1) > 0
            if not kept.any():  # every region emptied: every logit 0, as the authors' code
                return torch.zeros(len(text), *masks.shape[-2:], device=masks.device)
            if self.unit_values:
                tokens = tokens / tokens.norm(dim=-1, keepdim=True)
            feature, masks = feature[kept], self._clamp(masks[kept])
            region = map_head_region_tokens(vit, feature, tokens)  # (R, E)
            region = cosine_logits(region[None, :, None], text)[0, :, :, 0].T  # (R, Q)
            if siglip:
                scale, bias = vit.sigmoid_logits  # type: ignore[attr-defined]
                region = scale * region + bias
            return torch.einsum("rq,rhw->qhw", region, masks)


def _pools_with_map_head(vit: Backbone) -> bool:
    """Whether TextRegion's SigLIP 2 / PE-Core path applies: an open_clip timm tower pooling with a MAP head."""
    return isinstance(vit, (TimmClipViT, TimmClipEva)) and vit.pools_with_attention


def map_head_region_tokens(vit: Backbone, feature: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``(R, M)`` region masks on the map and the map's ``(M, D)`` final-normed tokens -> ``(R, E)`` region
    features, as the authors read a region through the MAP head (SigLIP 2 and PE-Core alike): its latent query over
    the map with one key shared by every token, attending only to the region's support (``mask > 0``). Equal keys
    make the attention uniform over the support, so the head's output is its value projection of the support's mean
    token (the value projection is affine, the weights sum to one); then the head's ``proj``, ``fc_norm`` and the
    tower's heads, with no residual MLP: :meth:`TimmClipViT.projection
    <gclip.backbones.timm_clip.TimmClipViT.projection>`."""
    support = (feature > 0).float()
    mean = (support / support.sum(dim=1, keepdim=True)) @ tokens
    return vit.projection(mean[None].to(vit.dtype))[0].float()

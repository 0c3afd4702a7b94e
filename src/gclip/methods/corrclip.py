"""CorrCLIP (CVPR 2025, zdk258/CorrCLIP): instance masks restrict the last block's attention to a region.

Per image an instance mask (pre-generated, or from SAM's automatic generator, see :mod:`gclip.io.masks`). Per window:

- the window's regions, on DINO's patch grid, are merged when their mean DINO features (last block's ``q + k``,
  normalised) are within ``dbscan_eps`` of each other (DBSCAN on ``max(S) - S``);
- scope reconstruction: a patch attends to the patches of its own region; where either patch is unsegmented (the
  smallest mask value), to those whose DINO similarity exceeds its mean; the attention is ``softmax(τ S)`` there;
- mask class tokens: one copy of CLS per region goes through every CLIP block attending to CLS and its region's
  patches only (the patch tokens never see them), so each region gets its own embedding;
- the last block: that attention over CLIP's values (resized to DINO's grid), ``out_proj``, for the input tokens
  (main branch) and the mean of the inputs of ``spatial_blocks`` earlier blocks (spatial branch); the region tokens
  through the whole last block, spread over their regions (semantic branch); after ``ln_post``,
  ``main + spatial * spatial_weight + semantic * semantic_weight``, then the projection.

Windows are zero-padded to multiples of ``window_pad`` (the mask padded with 10000, as the authors do); the
logits, on DINO's grid, are resized to the window, averaged over windows and resized to the image. Map correction:
after the thresholds, every region of the instance mask (but the unsegmented one) takes its most frequent label.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.second_models import SecondModel, second_model_for
from ..errors import ConfigError
from ..inference.windows import ImageWindows
from ..io.masks import generate_instance_mask, load_sam, mask_folder, read_instance_mask
from .base import BlockChange, Method, Trace, WindowContext, cosine_logits, register
from .pieces import LabelRefinement, SecondModelPass
from .proxyclip import values_attention

PAD_VALUE = 10000
"""The mask value of padded pixels; merged regions are numbered from it too (``cluster + 10000``), as the authors
do."""
NO_MASKS = (
    "corrclip needs instance masks: pass masks=FOLDER of pre-generated <stem>.npz (--masks FOLDER), or "
    "mask_generator='sam_vitb' with sam_checkpoint=PATH (--mask-generator sam_vitb --sam-checkpoint PATH)"
)
SPATIAL_BLOCKS = {12: 5, 24: 12, 32: 28}
"""The authors' number of blocks averaged by the spatial branch, by depth (otherwise depth - 4, at least 1)."""


def merge_regions(mask: torch.Tensor, feats: torch.Tensor, eps: float, min_samples: int) -> torch.Tensor:
    """An ``(h, w)`` region map and ``(h*w, C)`` unit DINO features -> the map with the regions whose normalised
    mean features DBSCAN clusters (``max(S) - S`` within ``eps``) renumbered ``PAD_VALUE + cluster``; the first
    (smallest) value is left out. Unchanged with two regions or fewer."""
    values = torch.unique(mask)
    if values.numel() <= 2:
        return mask
    try:
        from sklearn.cluster import DBSCAN
    except ImportError:
        raise ConfigError("corrclip needs scikit-learn for its region merging: pip install 'gclip[cluster]'") from None
    flat = mask.reshape(-1)
    regions = [flat == v for v in values]
    unit = F.normalize(torch.stack([feats[r].mean(dim=0) for r in regions]).float(), dim=1)[1:]
    sim = unit @ unit.T
    clusters = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(
        (sim.max() - sim).cpu().numpy()
    )
    out = flat.clone()
    for region, cluster in zip(regions[1:], clusters):
        if cluster != -1:
            out[region] = int(cluster) + PAD_VALUE
    return out.view_as(mask)


def scope_attention(mask: torch.Tensor, sim: torch.Tensor, tau: float) -> torch.Tensor:
    """An ``(M,)`` region id per patch and the ``(M, M)`` DINO similarity -> ``softmax(τ S)`` over the allowed
    pairs: the same region, or (either patch unsegmented, the smallest id) a similarity above its mean."""
    ids = torch.searchsorted(torch.unique(mask), mask)
    segmented = ids != 0
    allowed = (ids[:, None] == ids[None, :]) & segmented[:, None] & segmented[None, :]
    allowed |= (~segmented[:, None] | ~segmented[None, :]) & (sim > sim.mean())
    return torch.softmax(sim.masked_fill(~allowed, float("-inf")) * tau, dim=-1)


def region_ids(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """An ``(h, w)`` region map resized (nearest) to ``grid`` -> ``(gh*gw,)`` indices into its sorted values."""
    small = F.interpolate(mask[None, None].float(), size=grid, mode="nearest").to(mask.dtype).reshape(-1)
    return torch.searchsorted(torch.unique(small), small)


def map_correction(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Every region of ``mask`` but the first (smallest value) takes its most frequent label (the smallest of
    equally frequent ones)."""
    ids = torch.searchsorted(torch.unique(mask), mask.reshape(-1))
    n = int(labels.max()) + 1
    counts = torch.bincount(ids * n + labels.reshape(-1).long(), minlength=int(ids.max() + 1) * n)
    mode = counts.view(-1, n).argmax(dim=1).to(labels.dtype)
    return torch.where(ids == 0, labels.reshape(-1), mode[ids]).view_as(labels)


@dataclass
class _Regions:
    """What the CLIP pass needs of a batch of windows: the scope attention and the region tokens' bookkeeping."""

    attention: torch.Tensor  # (B, M, M) on DINO's grid
    size: tuple[int, int]  # DINO's grid
    bias: torch.Tensor  # (B, 1, R, 1+N): 0 where a region token attends (CLS, its patches), -inf elsewhere
    semantic: torch.Tensor  # (B, M) index of the region of every DINO patch
    tokens: torch.Tensor | None = None  # (B, R, D) region tokens, advanced block by block


@register
@dataclass
class CorrClip(Method):
    """CorrCLIP's options (its base config: CLIP ViT-B/16, DINO ViT-B/8, windows 336 / 112, logit scale 40).

    Attributes:
        proxy, proxy_checkpoint: the DINO model and its weights file.
        masks: a folder of pre-generated instance masks, ``<image stem>.npz`` (``instance_mask``) or ``.png``.
        mask_generator, sam_checkpoint: or a mask generator and its weights file: SAM 2 (``sam2_hiera_l``, the
            authors'; one mask per point, as their code asks; extra ``sam2``) or SAM (``sam_vitb``, ...; extra
            ``sam``).
        points_per_side, pred_iou_thresh, stability_score_thresh: the generator's point grid and mask filters (the
            authors' SAM2 settings).
        tau: the temperature of the scope attention.
        dbscan_eps, dbscan_min_samples: the region merging.
        spatial_weight, semantic_weight: the two extra branches.
        spatial_blocks: blocks the spatial branch averages (``None``: the authors' rule by depth, 5 for ViT-B).
        window_pad: windows are zero-padded to multiples of it.
        map_correction: the per-region mode labels.
    """

    name = "corrclip"
    protocol = "corrclip"
    summary = "instance masks and DINO correlations restrict the last block's attention, plus region tokens"
    table_row = (
        "every block (region tokens); the last block per window, with DINO ViT-B/8 and the image's instance masks",
        (
            "`softmax(τ S)` over the pairs in one (DBSCAN-merged) mask region, or with an unsegmented patch where "
            "`S` > its mean; `S` DINO's `q+k` cosine similarity; applied to CLIP's values and to a mean of "
            "earlier blocks' values; plus one CLS copy per region through all blocks"
        ),
        "dropped (the region tokens keep both)",
    )
    window_mode = "image"
    proxy: str = "dino_vitb8"
    proxy_checkpoint: str | None = None
    masks: str | None = None
    mask_generator: str | None = None
    sam_checkpoint: str | None = None
    points_per_side: int = 8
    pred_iou_thresh: float = 0.4
    stability_score_thresh: float = 0.4
    tau: float = 4.0
    dbscan_eps: float = 0.2
    dbscan_min_samples: int = 1
    spatial_weight: float = 1.0
    semantic_weight: float = 0.5
    spatial_blocks: int | None = None
    window_pad: int = 56
    map_correction: bool = True

    def dino(self, vit: Backbone) -> SecondModel:
        return second_model_for(vit, self.proxy, self.proxy_checkpoint)

    @property
    def needs_original(self) -> bool:  # type: ignore[override]
        """The decoded pixels are kept only for the mask generator (a masks folder needs the file name only)."""
        return self.mask_generator is not None

    def _spatial(self, vit: Backbone) -> range:
        count = self.spatial_blocks
        if count is None:  # the authors' rule; at least one block for shallow (test) models
            count = SPATIAL_BLOCKS.get(vit.depth, max(1, vit.depth - 4))
        if not 1 <= count <= vit.depth - 1:
            raise ConfigError(f"corrclip spatial_blocks must be in 1..{vit.depth - 1}, got {count}")
        return range(vit.depth - 1 - count, vit.depth - 1)  # the inputs of these blocks: outputs of the ones before

    def instance_mask(
        self, vit: Backbone, original: np.ndarray | None, key: Any, size: tuple[int, int]
    ) -> torch.Tensor:
        """The image's ``(H, W)`` instance mask, from :attr:`masks` or :attr:`mask_generator`."""
        if self.masks is not None:
            mask = read_instance_mask(self.masks, key, size)
        elif self.mask_generator is not None:
            if original is None:
                raise ConfigError(
                    "corrclip's mask generator needs the decoded pixels: prepare images with the Segmenter"
                )
            sam = load_sam(self.mask_generator, self.sam_checkpoint, vit.device, torch.float32)
            mask = generate_instance_mask(
                sam, original, self.points_per_side, self.pred_iou_thresh, self.stability_score_thresh
            )
        else:
            raise ConfigError(NO_MASKS)
        return torch.from_numpy(mask).to(vit.device)

    def _regions(self, vit: Backbone, crops: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int]) -> _Regions:
        """DINO on the ``(B, 3, h, w)`` windows; with their ``(B, h, w)`` masks, the merged regions, the scope
        attention and the region tokens' attention bias on CLIP's patch ``grid``."""
        dino = self.dino(vit)
        q, k, _, size = dino.last_qkv(dino.renormalise(crops.to(vit.dtype), vit.mean, vit.std))
        feats = F.normalize((q + k).transpose(1, 2).flatten(2).float(), dim=-1)  # (B, M, C): heads side by side
        sims = feats @ feats.transpose(1, 2)
        small = F.interpolate(masks[:, None].float(), size=size, mode="nearest").to(masks.dtype)[:, 0]
        attention, tokens, semantic = [], [], []
        for mask, feat, sim in zip(small, feats, sims):
            merged = merge_regions(mask, feat, self.dbscan_eps, self.dbscan_min_samples)
            attention.append(scope_attention(merged.reshape(-1), sim, self.tau))
            ids = region_ids(merged, grid)  # regions on CLIP's grid
            tokens.append(ids)
            up = F.interpolate(ids.view(1, 1, *grid).float(), size=size, mode="nearest")
            semantic.append(up.reshape(-1).long())
        count = max(int(ids.max()) + 1 for ids in tokens)
        p = vit.prefix_tokens
        bias = torch.full((len(tokens), 1, count, p + grid[0] * grid[1]), float("-inf"), device=crops.device)
        bias[..., :p] = 0.0  # CLS (and registers), for every region token (padding ones too)
        for b, ids in enumerate(tokens):
            bias[b, 0, :, p:].masked_fill_(ids[None] == torch.arange(count, device=ids.device)[:, None], 0.0)
        return _Regions(torch.stack(attention), size, bias, torch.stack(semantic))

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        """Every block also advances the region tokens (one CLS copy per region, from block 0's input), which attend
        to its patch keys and values; the spatial blocks keep their inputs."""
        spatial = set(self._spatial(vit))

        def start(x: torch.Tensor) -> None:
            regions: _Regions = trace.extras["regions"]
            regions.tokens = vit.cls(x)[:, None].expand(-1, regions.bias.shape[2], -1)  # CLS copies, after ln_pre

        def attention(index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            regions: _Regions = trace.extras["regions"]
            regions.tokens = self._region_step(vit, index, regions, k, v)
            return F.scaled_dot_product_attention(q, k, v)  # the patch tokens' own attention

        return {
            i: BlockChange(
                attention=functools.partial(attention, i), keep=i in spatial, before=start if i == 0 else None
            )
            for i in range(vit.depth - 1)
        }

    @staticmethod
    def _region_step(vit: Backbone, index: int, regions: _Regions, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Block ``index`` on the region tokens, which attend to the patch tokens' keys ``k`` and values ``v``."""
        t = regions.tokens
        q, _, _ = vit.qkv(index, t)
        heads = F.scaled_dot_product_attention(q, k, v, attn_mask=regions.bias.to(q.dtype))
        t = t + vit.attn_residual(index, vit.out_proj(index, heads))
        return t + vit.ffn(index, t)

    def _features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The tokens entering the last block -> ``(B, M, E)`` features on DINO's grid."""
        regions: _Regions = trace.extras["regions"]
        index = vit.depth - 1
        _, k, v = vit.qkv(index, x)
        semantic = self._region_step(vit, index, regions, k, v)  # (B, R, D)
        spatial_in = torch.stack([trace.inputs[i] for i in self._spatial(vit)]).mean(0)
        _, _, v_spatial = vit.qkv(index, spatial_in)
        main = values_attention(vit, index, v, trace.grid, regions.attention, regions.size)
        spatial = values_attention(vit, index, v_spatial, trace.grid, regions.attention, regions.size)
        semantic = torch.gather(semantic, 1, regions.semantic[..., None].expand(-1, -1, semantic.shape[-1]))
        ln = vit.final_norm
        mixed = ln(main) + ln(spatial) * self.spatial_weight + ln(semantic) * self.semantic_weight
        return vit.projection(mixed)

    def _window_logits(
        self, vit: Backbone, crops: torch.Tensor, masks: torch.Tensor, text: torch.Tensor, stage: Callable
    ) -> torch.Tensor:
        """``(B, 3, h, w)`` padded windows and their masks -> ``(B, Q, h, w)`` cosine logits."""
        from ..inference.forward import autocast_for, encode, end_pass

        p = vit.patch_size
        grid = (crops.shape[-2] // p, crops.shape[-1] // p)
        with stage("second_model"), autocast_for(vit):
            regions = self._regions(vit, crops, masks, grid)
        with stage("encoder"):
            x, trace = encode(vit, self, crops, extras={"regions": regions})
        with stage("head"), autocast_for(vit):
            feats = self._features(vit, x, trace).float()
            end_pass(trace)
            logits = cosine_logits(feats.reshape(feats.shape[0], *regions.size, -1), text)
            return F.interpolate(logits, size=crops.shape[-2:], mode="bilinear")

    def window_multiple(self, vit: Backbone) -> int:
        return self.window_pad

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # the windows of an image share one size, so one pass takes them all
        with stage("masks"):
            instance = self.instance_mask(vit, item.original, item.key, tuple(item.size))
        resized = F.interpolate(instance[None, None].float(), size=windows.size, mode="nearest").to(instance.dtype)
        masks = windows.cut(resized[0, 0], value=PAD_VALUE)
        logits = self._window_logits(vit, windows.crops, masks, text, stage)
        return windows.merge(logits.float()), instance

    @property
    def label_refinement(self) -> MapCorrection | None:  # type: ignore[override]
        return MapCorrection() if self.map_correction else None

    @property
    def second_model(self) -> InstanceMasks:  # type: ignore[override]
        return InstanceMasks(self.masks, self.mask_generator, self.sam_checkpoint)


class MapCorrection(LabelRefinement):
    """CorrCLIP's map correction: every instance-mask region takes its most frequent label (the mask is the
    image's one context)."""

    def __call__(self, labels: torch.Tensor, windows: Sequence[WindowContext] = ()) -> torch.Tensor:
        if not windows:
            return labels
        return map_correction(labels, windows[0].context.to(labels.device))


@dataclass(frozen=True)
class InstanceMasks(SecondModelPass):
    """Instance masks from a folder of pre-generated ones or SAM's automatic mask generator: checked or loaded before
    any image (their per-image use is in :meth:`CorrClip.image_logits`, and TextRegion's)."""

    folder: str | None
    generator: str | None
    checkpoint: str | None
    missing: str = NO_MASKS  # the one-line error without either (the method's own)

    def check(self, device: Any, dtype: torch.dtype) -> None:
        if self.folder is not None:
            mask_folder(self.folder)
        elif self.generator is not None:
            load_sam(self.generator, self.checkpoint, device, torch.float32)
        else:
            raise ConfigError(self.missing)

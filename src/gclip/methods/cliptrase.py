"""CLIPtrase (ECCV 2024, leaves162/CLIPtrase): self-correlation recalibration of the last block.

The last block attends with the SUM ``softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)`` per head and keeps its
residual and FFN; everything before it is unchanged. With ``cls_multiply`` (the authors' VOC20 setting) each
class's patch logits are multiplied by the CLS token's logit of that class.

With ``dbscan_eps`` set, the labels are refined as the authors' evaluation does: block L-2's patch affinity (the
head-averaged mean of the q-q, k-k and v-v cosine similarities, minus the CLS token's row, clipped at 0) is
clustered by DBSCAN, one row per patch; each cluster's mean row, as a map over the patch grid, is upsampled
``cluster_ratio`` times, median-filtered (``2 * cluster_ratio - 1`` pixels) and upsampled to the label map; every
pixel joins the cluster whose map is highest there, and each cluster takes its most frequent label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import BlockChange, Method, Trace, WindowContext, attend, cls_cosine, cosine_logits, register
from .pieces import LabelRefinement, run_block


def self_correlation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)) v`` (rows of the map sum to three)."""
    return attend(q, q, v) + attend(k, k, v) + attend(v, v, v)


def patch_affinity(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``(B, N, N)`` patch-to-patch affinity from a block's ``(B, H, 1+N, d)`` q, k, v: per head the mean of the
    q-q, k-k and v-v cosine similarities, averaged over heads; minus the CLS token's row, clipped at 0."""
    b, h, n, d = q.shape
    total = q.new_zeros((b, n, n), dtype=torch.float32)
    for t in (q, k, v):  # the sum over heads of per-head cosines is one product of the head-normalised tokens
        unit = F.normalize(t.float(), dim=-1).transpose(1, 2).reshape(b, n, h * d)
        total = total + unit @ unit.transpose(1, 2)
    aff = total / (3 * h)
    return (aff[:, 1:, 1:] - aff[:, :1, 1:]).clamp_min(0)


def cluster_vote(
    labels: torch.Tensor, context: WindowContext, eps: float, min_samples: int, ratio: int
) -> torch.Tensor:
    """Relabel every DBSCAN cluster of the window's patch affinity with its most frequent label (module doc)."""
    from scipy.ndimage import median_filter
    from sklearn.cluster import DBSCAN

    aff = context.context.float().cpu()  # (N, gh, gw): each patch's row over the grid
    n, gh, gw = aff.shape
    ids = DBSCAN(eps=eps, min_samples=min_samples).fit_predict(aff.reshape(n, -1).numpy())
    clusters = [c for c in np.unique(ids) if c >= 0]
    if not clusters:
        return labels
    means = torch.stack([aff[torch.from_numpy(ids == c)].mean(dim=0) for c in clusters])
    maps = F.interpolate(means[None], size=(ratio * gh, ratio * gw), mode="bilinear", align_corners=False)[0]
    maps = torch.from_numpy(np.stack([median_filter(m, size=2 * ratio - 1) for m in maps.numpy()]))
    win = context.window
    maps = F.interpolate(maps[None], size=win.out_size, mode="bilinear", align_corners=False)[0]
    top, h, left, w = win.keep
    assign = maps[:, top : top + h, left : left + w].argmax(dim=0).to(labels.device)
    out = labels.clone()
    for c in range(len(clusters)):
        mask = assign == c
        members = labels[mask]
        if members.numel():
            out[mask] = torch.bincount(members).argmax()
    return out


@register
@dataclass
class ClipTrase(Method):
    """CLIPtrase's options.

    Attributes:
        cls_multiply: multiply each class's patch logits by the CLS token's logit of that class (the authors
            do it on VOC20 only).
        dbscan_eps: the DBSCAN radius of the label refinement; ``None``: no refinement. The authors use 0.7 at
            224 px and 1.1 at 336 px. It needs one window per image (the whole-image mode, ``crop 0``).
        dbscan_min_samples: DBSCAN's ``min_samples`` (the authors: 3 at 224 px, 7 at 336 px).
        cluster_ratio: the cluster maps' first upsampling factor (the median filter is ``2 * ratio - 1`` wide).
    """

    name = "cliptrase"
    protocol = "cliptrase"
    summary = "softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s); residual and FFN kept"
    table_row = (
        "last block",
        "`softmax(q qᵀ s) + softmax(k kᵀ s) + softmax(v vᵀ s)`",
        "kept",
    )
    cls_multiply: bool = False
    dbscan_eps: float | None = None
    dbscan_min_samples: int = 3
    cluster_ratio: int = 4

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        changes = {vit.depth - 1: BlockChange(attention=self_correlation)}
        if self.dbscan_eps is not None:  # block L-2's patch affinity, for the label refinement

            def affinity(x: torch.Tensor) -> None:
                trace.extras["affinity"] = patch_affinity(*vit.qkv(vit.depth - 2, x))

            changes[vit.depth - 2] = BlockChange(before=affinity)
        return changes

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        last = vit.depth - 1
        tokens = vit.project(run_block(vit, last, x, trace.changes[last], trace))
        trace.extras["cls"] = vit.cls(tokens)
        return vit.patches(tokens).reshape(tokens.shape[0], trace.grid[0], trace.grid[1], -1)

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        logits = cosine_logits(feats, text)
        if not self.cls_multiply:
            return logits
        return logits * cls_cosine(trace.extras["cls"], text)[:, :, None, None]

    @property
    def label_refinement(self) -> ClusterVote | None:  # type: ignore[override]
        if self.dbscan_eps is None:
            return None
        return ClusterVote(self.dbscan_eps, self.dbscan_min_samples, self.cluster_ratio)


@dataclass(frozen=True)
class ClusterVote(LabelRefinement):
    """CLIPtrase's label refinement: each DBSCAN cluster of block L-2's patch affinity takes its most frequent label
    (:func:`cluster_vote`); it needs one window covering the image."""

    eps: float
    min_samples: int = 3
    ratio: int = 4

    def context(self, trace: Trace) -> torch.Tensor:
        aff = trace.extras["affinity"]
        return aff.reshape(aff.shape[0], aff.shape[1], trace.grid[0], trace.grid[1])

    def __call__(self, labels: torch.Tensor, windows: Sequence[WindowContext] = ()) -> torch.Tensor:
        if self.eps <= 0 or self.min_samples < 1 or self.ratio < 1:
            raise ConfigError("cliptrase dbscan_eps must be > 0, dbscan_min_samples and cluster_ratio >= 1")
        if len(windows) != 1 or tuple(windows[0].canvas) != tuple(labels.shape):
            raise ConfigError(
                "cliptrase's DBSCAN refinement (dbscan_eps) needs one window covering the image: use the "
                "whole-image mode (--crop 0)"
            )
        try:
            return cluster_vote(labels, windows[0], self.eps, self.min_samples, self.ratio)
        except ImportError as e:
            raise ConfigError(f"cliptrase dbscan_eps needs scikit-learn: pip install 'gclip[cluster]' ({e})") from None

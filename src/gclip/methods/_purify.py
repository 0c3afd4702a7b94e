"""Pieces shared by the methods that repair anomalous tokens and aggregate by feature affinity (SC-CLIP, SFP).

All functions work on one image's patch tokens (no CLS) unless they say otherwise; the methods loop over the
windows of a batch for the data-dependent steps (which tokens are anomalous) and batch the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError

__all__ = [
    "AffinityBlocks",
    "lof_outliers",
    "top_mask",
    "fill_outliers",
    "cosine_affinity",
    "threshold",
    "aggregate",
    "masked_softmax",
    "scaled_index",
    "patch_grid_features",
]


def scaled_index(index: int, depth: int) -> int:
    """A block index given for a 12-block ViT at the same relative depth of a ``depth``-block one."""
    return index if depth == 12 else max(0, min(depth - 2, round(index * depth / 12)))


@dataclass(frozen=True)
class AffinityBlocks:
    """The blocks SC-CLIP and SFP read: the prior block, the smoothing block, the multi-level range.

    Built from indices given for 12 blocks (:meth:`resolve`); block ``i``'s output is block ``i+1``'s input,
    and block L-2's output is the last block's input ``x``.
    """

    pre: int
    post: int
    multi: range

    @classmethod
    def resolve(cls, method: str, depth: int, pre: int, post: int, start: int, end: int) -> AffinityBlocks:
        if depth != 12:
            pre, post, start = scaled_index(pre, depth), scaled_index(post, depth), scaled_index(start, depth)
            end = max(start + 1, min(depth - 1, round(end * depth / 12)))
        if not (0 <= pre <= depth - 2 and 0 <= post <= depth - 2 and 0 <= start < end <= depth - 1):
            raise ConfigError(
                f"{method} block indices must lie within 0..{depth - 2} (the multi-level end within {depth - 1}) for "
                f"a {depth}-block model: pre {pre}, post {post}, multi [{start}, {end})"
            )
        return cls(pre, post, range(start, end))

    def keep(self, depth: int) -> set[int]:
        """The block inputs to keep (``BlockChange(keep=True)``)."""
        return {i + 1 for i in (self.pre, self.post, *self.multi) if i + 1 <= depth - 2}

    @staticmethod
    def output(i: int, depth: int, x: torch.Tensor, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """Block ``i``'s output tokens."""
        return x if i == depth - 2 else inputs[i + 1]

    def multi_sum(self, depth: int, x: torch.Tensor, inputs: dict[int, torch.Tensor]) -> torch.Tensor:
        """The sum of the multi-level blocks' outputs, in block order."""
        total = self.output(self.multi[0], depth, x, inputs)
        for i in self.multi[1:]:
            total = total + self.output(i, depth, x, inputs)
        return total


def patch_grid_features(vit, rows: list[torch.Tensor], grid: tuple[int, int]) -> torch.Tensor:
    """Per-window ``(P, D)`` patch tokens -> ``(B, gh, gw, E)`` projected features."""
    feats = vit.project(torch.stack(rows))
    return feats.reshape(feats.shape[0], grid[0], grid[1], -1)


def _squared_distances(x: torch.Tensor, rows: int = 32) -> torch.Tensor:
    """``||x_i - x_j||²`` for ``(P, D)`` tokens, as the norm of the explicit difference (the authors' formula),
    ``rows`` rows at a time so that the ``(P, P, D)`` difference never exists at once."""
    out = x.new_empty((x.shape[0], x.shape[0]))
    for start in range(0, x.shape[0], rows):
        out[start : start + rows] = torch.norm(x[start : start + rows, None] - x[None, :], dim=2, p=2) ** 2
    return out


def lof_outliers(x: torch.Tensor, neighbours: int = 30, contamination: float = 0.05) -> torch.Tensor:
    """``(P,)`` boolean mask of the ``(P, D)`` tokens whose local-outlier score passes its ``1 - contamination``
    quantile, with SC-CLIP's variant of the local outlier factor.

    Squared Euclidean distances; each token's ``neighbours`` nearest others (itself, at distance 0, dropped);
    the reach distance of token ``i`` to each neighbour is ``max(d_ij, kdist_i)`` with ``kdist_i`` the token's
    OWN k-th neighbour distance (textbook LOF uses the neighbour's); ``lrd_i = k / mean_j reach_ij``;
    ``lof_i = mean_{j in kNN(i)} lrd_j / lrd_i``; outliers: ``lof_i > quantile(lof, 1 - contamination)``
    (linear interpolation, strict). A mask rather than indices keeps the shapes static (``torch.compile``).
    """
    k = min(neighbours, x.shape[0] - 1)
    dist, idx = torch.topk(_squared_distances(x), k=k + 1, largest=False)
    dist, idx = dist[:, 1:], idx[:, 1:]
    reach = torch.max(dist, dist[:, -1:].expand_as(dist))
    lrd = k / torch.nan_to_num(reach.mean(dim=1), nan=1e-6)
    lof = (lrd[idx] / lrd[:, None]).mean(dim=1)
    return lof > torch.quantile(lof.float(), 1 - contamination)


def top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """``(P,)`` boolean mask of the ``k`` largest finite scores (``-inf`` marks the ineligible)."""
    values, idx = torch.topk(scores, k=min(k, scores.shape[0]))
    mask = torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
    return mask.scatter(0, idx, values > float("-inf"))


def fill_outliers(tokens: torch.Tensor, outliers: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Replace each outlier token of ``(P, D)`` row-major patch tokens by the mean of its non-outlier
    8-neighbours (zero padding at the border; one pass, so outliers never take values from each other).

    Args:
        outliers: ``(P,)`` boolean mask.

    An outlier without any non-outlier neighbour keeps its token, as in SC-CLIP. (SFP's code sets it to zero,
    whose cosine similarity is then NaN for the whole window: wherever SFP's output is finite, the two agree.)
    """
    gh, gw = grid
    d = tokens.shape[-1]
    keep = (~outliers).to(tokens.dtype)
    fmap = (tokens * keep[:, None]).t().reshape(1, d, gh, gw)
    kmap = keep.reshape(1, 1, gh, gw)
    total = torch.zeros_like(fmap)
    count = torch.zeros_like(kmap)
    fpad, kpad = F.pad(fmap, (1, 1, 1, 1)), F.pad(kmap, (1, 1, 1, 1))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                total += fpad[..., 1 + dy : 1 + dy + gh, 1 + dx : 1 + dx + gw]
                count += kpad[..., 1 + dy : 1 + dy + gh, 1 + dx : 1 + dx + gw]
    total = total.reshape(d, gh * gw).t()
    count = count.reshape(gh * gw, 1)
    return torch.where(outliers[:, None] & (count > 0), total / count.clamp(min=1), tokens)


def cosine_affinity(x: torch.Tensor) -> torch.Tensor:
    """``x̂ x̂ᵀ`` with ``x̂ = x / ||x||`` over the last axis (no epsilon, as the authors): ``(..., P, P)``."""
    unit = x / x.norm(dim=-1, keepdim=True)
    return unit @ unit.transpose(-1, -2)


def threshold(affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """Entries below ``beta`` set to zero."""
    return torch.where(affinity < beta, torch.zeros_like(affinity), affinity)


def aggregate(affinity: torch.Tensor, x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Tokens ``x`` ``(..., P, D)`` averaged with row-normalised weights ``A / (rowsum(A) + eps)``."""
    return (affinity / (affinity.sum(dim=-1, keepdim=True) + eps)) @ x


def masked_softmax(affinity: torch.Tensor, scale: float = 3.0) -> torch.Tensor:
    """``softmax(scale (A - mean A))`` over the last axis, with entries below the mean of the whole ``(P, P)``
    matrix (per image) excluded: the similarity-prior attention of SC-CLIP and SFP."""
    z = scale * (affinity - affinity.mean(dim=(-2, -1), keepdim=True))
    return torch.softmax(z.masked_fill(z < 0, float("-inf")), dim=-1)

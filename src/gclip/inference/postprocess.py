"""From merged window logits to labels: resize to the image, softmax, synonyms, thresholds, PAMR.

The final resize and the per-pixel reduction run in row tiles, so full-resolution logits for all classes
never exist at once: peak memory is ``classes x tile_rows x width`` instead of ``classes x height x width``.
The tiled bilinear resize reproduces ``F.interpolate(..., mode="bilinear", align_corners=False)``.

:class:`StreamingReduction` goes one step further: it is fed the merged logits a band of rows at a time, top
to bottom, and emits every output row whose two source rows have arrived, so not even the merged logits
need to exist whole (the Segmenter uses it for large images; see ``Segmenter.infer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .result import UNLABELED  # a pixel no class is sure enough of (prob_thd) when there is no background class

__all__ = [
    "UNLABELED",
    "Reduction",
    "StreamingReduction",
    "bilinear_indices",
    "resize_rows",
    "reduce_logits",
    "refine_labels",
    "pamr",
]

TILE_ELEMENTS = 1 << 24  # floats per tile (64 MiB in fp32)


def bilinear_indices(n_in: int, n_out: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weights of a 1-D bilinear resize (align_corners=False, no antialias)."""
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * scale - 0.5).clamp_(min=0)
    i0 = src.floor().long().clamp_(max=n_in - 1)
    i1 = (i0 + 1).clamp_(max=n_in - 1)
    return i0.to(device), i1.to(device), (src - i0.float()).to(device)


def resize_rows(
    logits: torch.Tensor,
    rows: tuple[int, int],
    cols_index: tuple[torch.Tensor, ...],
    rows_index: tuple[torch.Tensor, ...],
) -> torch.Tensor:
    """Rows ``[r0, r1)`` of the bilinear resize of ``(Q, h, w)`` logits, given precomputed axis indices."""
    r0, r1 = rows
    i0, i1, lam = (t[r0:r1] for t in rows_index)
    lam = lam[None, :, None]
    band = logits.index_select(1, i0) * (1 - lam) + logits.index_select(1, i1) * lam
    j0, j1, mu = cols_index
    return band.index_select(2, j0) * (1 - mu) + band.index_select(2, j1) * mu


@dataclass
class Reduction:
    """Output of :func:`reduce_logits`: labels ``(H, W)`` int32, and per-class probabilities if asked."""

    labels: torch.Tensor
    probs: torch.Tensor | None = None


def _class_probs(tile: torch.Tensor, logit_scale: float, query_to_class: torch.Tensor, n_classes: int) -> torch.Tensor:
    probs = torch.softmax(tile * logit_scale, dim=0)
    if probs.shape[0] == n_classes:
        return probs
    out = probs.new_zeros((n_classes,) + probs.shape[1:])
    index = query_to_class.view(-1, *([1] * (probs.dim() - 1))).expand_as(probs)
    return out.scatter_reduce_(0, index, probs, "amax", include_self=True)


def reduce_logits(
    logits: torch.Tensor,
    size: tuple[int, int],
    query_to_class: list[int],
    logit_scale: float = 50.0,
    prob_thd: float = 0.0,
    area_thd: float | None = None,
    return_probs: bool = False,
    tile_elements: int = TILE_ELEMENTS,
    background: bool = True,
) -> Reduction:
    """Labels at ``size`` from merged cosine logits.

    Args:
        logits: ``(Q, h, w)`` cosine similarities per query (synonyms are separate queries).
        size: ``(H, W)`` output size (the original image).
        query_to_class: class index of each query; a class's probability is the max over its queries.
        logit_scale: multiplies the logits before the softmax over queries.
        prob_thd: pixels whose top probability is below it become class 0 (the background) or, without
            a background class, :data:`UNLABELED`.
        area_thd: classes (but the background) predicted on less than this fraction of the pixels predicted
            as one of them get probability 0 (then labels are recomputed); if that drops every class, the
            largest is kept.
        return_probs: also return ``(C, H, W)`` class probabilities (after ``area_thd``).
        background: class 0 is a background class (the benchmarks' protocol); ``False``: every class is a
            real one.

    Returns:
        A :class:`Reduction`.
    """
    device = logits.device
    logits = logits.float()
    height, width = size
    n_classes = max(query_to_class) + 1
    q2c = torch.tensor(query_to_class, device=device)
    rows_index = bilinear_indices(logits.shape[1], height, device)
    cols_index = bilinear_indices(logits.shape[2], width, device)
    cols_index = (cols_index[0], cols_index[1], cols_index[2][None, None, :])
    step = max(1, tile_elements // max(1, logits.shape[0] * width))
    tiles = [(r, min(r + step, height)) for r in range(0, height, step)]

    # Small enough to resize whole: one interpolate call (faster); otherwise row tiles.
    full = None
    if logits.shape[0] * height * width <= tile_elements:
        full = F.interpolate(logits[None], size=size, mode="bilinear")[0] if logits.shape[1:] != size else logits

    def tile_of(rows: tuple[int, int]) -> torch.Tensor:
        if full is not None:
            return full[:, rows[0] : rows[1]]
        return resize_rows(logits, rows, cols_index, rows_index)

    def probs_of(rows: tuple[int, int]) -> torch.Tensor:
        return _class_probs(tile_of(rows), logit_scale, q2c, n_classes)

    keep = torch.ones(n_classes, device=device)
    if area_thd is not None and area_thd > 0 and n_classes > 1:
        counts = torch.zeros(n_classes, device=device)
        for rows in tiles:
            counts += torch.bincount(probs_of(rows).argmax(0).flatten(), minlength=n_classes).float()
        keep = area_keep(counts, area_thd, background)
    labels = torch.empty((height, width), dtype=torch.int32, device=device)
    probs_out = torch.empty((n_classes, height, width), device=device) if return_probs else None
    dropped = None if bool(keep.all()) else keep
    for r0, r1 in tiles:
        tile_labels, probs = _reduce_tile(
            tile_of((r0, r1)), q2c, n_classes, logit_scale, prob_thd, probs_out is not None, dropped, background
        )
        labels[r0:r1] = tile_labels
        if probs_out is not None:
            probs_out[:, r0:r1] = probs
    return Reduction(labels, probs_out)


def area_keep(counts: torch.Tensor, area_thd: float, background: bool = True) -> torch.Tensor:
    """Per class 1 (kept) or 0 (dropped by ``area_thd``), from the ``(C,)`` pixel counts of each class's argmax.

    The background (class 0, when ``background``) is always kept and not counted; without one, if every
    class falls below the threshold the largest is kept.
    """
    first = 1 if background else 0
    keep = torch.ones_like(counts)
    candidates = counts[first:]
    keep[first:] = (candidates > area_thd * candidates.sum()).float()
    if not bool(keep.any()):
        keep[counts.argmax()] = 1
    return keep


def refine_labels(method: Any, labels: torch.Tensor, contexts: Sequence[Any], n_classes: int) -> torch.Tensor:
    """``method.refine_labels(labels, contexts)`` with :data:`UNLABELED` pixels shown to it as one more class
    (``n_classes``), so a refinement that counts or closes label values sees no negative one; they come back
    as :data:`UNLABELED`."""
    unlabeled = labels < 0
    if not bool(unlabeled.any()):
        return method.refine_labels(labels, contexts)
    refined = method.refine_labels(torch.where(unlabeled, n_classes, labels), contexts)
    return torch.where(refined >= n_classes, UNLABELED, refined)


def _reduce_tile(
    tile: torch.Tensor,
    q2c: torch.Tensor,
    n_classes: int,
    logit_scale: float,
    prob_thd: float,
    want_probs: bool,
    keep: torch.Tensor | None = None,
    background: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Labels of one ``(Q, ...)`` tile of logits, and its class probabilities when wanted or needed.

    ``keep`` (per class, 0 or 1) zeroes the probabilities of dropped classes before the argmax; ``prob_thd``
    sends pixels to class 0 with a ``background``, else to :data:`UNLABELED`.
    """
    if not want_probs and prob_thd <= 0 and keep is None:
        return q2c[tile.argmax(0)], None  # softmax and the synonym max keep the argmax: skip them
    probs = _class_probs(tile, logit_scale, q2c, n_classes)
    if keep is not None:
        probs = probs * keep[:, None, None]
    top, labels = probs.max(0)
    if prob_thd > 0:
        labels[top < prob_thd] = 0 if background else UNLABELED
    return labels, probs


class StreamingReduction:
    """:func:`reduce_logits` (without ``area_thd``) fed the merged logits band by band, top to bottom (or, with
    ``axis=1``, left to right).

    Output row ``r`` of the bilinear resize reads source rows ``i0[r] <= i1[r]``; once source rows up to
    ``i1[r]`` have arrived it is final and is reduced at once. Only the source rows still needed (at most
    one row carried over, none when the resize is the identity) are kept between calls. With ``axis=1`` the
    same holds for columns. Either way every output pixel is interpolated with the arithmetic of
    :func:`reduce_logits` (rows first, then columns), so the logits are the same.

    Args:
        src_size: ``(h, w)`` of the merged logits.
        size, query_to_class, logit_scale, prob_thd, return_probs, tile_elements, background: as for
            :func:`reduce_logits`.
        device: where the outputs live.
        axis: 0 to be fed bands of rows ``(Q, n, w)``, 1 for bands of columns ``(Q, h, n)``.
    """

    def __init__(
        self,
        src_size: tuple[int, int],
        size: tuple[int, int],
        query_to_class: list[int],
        logit_scale: float = 50.0,
        prob_thd: float = 0.0,
        return_probs: bool = False,
        tile_elements: int = TILE_ELEMENTS,
        device: torch.device | str = "cpu",
        axis: int = 0,
        background: bool = True,
    ) -> None:
        if axis not in (0, 1):
            raise ValueError(f"axis must be 0 (rows) or 1 (columns), got {axis}")
        device = torch.device(device)
        self.axis = axis
        self.src_len, self.out_len = src_size[axis], size[axis]
        self.out_across = size[1 - axis]
        self.identity = tuple(src_size) == tuple(size)
        self.n_classes = max(query_to_class) + 1
        self.q2c = torch.tensor(query_to_class, device=device)
        self.logit_scale, self.prob_thd, self.tile_elements = logit_scale, prob_thd, tile_elements
        self.background = background
        self.rows_index = bilinear_indices(src_size[0], size[0], device)
        cols = bilinear_indices(src_size[1], size[1], device)
        self.cols_index = (cols[0], cols[1], cols[2][None, None, :])
        self.along = self.rows_index if axis == 0 else cols  # the streamed axis's indices
        self.labels = torch.empty((size[0], size[1]), dtype=torch.int32, device=device)
        self.probs = torch.empty((self.n_classes, size[0], size[1]), device=device) if return_probs else None
        self._carry: torch.Tensor | None = None  # source lines [carry_start, received)
        self._carry_start = 0
        self.received = 0  # source lines (rows or columns) fed so far
        self.done = 0  # output lines reduced so far

    def _resize(self, lines: torch.Tensor, start: int, out: tuple[int, int]) -> torch.Tensor:
        """Output lines ``out`` from source lines ``lines`` (the first of which is source line ``start``)."""
        o0, o1 = out
        if self.axis == 0:
            i0, i1, lam = self.rows_index
            return resize_rows(lines, out, self.cols_index, (i0 - start, i1 - start, lam))
        j0, j1, mu = (t[o0:o1] for t in self.along)
        first, last = int(j0[0].item()), int(j1[-1].item()) + 1
        needed = lines[:, :, first - start : last - start]
        i0, i1, lam = self.rows_index
        lam = lam[None, :, None]
        band = needed.index_select(1, i0) * (1 - lam) + needed.index_select(1, i1) * lam  # rows first, as resize_rows
        return band.index_select(2, j0 - first) * (1 - mu) + band.index_select(2, j1 - first) * mu

    def _store(self, out: tuple[int, int], labels: torch.Tensor, probs: torch.Tensor | None) -> None:
        o0, o1 = out
        if self.axis == 0:
            self.labels[o0:o1] = labels
            if probs is not None and self.probs is not None:
                self.probs[:, o0:o1] = probs
        else:
            self.labels[:, o0:o1] = labels
            if probs is not None and self.probs is not None:
                self.probs[:, :, o0:o1] = probs

    def feed(self, lines: torch.Tensor) -> None:
        """The next source rows ``(Q, n, w)`` (columns ``(Q, h, n)`` with ``axis=1``), following those fed."""
        dim = 1 + self.axis
        lines = lines.float()
        start = self.received
        if self._carry is not None:
            lines = torch.cat([self._carry, lines], dim=dim)
            start = self._carry_start
        self.received = start + lines.shape[dim]
        i0, i1, _ = self.along
        end = self.out_len if self.received >= self.src_len else int(torch.searchsorted(i1, self.received).item())
        step = max(1, self.tile_elements // max(1, lines.shape[0] * self.out_across))
        for o0 in range(self.done, end, step):
            o1 = min(o0 + step, end)
            if self.identity:  # no resize: the lines themselves (what the bilinear weights 1 and 0 give)
                tile = lines.narrow(dim, o0 - start, o1 - o0)
            else:
                tile = self._resize(lines, start, (o0, o1))
            labels, probs = _reduce_tile(
                tile,
                self.q2c,
                self.n_classes,
                self.logit_scale,
                self.prob_thd,
                self.probs is not None,
                background=self.background,
            )
            self._store((o0, o1), labels, probs)
        self.done = end
        keep_from = int(i0[end].item()) if end < self.out_len else self.received
        if keep_from < self.received:
            self._carry = lines.narrow(dim, keep_from - start, self.received - keep_from).clone()
        else:
            self._carry = None
        self._carry_start = keep_from

    def result(self) -> Reduction:
        """The :class:`Reduction`, once every source row (or column) has been fed."""
        if self.received < self.src_len:
            what = "rows" if self.axis == 0 else "columns"
            raise RuntimeError(f"only {self.received} of {self.src_len} {what} were fed")
        return Reduction(self.labels, self.probs)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``x`` (B, C, H, W) read at offset (dy, dx) with border replication."""
    h, w = x.shape[-2:]
    rows = (torch.arange(h, device=x.device) + dy).clamp_(0, h - 1)
    cols = (torch.arange(w, device=x.device) + dx).clamp_(0, w - 1)
    return x[:, :, rows][:, :, :, cols]


def pamr(
    image: torch.Tensor, logits: torch.Tensor, steps: int = 10, dilations: tuple[int, ...] = (8, 16)
) -> torch.Tensor:
    """Pixel-Adaptive Mask Refinement (Araslanov & Roth, CVPR 2020) of ``(B, C, H, W)`` logits.

    Each pixel's affinity to its 8 neighbours at every dilation is a softmax of minus their colour distance,
    scaled by the local colour spread; the logits are then repeatedly replaced by the affinity-weighted mean
    of the neighbours' logits.

    Args:
        image: ``(B, 3, H', W')`` image (any normalisation); resized to the logits' size (align_corners=True).
        logits: ``(B, C, H, W)``.
        steps: number of propagation steps.
        dilations: neighbourhood dilations in pixels.
    """
    image = F.interpolate(image.float(), size=logits.shape[-2:], mode="bilinear", align_corners=True)
    offsets = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]
    window = [(dy * d, dx * d) for d in dilations for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    stack = torch.stack([_shift(image, dy, dx) for dy, dx in window], dim=2)  # (B, 3, 9*D, H, W)
    spread = stack.std(dim=2, keepdim=True)
    del stack
    diffs = torch.stack([(_shift(image, dy, dx) - image).abs() for dy, dx in offsets], dim=2)
    affinity = torch.softmax((-diffs / (1e-8 + 0.1 * spread)).mean(dim=1), dim=1)  # (B, K, H, W)
    del diffs
    out = logits.float()
    for _ in range(steps):
        new = torch.zeros_like(out)
        for k, (dy, dx) in enumerate(offsets):
            new += _shift(out, dy, dx) * affinity[:, k : k + 1]
        out = new
    return out.to(logits.dtype)

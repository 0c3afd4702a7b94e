"""mmseg's IoU metric: per-class intersect / union / prediction / label areas, summed over a dataset.

Semantics (mmsegmentation ``IoUMetric``): per image, at the label's resolution, pixels whose label equals the
ignore index are dropped; values outside ``0..C-1`` are not counted in any class; ``union = pred + label -
intersect``. Areas are summed over images (and over processes); ``IoU_c = intersect_c / union_c``, mIoU is
the mean over classes with a non-empty union, aAcc is total intersect over total label area. Areas are
exact int64 counts (mmseg sums float32 histograms, which can differ in the last digits on huge sets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Areas", "image_areas", "summarize"]


@dataclass
class Areas:
    """Per-class pixel counts, each ``(C,)`` int64."""

    intersect: np.ndarray
    union: np.ndarray
    pred: np.ndarray
    label: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> Areas:
        return cls(*(np.zeros(num_classes, dtype=np.int64) for _ in range(4)))

    def __iadd__(self, other: Areas) -> Areas:
        self.intersect += other.intersect
        self.union += other.union
        self.pred += other.pred
        self.label += other.label
        return self

    def stack(self) -> np.ndarray:
        """``(4, C)`` int64: intersect, union, pred, label."""
        return np.stack([self.intersect, self.union, self.pred, self.label])

    @classmethod
    def from_stack(cls, stacked: np.ndarray) -> Areas:
        return cls(*(np.asarray(row, dtype=np.int64).copy() for row in stacked))


def _count(values: np.ndarray, num_classes: int) -> np.ndarray:
    values = values[(values >= 0) & (values < num_classes)]
    return np.bincount(values, minlength=num_classes).astype(np.int64)


def image_areas(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore_index: int = 255) -> Areas:
    """The four area vectors of one image.

    Args:
        pred: ``(H, W)`` integer predicted classes ``0..C-1``.
        label: ``(H, W)`` integer ground truth (already reduced for ``reduce_zero_label`` sets).
        num_classes: ``C``.
        ignore_index: label value that is not scored.

    >>> a = image_areas(np.array([[0, 1], [1, 1]]), np.array([[0, 1], [0, 255]]), 2)
    >>> a.intersect.tolist(), a.union.tolist()
    ([1, 1], [2, 2])
    """
    if pred.shape != label.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from label shape {label.shape}")
    keep = label != ignore_index
    pred = pred[keep].astype(np.int64)
    label = label[keep].astype(np.int64)
    intersect = _count(pred[pred == label], num_classes)
    area_pred = _count(pred, num_classes)
    area_label = _count(label, num_classes)
    return Areas(intersect, area_pred + area_label - intersect, area_pred, area_label)


def summarize(areas: Areas) -> dict[str, object]:
    """mIoU, aAcc and mAcc in percent (two decimals), and per-class IoU / Acc (``None`` where undefined).

    >>> s = summarize(image_areas(np.array([[0, 1]]), np.array([[0, 1]]), 3))
    >>> s["mIoU"], s["IoU"]
    (100.0, [100.0, 100.0, None])
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = areas.intersect / areas.union
        acc = areas.intersect / areas.label
    total = areas.label.sum()

    def pct(x: float) -> float | None:
        return None if np.isnan(x) else round(float(x) * 100.0, 2)

    return {
        "mIoU": pct(np.nanmean(iou)) if np.any(areas.union > 0) else None,
        "aAcc": pct(areas.intersect.sum() / total) if total > 0 else None,
        "mAcc": pct(np.nanmean(acc)) if np.any(areas.label > 0) else None,
        "IoU": [pct(v) for v in iou],
        "Acc": [pct(v) for v in acc],
    }

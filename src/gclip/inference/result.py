"""The neutral result object returned by the Segmenter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["SegmentationResult", "UNLABELED"]

UNLABELED = -1
"""The label of a pixel left unlabeled (see :attr:`SegmentationResult.labels`)."""


@dataclass
class SegmentationResult:
    """One image's segmentation.

    Attributes:
        labels: ``(H, W)`` int32 class indices at the image's original size; ``-1`` (:data:`UNLABELED`) where
            ``prob_thd`` found no class sure enough and the class list has no background class.
        class_names: display name of each class index.
        probs: ``(C, H, W)`` float32 class probabilities when asked for, else ``None``.
        key: the input's identifier (its path, or what the caller passed).
        background: class 0 is a background class (see :attr:`gclip.text.ClassList.background`).
    """

    labels: np.ndarray
    class_names: list[str]
    probs: np.ndarray | None = None
    key: Any = None
    background: bool = False

    @property
    def size(self) -> tuple[int, int]:
        """``(H, W)``."""
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    @property
    def unlabeled_fraction(self) -> float:
        """Fraction of the pixels left unlabeled (``-1``)."""
        return float((self.labels < 0).sum()) / max(1, int(self.labels.size))

    def class_fractions(self) -> dict[str, float]:
        """Fraction of pixels of each class present, largest first (unlabeled pixels count in none)."""
        labels = self.labels.ravel()
        counts = np.bincount(labels[labels >= 0], minlength=len(self.class_names))
        total = max(1, int(self.labels.size))
        present = [(self.class_names[i], counts[i] / total) for i in np.flatnonzero(counts)]
        return dict(sorted(present, key=lambda kv: -kv[1]))

    def mask(self, name: str) -> np.ndarray:
        """``(H, W)`` bool mask of one class by name."""
        return self.labels == self.class_names.index(name)

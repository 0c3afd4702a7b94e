"""Where window logits are summed: a whole-image canvas, or a streamed band of rows for large images.

Both average overlapping windows the same way (sum of upsampled window logits, divided by the number of
windows covering a pixel), adding windows in the order they arrive, so they give identical values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from .postprocess import TILE_ELEMENTS, Reduction, StreamingReduction

__all__ = ["Canvas", "BandCanvas"]

Box = tuple[int, int, int, int]


class Canvas:
    """The whole ``(Q, h, w)`` canvas and its ``(1, h, w)`` overlap count."""

    def __init__(self, n_queries: int, size: tuple[int, int], device: torch.device | str) -> None:
        self.logits = torch.zeros((n_queries, *size), device=device)
        self.count = torch.zeros((1, *size), device=device)

    def add(self, box: Box, up: torch.Tensor) -> None:
        """Add one window's ``(Q, y2-y1, x2-x1)`` logits at ``box = (y1, y2, x1, x2)``."""
        y1, y2, x1, x2 = box
        self.logits[:, y1:y2, x1:x2] += up
        self.count[:, y1:y2, x1:x2] += 1

    def merged(self) -> torch.Tensor:
        """The window-averaged ``(Q, h, w)`` logits."""
        return self.logits / self.count


class BandCanvas:
    """A canvas that keeps only the rows some window still has to add to, and hands finished rows on.

    Rows are stored in a ring buffer (row ``y`` at ``y % capacity``). After each window, the rows above the
    top of every window not yet added are final: they are averaged and fed to ``reducer`` (top to bottom, in
    chunks of about ``TILE_ELEMENTS`` floats) and their slots are cleared for reuse. With windows arriving in
    row-major order (as the Segmenter sends them) the ring never holds more than one window height of rows;
    it grows if windows arrive in another order.

    Args:
        n_queries: Q.
        size: ``(h, w)`` of the canvas.
        boxes: every window that will be added, as ``(y1, y2, x1, x2)``.
        reducer: receives the averaged rows; see :class:`~gclip.postprocess.StreamingReduction`.
        device: where the band lives.
    """

    def __init__(
        self,
        n_queries: int,
        size: tuple[int, int],
        boxes: list[Box],
        reducer: StreamingReduction,
        device: torch.device | str,
    ) -> None:
        self.height, self.width = size
        self.reducer = reducer
        self.pending = Counter(box[0] for box in boxes)
        self.capacity = max(box[1] - box[0] for box in boxes)
        self.logits = torch.zeros((n_queries, self.capacity, self.width), device=device)
        self.count = torch.zeros((1, self.capacity, self.width), device=device)
        self.top = 0  # rows above it have been handed on
        self.bottom = 0  # rows below it have not been written yet

    def _segments(self, y1: int, y2: int) -> Iterator[tuple[int, int, int]]:
        """``(ring_row, image_row, n)`` pieces of image rows ``[y1, y2)``."""
        y = y1
        while y < y2:
            r = y % self.capacity
            n = min(y2 - y, self.capacity - r)
            yield r, y, n
            y += n

    def _grow(self, rows: int) -> None:
        old_logits, old_count, old_segments = self.logits, self.count, list(self._segments(self.top, self.bottom))
        self.capacity = max(rows, 2 * self.capacity)
        self.logits = old_logits.new_zeros((old_logits.shape[0], self.capacity, self.width))
        self.count = old_count.new_zeros((1, self.capacity, self.width))
        for r_old, y, n in old_segments:
            for r_new, y_new, m in self._segments(y, y + n):
                offset = r_old + (y_new - y)
                self.logits[:, r_new : r_new + m] = old_logits[:, offset : offset + m]
                self.count[:, r_new : r_new + m] = old_count[:, offset : offset + m]

    def add(self, box: Box, up: torch.Tensor) -> None:
        """Add one window's logits (see :meth:`Canvas.add`), then hand on the rows that became final."""
        y1, y2, x1, x2 = box
        if y2 - self.top > self.capacity:
            self._grow(y2 - self.top)
        for r, y, n in self._segments(y1, y2):
            self.logits[:, r : r + n, x1:x2] += up[:, y - y1 : y - y1 + n]
            self.count[:, r : r + n, x1:x2] += 1
        self.bottom = max(self.bottom, y2)
        self.pending[y1] -= 1
        if self.pending[y1] == 0:
            del self.pending[y1]
        self._flush(min(self.pending) if self.pending else self.height)

    def _flush(self, final: int) -> None:
        chunk = max(1, TILE_ELEMENTS // max(1, self.logits.shape[0] * self.width))
        for start in range(self.top, final, chunk):
            for r, _, n in self._segments(start, min(start + chunk, final)):
                self.reducer.feed(self.logits[:, r : r + n] / self.count[:, r : r + n])
                self.logits[:, r : r + n] = 0
                self.count[:, r : r + n] = 0
        self.top = max(self.top, final)

    def reducer_result(self) -> Reduction:
        """The reduction of the whole image, once every window has been added."""
        return self.reducer.result()

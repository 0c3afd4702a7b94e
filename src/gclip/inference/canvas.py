"""Where window logits are summed: a whole-image canvas, or a streamed band of rows for large images.

Both average overlapping windows the same way (sum of upsampled window logits, divided by the number of
windows covering a pixel), adding windows in the order they arrive, so they give identical values.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from .postprocess import TILE_ELEMENTS, Reduction, StreamingReduction

__all__ = ["Canvas", "BandCanvas", "WindowUpsample"]

Box = tuple[int, int, int, int]


class WindowUpsample:
    """One window's patch logits, upsampled to the window on demand, a few classes at a time.

    ``F.interpolate`` treats channels independently, so class chunks give exactly the values of one call, while
    only ``max_elements`` floats of the upsampled window exist at once (a whole window of 150 classes at
    448x448 would be 120 MB).

    Args:
        logits: ``(Q, gh, gw)`` patch logits of the window.
        size: ``(H, W)`` to upsample to (the window, padding included).
        crop: ``(top, h, left, w)``: the part of the upsampled window that lies on the image.
        max_elements: floats per chunk.
    """

    def __init__(
        self, logits: torch.Tensor, size: tuple[int, int], crop: tuple[int, int, int, int], max_elements: int
    ) -> None:
        self.logits, self.size, self.crop = logits, size, crop
        self.step = max(1, max_elements // max(1, size[0] * size[1]))

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(first class index, (q, h, w) logits)`` pieces covering every class."""
        top, h, left, w = self.crop
        for q0 in range(0, self.logits.shape[0], self.step):
            up = F.interpolate(self.logits[None, q0 : q0 + self.step], size=self.size, mode="bilinear")[0]
            yield q0, up[:, top : top + h, left : left + w]


def _chunks(up: torch.Tensor | WindowUpsample) -> Iterator[tuple[int, torch.Tensor]]:
    if isinstance(up, torch.Tensor):
        yield 0, up
    else:
        yield from up.chunks()


class Canvas:
    """The whole ``(Q, h, w)`` canvas and its ``(1, h, w)`` overlap count."""

    def __init__(self, n_queries: int, size: tuple[int, int], device: torch.device | str) -> None:
        self.logits = torch.zeros((n_queries, *size), device=device)
        self.count = torch.zeros((1, *size), device=device)

    def add(self, box: Box, up: torch.Tensor | WindowUpsample) -> None:
        """Add one window's ``(Q, y2-y1, x2-x1)`` logits (or its :class:`WindowUpsample`) at ``(y1, y2, x1, x2)``."""
        y1, y2, x1, x2 = box
        for q0, part in _chunks(up):
            self.logits[q0 : q0 + part.shape[0], y1:y2, x1:x2] += part
        self.count[:, y1:y2, x1:x2] += 1

    def merged(self) -> torch.Tensor:
        """The window-averaged ``(Q, h, w)`` logits."""
        return self.logits / self.count


class BandCanvas:
    """A canvas that keeps only the rows (or columns) some window still has to add to, and hands finished ones on.

    Along the streamed axis (rows for ``axis=0``, columns for ``axis=1``) lines are stored in a ring buffer
    (line ``y`` at ``y % capacity``). After each window, the lines before the start of every window not yet
    added are final: they are averaged and fed to ``reducer`` (in order, in chunks of about ``TILE_ELEMENTS``
    floats) and their slots are cleared for reuse. With windows arriving in that order (row-major for rows,
    column-major for columns, as the Segmenter sends them) the ring never holds more than one window of lines;
    it grows if windows arrive in another order. Streaming the columns of a landscape image keeps a
    ``crop x height`` band instead of ``crop x width``.

    Args:
        n_queries: Q.
        size: ``(h, w)`` of the canvas.
        boxes: every window that will be added, as ``(y1, y2, x1, x2)``.
        reducer: receives the averaged lines; see :class:`~gclip.inference.postprocess.StreamingReduction` (same
        ``axis``).
        device: where the band lives.
        axis: 0 to stream rows, 1 to stream columns.
    """

    def __init__(
        self,
        n_queries: int,
        size: tuple[int, int],
        boxes: list[Box],
        reducer: StreamingReduction,
        device: torch.device | str,
        axis: int = 0,
    ) -> None:
        if getattr(reducer, "axis", 0) != axis:
            raise ValueError("the reducer must stream the same axis as the canvas")
        self.axis = axis
        self.length, self.across = size[axis], size[1 - axis]
        self.reducer = reducer
        self.pending = Counter(self._along(box)[0] for box in boxes)
        self.capacity = max(self._along(box)[1] - self._along(box)[0] for box in boxes)
        self.logits = torch.zeros(self._shape(n_queries, self.capacity), device=device)
        self.count = torch.zeros(self._shape(1, self.capacity), device=device)
        self.top = 0  # lines before it have been handed on
        self.bottom = 0  # lines from it on have not been written yet

    def _along(self, box: Box) -> tuple[int, int]:
        return (box[0], box[1]) if self.axis == 0 else (box[2], box[3])

    def _shape(self, channels: int, lines: int) -> tuple[int, int, int]:
        return (channels, lines, self.across) if self.axis == 0 else (channels, self.across, lines)

    def _lines(self, t: torch.Tensor, start: int, n: int) -> torch.Tensor:
        """Lines ``[start, start + n)`` of a ``(C, ...)`` tensor along the streamed axis (a view)."""
        return t.narrow(1 + self.axis, start, n)

    def _segments(self, y1: int, y2: int) -> Iterator[tuple[int, int, int]]:
        """``(ring_line, image_line, n)`` pieces of image lines ``[y1, y2)``."""
        y = y1
        while y < y2:
            r = y % self.capacity
            n = min(y2 - y, self.capacity - r)
            yield r, y, n
            y += n

    def _grow(self, lines: int) -> None:
        old_logits, old_count, old_segments = self.logits, self.count, list(self._segments(self.top, self.bottom))
        self.capacity = max(lines, 2 * self.capacity)
        self.logits = old_logits.new_zeros(self._shape(old_logits.shape[0], self.capacity))
        self.count = old_count.new_zeros(self._shape(1, self.capacity))
        for r_old, y, n in old_segments:
            for r_new, y_new, m in self._segments(y, y + n):
                offset = r_old + (y_new - y)
                self._lines(self.logits, r_new, m).copy_(self._lines(old_logits, offset, m))
                self._lines(self.count, r_new, m).copy_(self._lines(old_count, offset, m))

    def add(self, box: Box, up: torch.Tensor | WindowUpsample) -> None:
        """Add one window's logits (see :meth:`Canvas.add`), then hand on the lines that became final."""
        y1, y2 = self._along(box)
        x1, x2 = (box[2], box[3]) if self.axis == 0 else (box[0], box[1])  # across the streamed axis
        if y2 - self.top > self.capacity:
            self._grow(y2 - self.top)
        across = 2 - self.axis
        for q0, part in _chunks(up):
            classes = self.logits.narrow(0, q0, part.shape[0])
            for r, y, n in self._segments(y1, y2):
                self._lines(classes, r, n).narrow(across, x1, x2 - x1).add_(self._lines(part, y - y1, n))
        for r, _, n in self._segments(y1, y2):
            self._lines(self.count, r, n).narrow(across, x1, x2 - x1).add_(1)
        self.bottom = max(self.bottom, y2)
        self.pending[y1] -= 1
        if self.pending[y1] == 0:
            del self.pending[y1]
        self._flush(min(self.pending) if self.pending else self.length)

    def _flush(self, final: int) -> None:
        chunk = max(1, TILE_ELEMENTS // max(1, self.logits.shape[0] * self.across))
        for start in range(self.top, final, chunk):
            for r, _, n in self._segments(start, min(start + chunk, final)):
                self.reducer.feed(self._lines(self.logits, r, n) / self._lines(self.count, r, n))
                self._lines(self.logits, r, n).zero_()
                self._lines(self.count, r, n).zero_()
        self.top = max(self.top, final)

    def reducer_result(self) -> Reduction:
        """The reduction of the whole image, once every window has been added."""
        return self.reducer.result()

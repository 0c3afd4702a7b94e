"""The local engine: decoding in worker processes (:mod:`.workers`), overlapped with the model; many images per
model call (:func:`~gclip.engines.batch.infer_batch`)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..inference.preprocess import Prepared, Preprocessor
from ..inference.result import SegmentationResult
from ..inference.segmenter import Segmenter
from ..io.inputs import InputItem, read_input
from .batch import infer_batch, one_line_error
from .workers import map_in_workers

__all__ = ["ItemResult", "iter_items", "default_workers", "item_error"]


@dataclass
class ItemResult:
    """The outcome for one input: a result, or the one-line reason it failed.

    Attributes:
        item: the input.
        result: the segmentation, or ``None`` when the image failed.
        error: why it failed, or ``None``.
        image: the decoded ``HxWx3 uint8 RGB`` image when asked for (``keep_images``), else ``None``.
        seconds: decode + model time spent on this image (its share of its batch's model call).
    """

    item: InputItem
    result: SegmentationResult | None = None
    error: str | None = None
    image: np.ndarray | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class _Loaded:
    item: InputItem
    prepared: Prepared | None
    image: np.ndarray | None
    error: str | None
    seconds: float


def item_error(item: InputItem, e: BaseException) -> str:
    """The one-line report of an input that failed (see :func:`~gclip.engines.batch.one_line_error`)."""
    return one_line_error(e, item.name, item.path)


def _unread(item: InputItem, e: Exception) -> _Loaded:
    return _Loaded(item, None, None, item_error(item, e), 0.0)


@dataclass(frozen=True)
class _Reader:
    """Reads and prepares one input in a worker with the Segmenter's (model-less, picklable) preprocessor.

    Failures come back as a record with a one-line message instead of an exception, so a batch goes on.
    """

    preprocessor: Preprocessor
    keep_image: bool = False

    def __call__(self, item: InputItem) -> _Loaded:
        start = time.perf_counter()
        try:
            image = read_input(item, self.preprocessor.max_pixels)
            prepared = self.preprocessor(image, key=item.key)
        except Exception as e:  # noqa: BLE001 - every failure becomes a one-line report
            return _Loaded(item, None, None, item_error(item, e), time.perf_counter() - start)
        return _Loaded(item, prepared, image if self.keep_image else None, None, time.perf_counter() - start)


def default_workers() -> int:
    """Decoding workers by default: the CPU cores this process may use, minus one for the model, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def iter_items(
    segmenter: Segmenter,
    items: Sequence[InputItem],
    images_per_batch: int = 8,
    workers: int | None = None,
    return_probs: bool = False,
    keep_images: bool = False,
) -> Iterator[ItemResult]:
    """Segment items in input order: workers decode while the model runs on the previous batch.

    Args:
        segmenter: a Segmenter with classes set.
        items: the inputs (see :func:`~gclip.engines.collect_inputs`).
        images_per_batch: images per :meth:`Segmenter.infer` call (their windows share forward passes of
            ``settings.batch_size`` windows).
        workers: decoding processes (``0``: decode in this process; ``None``: :func:`default_workers`).
        return_probs: compute ``(C, H, W)`` probabilities.
        keep_images: also return each decoded image (for overlays).

    Yields:
        One :class:`ItemResult` per item, failures included.
    """
    segmenter.query_embeddings()
    workers = default_workers() if workers is None else workers
    reader = _Reader(segmenter.preprocessor, keep_images)
    batches = map_in_workers(reader, items, _unread, images_per_batch, workers if len(items) > 1 else 0)
    for batch in batches:
        good = [x for x in batch if x.error is None]
        prepared = [x.prepared for x in good]
        start = time.perf_counter()
        outcomes = infer_batch(segmenter, prepared, [x.item.name for x in good], return_probs)  # type: ignore[arg-type]
        share = (time.perf_counter() - start) / max(1, len(good))
        by_key = {x.item.key: o for x, o in zip(good, outcomes)}
        for x in batch:
            outcome = by_key.get(x.item.key, x.error)
            if isinstance(outcome, SegmentationResult):
                yield ItemResult(x.item, outcome, None, x.image, x.seconds + share)
            else:
                yield ItemResult(x.item, None, outcome, None, x.seconds)

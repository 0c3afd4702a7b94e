"""The local engine: decoding in DataLoader workers, overlapped with the model; many images per model call."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ImageError
from ..inference.preprocess import Prepared, Preprocessor
from ..inference.result import SegmentationResult
from ..inference.segmenter import Segmenter
from ..inference.windows import single_threaded_opencv
from ..io.inputs import InputItem, read_input

__all__ = ["ItemResult", "iter_items", "default_workers"]


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


def _one_line(item: InputItem, e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ImageError):
        return text if item.path in text else f"{item.name}: {text}"
    return f"{item.name}: {type(e).__name__}: {text}"


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
            return _Loaded(item, None, None, _one_line(item, e), time.perf_counter() - start)
        return _Loaded(item, prepared, image if self.keep_image else None, None, time.perf_counter() - start)


class _Items(torch.utils.data.Dataset):
    def __init__(self, items: Sequence[InputItem], preparer: _Reader) -> None:
        self.items, self.preparer = list(items), preparer

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> _Loaded:
        return self.preparer(self.items[index])


def _as_list(batch: list[_Loaded]) -> list[_Loaded]:
    return batch


def default_workers() -> int:
    """Decoding workers by default: the CPU cores this process may use, minus one for the model, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


def _infer(segmenter: Segmenter, loaded: list[_Loaded], return_probs: bool) -> list[SegmentationResult | str]:
    """Results of a batch; when the batch fails as a whole, each image is retried alone."""
    try:
        return list(segmenter.infer([x.prepared for x in loaded], return_probs))  # type: ignore[misc]
    except Exception as e:  # noqa: BLE001 - isolate the image that breaks the batch
        if len(loaded) == 1:
            return [_one_line(loaded[0].item, e)]
    out: list[SegmentationResult | str] = []
    for x in loaded:
        try:
            out.extend(segmenter.infer([x.prepared], return_probs))  # type: ignore[list-item]
        except Exception as e:  # noqa: BLE001
            out.append(_one_line(x.item, e))
    return out


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
    single_threaded_opencv()  # before the workers are forked
    loader = torch.utils.data.DataLoader(
        _Items(items, _Reader(segmenter.preprocessor, keep_images)),
        batch_size=max(1, images_per_batch),
        shuffle=False,
        num_workers=workers if len(items) > 1 else 0,
        collate_fn=_as_list,
        prefetch_factor=2 if workers and len(items) > 1 else None,
    )
    for batch in loader:
        good = [x for x in batch if x.error is None]
        start = time.perf_counter()
        outcomes = _infer(segmenter, good, return_probs) if good else []
        share = (time.perf_counter() - start) / max(1, len(good))
        by_key = {x.item.key: o for x, o in zip(good, outcomes)}
        for x in batch:
            outcome = by_key.get(x.item.key, x.error)
            if isinstance(outcome, SegmentationResult):
                yield ItemResult(x.item, outcome, None, x.image, x.seconds + share)
            else:
                yield ItemResult(x.item, None, outcome, None, x.seconds)

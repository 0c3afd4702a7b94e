"""The benchmark's samples, decoded and resized by the Segmenter's preprocessor in the bulk runs' workers
(:func:`gclip.engines.workers.map_in_workers`)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..engines.batch import one_line_error
from ..engines.workers import map_in_workers
from ..errors import GclipError
from ..inference.preprocess import Prepared, Preprocessor
from .centre_crop import centre_crop_image, centre_crop_label
from .layouts import DatasetError, DatasetSpec, Sample, read_label

__all__ = ["Item", "BenchmarkDataset", "load_batches"]


@dataclass
class Item:
    """One loaded sample, or the reason it could not be loaded (``error`` set, ``prepared`` ``None``)."""

    index: int
    sample: Sample
    prepared: Prepared | None = None
    label: np.ndarray | None = None
    error: str | None = None


class BenchmarkDataset(torch.utils.data.Dataset):
    """``(image, label)`` pairs of one benchmark, decoded and resized on access.

    Errors do not raise in the worker: they come back as :attr:`Item.error` so the caller decides whether
    to stop (the default) or skip (``--skip-bad``). With ``centre_crop`` the image and its labels are both cut
    to their central square of that side (:mod:`gclip.evaluation.centre_crop`) before the preprocessor's resize.
    """

    def __init__(
        self,
        spec: DatasetSpec,
        samples: Sequence[Sample],
        preparer: Preprocessor,
        indices: Sequence[int],
        centre_crop: int = 0,
    ):
        self.spec = spec
        self.samples = list(samples)
        self.preparer = preparer
        self.indices = list(indices)
        self.centre_crop = centre_crop

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Item:
        index = self.indices[i]
        sample = self.samples[index]
        item = Item(index, sample)
        try:
            array = self.preparer.decode(sample.image)
            item.label = read_label(sample.label, self.spec)
            if tuple(item.label.shape) != tuple(array.shape[:2]):
                raise DatasetError(
                    f"label {sample.label} is {item.label.shape[1]}x{item.label.shape[0]} but its image "
                    f"{sample.image} is {array.shape[1]}x{array.shape[0]}"
                )
            if self.centre_crop:
                array = centre_crop_image(array, self.centre_crop)
                item.label = centre_crop_label(item.label, self.centre_crop)
            item.prepared = self.preparer.pack(array, self.preparer.transform(array), sample.image, sample.name)
        except GclipError as e:
            item.prepared, item.label, item.error = None, None, str(e)
        return item

    def failure(self, i: int, e: Exception) -> Item:
        """The record of sample ``i`` when reading it raised something other than a :class:`GclipError`."""
        index = self.indices[i]
        sample = self.samples[index]
        return Item(index, sample, error=one_line_error(e, str(sample.image)))


def load_batches(dataset: BenchmarkDataset, images_per_step: int, workers: int) -> Iterator[list[Item]]:
    """Lists of :class:`Item` (``images_per_step`` at a time), in dataset order, read ahead by ``workers``."""
    return map_in_workers(dataset.__getitem__, range(len(dataset)), dataset.failure, images_per_step, workers)

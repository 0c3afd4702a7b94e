"""The benchmark ``Dataset``: samples decoded and resized in DataLoader workers by the Segmenter's preprocessor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import GclipError
from ..inference.preprocess import Prepared, Preprocessor
from ..inference.windows import single_threaded_opencv
from .centre_crop import centre_crop_image, centre_crop_label
from .layouts import DatasetError, DatasetSpec, Sample, read_label

__all__ = ["Item", "BenchmarkDataset", "make_loader"]


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


def _as_list(batch: list[Item]) -> list[Item]:
    return batch


def make_loader(dataset: BenchmarkDataset, images_per_step: int, workers: int) -> torch.utils.data.DataLoader:
    """A loader yielding lists of :class:`Item` (``images_per_step`` at a time), in dataset order."""
    single_threaded_opencv()  # before the workers are forked
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=images_per_step,
        shuffle=False,
        num_workers=workers,
        collate_fn=_as_list,
        prefetch_factor=2 if workers > 0 else None,
        persistent_workers=False,
    )

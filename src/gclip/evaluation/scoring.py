"""Scoring a Segmenter on one benchmark: workers decode, the model segments several images per step,
areas are summed per rank and all-reduced."""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..backbones import weights_used
from ..engines.batch import infer_batch
from ..errors import ConfigError
from ..inference.segmenter import Segmenter
from ..io.outputs import write_label_png
from ..text import ClassList
from .distributed import DistContext, shard
from .layouts import DatasetError, DatasetSpec, Sample, class_names, class_order
from .loader import BenchmarkDataset, load_batches
from .metric import Areas, image_areas, summarize

__all__ = ["EvalResult", "score"]


@dataclass
class EvalResult:
    """The outcome of one (method, dataset) run, identical on every rank after the reduction.

    Attributes:
        dataset, method: names.
        class_names: the dataset's name of each scored class (:func:`~gclip.evaluation.layouts.class_names`).
        areas: the dataset-summed areas.
        images: images scored.
        skipped: ``(name, reason)`` of the samples skipped with ``skip_bad``.
        seconds: wall time of the scoring loop (slowest rank).
        settings: what determined the predictions.
        weights: the weights files used (:func:`gclip.backbones.weights_used`: path and SHA-256 of each).
        prompt_names: the display name of each class's prompts, where they differ from ``class_names``.
    """

    dataset: str
    method: str
    class_names: list[str]
    areas: Areas
    images: int
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    settings: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] = field(default_factory=dict)
    prompt_names: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, Any]:
        s = summarize(self.areas)
        return {
            "mIoU": s["mIoU"],
            "aAcc": s["aAcc"],
            "mAcc": s["mAcc"],
            "images": self.images,
            "skipped": len(self.skipped),
            "seconds": round(self.seconds, 3),
            "images_per_s": round(self.images / self.seconds, 3) if self.seconds > 0 else None,
        }

    @staticmethod
    def per_class_csv(results: list[EvalResult]) -> str:
        """The per-class IoU and accuracy of several runs as CSV text (one row per method, dataset and class)."""
        import csv
        import io

        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        for i, r in enumerate(results):
            rows = r.per_class()
            if i == 0 and rows:
                writer.writerow(["method", "dataset", *rows[0]])
            for row in rows:
                writer.writerow([r.method, r.dataset, *row.values()])
        return text.getvalue()

    def per_class(self) -> list[dict[str, Any]]:
        s = summarize(self.areas)
        a = self.areas
        prompts = self.prompt_names or self.class_names
        return [
            {
                "class": name,
                "prompt": prompts[c],
                "IoU": s["IoU"][c],
                "Acc": s["Acc"][c],
                "intersect": int(a.intersect[c]),
                "union": int(a.union[c]),
                "pred": int(a.pred[c]),
                "label": int(a.label[c]),
            }
            for c, name in enumerate(self.class_names)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "method": self.method,
            "settings": self.settings,
            "weights": self.weights,
            "summary": self.summary,
            "per_class": self.per_class(),
            "skipped": [{"sample": n, "reason": r} for n, r in self.skipped],
        }


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", disable=not enabled, dynamic_ncols=True, file=sys.stderr)


def score(
    segmenter: Segmenter,
    spec: DatasetSpec,
    samples: list[Sample],
    *,
    images_per_step: int = 1,
    workers: int = 0,
    skip_bad: bool = False,
    save_dir: str | Path | None = None,
    ctx: DistContext | None = None,
    progress: bool = False,
    warn: Callable[[str], None] | None = None,
    centre_crop: int = 0,
) -> EvalResult:
    """Score ``segmenter`` (classes already set, ``spec.num_classes`` of them) on ``samples``.

    The segmenter's class 0 is made a background class exactly when the set has one (``spec.has_background``:
    ``prob_thd`` sends uncertain pixels to it), whatever its prompt names (SCLIP's VOC21 file names it ``sky,
    wall, ...``); on the other sets uncertain pixels stay unlabeled and count in no class. A set whose background
    is not class 0 (``spec.background_index``: Potsdam's clutter) is scored with that class moved first
    (:func:`~gclip.evaluation.layouts.class_order`); the result and saved predictions are in the set's own order.

    Args:
        segmenter: the configured segmenter.
        spec: the dataset (number of classes, ignore index, ``reduce_zero_label``).
        samples: the pairs to score (all ranks pass the same list; each scores its shard).
        images_per_step: images whose windows share forward passes.
        workers: DataLoader worker processes decoding and resizing images (0: in this process).
        skip_bad: skip unreadable or inconsistent samples with a warning instead of raising.
        save_dir: write each prediction as a palettized PNG ``<save_dir>/<sample name>.png`` (in the
            dataset's own label values: +1 on ``reduce_zero_label`` sets, so it compares with the label file).
        ctx: the distributed context (default: one process).
        progress: show a progress bar with ETA (main rank only).
        warn: where skip warnings go (default: stderr; each rank reports its own samples).
        centre_crop: score the central square of this side of each image and of its labels, both resized so
            their short side has this length (CLIPtrase's protocol, :mod:`gclip.evaluation.centre_crop`); 0: off.

    Raises:
        DatasetError: a sample is bad and ``skip_bad`` is off.
        ConfigError: the segmenter's class count differs from the dataset's.
    """
    ctx = ctx or DistContext()
    warn = warn or (lambda msg: print(f"gclip: warning: {msg}", file=sys.stderr))
    if segmenter.classes is None or len(segmenter.classes) != spec.num_classes:
        got = 0 if segmenter.classes is None else len(segmenter.classes)
        raise ConfigError(f"{spec.name} has {spec.num_classes} classes but the segmenter has {got}")
    order = class_order(spec)
    if order is not None:  # the set's background is not class 0: score with it first (read_label maps the labels)
        synonyms = segmenter.classes.synonyms  # type: ignore[union-attr]
        segmenter.set_classes(ClassList(tuple(synonyms[i] for i in order), background=True))
    elif segmenter.classes.background != spec.has_background:  # type: ignore[union-attr]
        segmenter.classes = dataclasses.replace(segmenter.classes, background=spec.has_background)  # type: ignore[arg-type]
    back = np.argsort(order) if order is not None else None  # scored index of each of the set's classes
    if images_per_step < 1 or workers < 0 or centre_crop < 0:
        raise ConfigError("images per step must be >= 1, workers and centre crop >= 0")
    mine = shard(len(samples), ctx)
    dataset = BenchmarkDataset(spec, samples, segmenter.preprocessor, mine, centre_crop)
    areas = Areas.zeros(spec.num_classes)
    skipped: list[tuple[str, str]] = []
    scored = 0
    offset = 1 if spec.reduce_zero_label else 0
    start = time.perf_counter()
    with _progress(len(samples), f"{segmenter.method.name} {spec.name}", progress and ctx.is_main) as bar:
        for batch in load_batches(dataset, images_per_step, workers):
            good = []
            for item in batch:
                if item.error is None:
                    good.append(item)
                elif skip_bad:
                    warn(f"skipped {item.sample.name}: {item.error}")
                    skipped.append((item.sample.name, item.error))
                else:
                    raise DatasetError(f"{item.error} (pass --skip-bad to skip bad samples)")
            names = [str(item.sample.image) for item in good]
            for item, result in zip(good, infer_batch(segmenter, [item.prepared for item in good], names)):
                if isinstance(result, str):  # the model failed on this image
                    if not skip_bad:
                        raise DatasetError(f"{result} (pass --skip-bad to skip bad samples)")
                    warn(f"skipped {item.sample.name}: {result}")
                    skipped.append((item.sample.name, result))
                    continue
                areas += image_areas(result.labels, item.label, spec.num_classes, spec.ignore_index)
                if save_dir is not None:
                    # the dataset's values in VOC colours; unlabeled pixels (-1) become its unscored value: 0
                    # with reduce_zero_label (-1 + 1), else 255 (write_label_png's unlabeled value)
                    saved = result.labels
                    if order is not None:  # scored index -> the set's class (-1 stays unlabeled)
                        saved = np.where(saved < 0, -1, np.asarray(order)[saved])
                    saved = saved + offset
                    write_label_png(saved, Path(save_dir) / f"{item.sample.name}.png", background=True)
                scored += 1
            bar.update(min(len(batch) * ctx.world_size, len(samples) - bar.n))
    seconds = time.perf_counter() - start
    dataset_names, prompts = class_names(spec), list(segmenter.classes.names)  # type: ignore[union-attr]
    total = Areas.from_stack(ctx.sum(areas.stack()))
    if back is not None:  # back in the set's class order
        total, prompts = Areas.from_stack(total.stack()[:, back]), [prompts[i] for i in back]
    counts = ctx.sum(np.array([scored], dtype=np.int64))
    gathered = ctx.gather((skipped, seconds))
    return EvalResult(
        dataset=spec.name,
        method=segmenter.method.name,
        class_names=dataset_names if len(dataset_names) == spec.num_classes else prompts,
        prompt_names=prompts,
        areas=total,
        images=int(counts[0]),
        skipped=sorted((s for part, _ in gathered for s in part), key=lambda s: s[0]),
        seconds=max(sec for _, sec in gathered),
        settings=segmenter.describe(),
        weights=weights_used(segmenter.model, segmenter.method.options()),
    )

"""Running a collection end to end: pick the pending images, segment them, write outputs and the manifest."""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..backbones import weights_used
from ..errors import ConfigError, OutputError
from ..inference.segmenter import Segmenter
from ..io.inputs import InputItem, collect_inputs, shard_items
from ..io.manifest import Manifest, manifest_name
from ..io.writer import OutputWriter, check_output_folder, clean_stale_tmp, parse_formats, settings_hash
from ..text import load_templates, parse_classes
from .local import ItemResult, iter_items
from .spec import SegmenterSpec

__all__ = ["RunSummary", "segment_folder", "iter_segment", "plan_run", "recipe_hash"]

Inputs = str | Path | Sequence[str | Path] | Sequence[InputItem]


@dataclass
class RunSummary:
    """What a run did.

    Attributes:
        out: the output folder.
        total: images in the run (this shard's share).
        done: images segmented now.
        skipped: images whose outputs were already complete.
        failed: ``(image, one-line reason)`` for each image that could not be segmented.
        seconds: wall time of the run.
        manifest: the manifest file, when written.
    """

    out: Path
    total: int = 0
    done: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    manifest: Path | None = None

    @property
    def images_per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    def lines(self) -> list[str]:
        """A human summary, one line each."""
        lines = [
            f"gclip: {self.done} segmented, {self.skipped} already done, {len(self.failed)} failed "
            f"of {self.total} images in {self.seconds:.1f} s ({self.images_per_second:.2f} images/s) -> {self.out}"
        ]
        lines += [f"gclip: failed: {reason}" for _, reason in self.failed]
        return lines


def _items(inputs: Inputs, shard: tuple[int, int] | None) -> list[InputItem]:
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    inputs = list(inputs)
    items = inputs if inputs and all(isinstance(i, InputItem) for i in inputs) else collect_inputs(inputs)
    return shard_items(items, *shard) if shard else sorted(items, key=lambda i: i.key)  # type: ignore[arg-type]


def _identity(value: Any) -> Any:
    """``value`` with each string naming an existing file replaced by ``[path, size, mtime]`` (recursively)."""
    if isinstance(value, dict):
        return {str(k): _identity(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_identity(v) for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and value and os.path.isfile(value):
        stat = os.stat(value)
        return [os.path.abspath(value), stat.st_size, stat.st_mtime_ns]
    return value


def recipe_hash(spec: SegmenterSpec) -> str | None:
    """A hash of how ``spec`` asks for its Segmenter, computed without loading anything: the model name, the
    weights as a file identity (path, size, modification time; a tag as its name), the method and its options,
    the templates, the classes and the settings. ``None`` when the spec holds objects (a loaded model, a
    method instance) that have no such description.

    Two equal hashes mean the same outputs as far as the caller changed anything; a weights file replaced in
    place is seen by its size or modification time.

    Raises:
        ClassesError, ConfigError: the classes or templates cannot be read (as the build would raise).
    """
    if not isinstance(spec.model, str) or not isinstance(spec.method, str):
        return None
    recipe = {f.name: _identity(getattr(spec, f.name)) for f in dataclasses.fields(spec)}  # every field, new ones too
    recipe["templates"] = load_templates(spec.templates)  # the text, not the file name
    recipe["classes"] = None if spec.classes is None else [list(q) for q in parse_classes(spec.classes).synonyms]
    return settings_hash(recipe)


def _done_before_loading(
    out: Path, formats: tuple[str, ...], items: Sequence[InputItem], manifest: Manifest | None, recipe: str | None
) -> bool:
    """Whether every item's outputs exist and (with a manifest) were made from this very recipe, so a rerun
    has nothing to do and need not load the model."""
    if manifest is None:
        paths_only = OutputWriter(out, formats, {})
        return all(paths_only.files_exist(item) for item in items)
    if recipe is None:
        return False
    paths_only = OutputWriter(out, formats, {})
    records = manifest.read()
    for item in items:
        record = records.get(item.key)
        if record is None or "error" in record or record.get("recipe_hash") != recipe:
            return False
        if not paths_only.files_exist(item):
            return False
    return True


def _description(segmenter: Segmenter) -> dict[str, Any]:
    classes = segmenter.classes
    description = {**segmenter.describe(), "classes": [list(q) for q in classes.synonyms]}  # type: ignore[union-attr]
    if segmenter.settings.prob_thd or segmenter.settings.area_thd:  # where the thresholds send pixels
        description["background"] = classes.background  # type: ignore[union-attr]
    return description


def plan_run(
    writer: OutputWriter, items: Sequence[InputItem], overwrite: bool, manifest: Manifest | None
) -> list[InputItem]:
    """Clean stale temporaries, compact the manifest, and return the items still to do."""
    targets = [p for item in items for p in writer.paths(item).values()]
    if manifest is not None:
        targets.append(manifest.path)
    clean_stale_tmp(writer.out, targets)
    records = manifest.compact() if manifest is not None else {}
    if overwrite:
        return list(items)

    def complete(item: InputItem) -> bool:
        if not writer.files_exist(item):
            return False
        if manifest is None:
            return True
        record = records.get(item.key)
        return record is not None and "error" not in record and record.get("settings_hash") == writer.hash

    return [item for item in items if not complete(item)]


def iter_segment(
    segmenter: Segmenter,
    inputs: Inputs,
    images_per_batch: int = 8,
    workers: int | None = None,
    return_probs: bool = False,
    keep_images: bool = False,
) -> Iterator[ItemResult]:
    """Segment a collection and yield each image's :class:`~gclip.engines.ItemResult` (nothing is written).

    Args:
        segmenter: a :class:`~gclip.Segmenter` with classes set.
        inputs: a folder, file, glob, or a list of them (see :func:`~gclip.engines.collect_inputs`).
        images_per_batch, workers, return_probs, keep_images: see :func:`~gclip.engines.iter_items`.

    >>> for r in gclip.iter_segment(seg, "photos/"):  # doctest: +SKIP
    ...     print(r.item.key, r.result.class_fractions() if r.ok else r.error)
    """
    yield from iter_items(segmenter, _items(inputs, None), images_per_batch, workers, return_probs, keep_images)


def segment_folder(
    segmenter: Segmenter | SegmenterSpec,
    inputs: Inputs,
    out: str | Path,
    formats: str | Sequence[str] = ("png", "manifest"),
    *,
    engine: Literal["local", "ray"] = "local",
    overwrite: bool = False,
    shard: tuple[int, int] | None = None,
    images_per_batch: int = 8,
    workers: int | None = None,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
) -> RunSummary:
    """Segment a collection into ``out``, resumably; the same outputs from the local and the Ray engine.

    Args:
        segmenter: a Segmenter with classes set, or a :class:`~gclip.engines.SegmenterSpec` (Ray actors
            load the model from it themselves).
        inputs: a folder, file, glob, or a list of them, or :class:`~gclip.engines.InputItem` objects.
        out: output folder; the tree of the inputs is mirrored below it.
        formats: any of ``png``, ``overlay``, ``legend``, ``rle``, ``json``, ``manifest``.
        engine: ``"local"`` (DataLoader workers + this process's device) or ``"ray"`` (Ray Data, actor pool).
        overwrite: redo images whose outputs already exist. A rerun given a ``SegmenterSpec`` whose every
            output exists and whose manifest records this very recipe (:func:`recipe_hash`) returns without
            loading the model.
        shard: ``(i, n)``: only the ``i``-th of ``n`` interleaved shards of the sorted inputs.
        images_per_batch: images per model call; workers: decoding processes (local engine).
        concurrency: model actors (Ray engine); num_gpus: GPUs per actor (default: 1 when the cluster has
            GPUs, else 0).
        progress: show a progress bar (images/s, ETA) on stderr.

    Returns:
        A :class:`~gclip.engines.RunSummary`; ``summary.failed`` lists the images that could not be read.

    >>> seg = gclip.Segmenter("ViT-B-16", classes=["cat", "dog", "sky"])  # doctest: +SKIP
    >>> summary = gclip.segment_folder(seg, "photos/", "labels/", formats="png,overlay,manifest")  # doctest: +SKIP
    """
    if engine not in ("local", "ray"):
        raise ConfigError(f"unknown engine {engine!r}: use 'local' or 'ray'")
    start = time.perf_counter()
    check_output_folder(out)  # before the model loads
    items = _items(inputs, shard)
    formats = parse_formats(formats)
    manifest = Manifest(Path(out) / manifest_name(shard)) if "manifest" in formats else None
    recipe = recipe_hash(segmenter) if isinstance(segmenter, SegmenterSpec) else None
    if isinstance(segmenter, SegmenterSpec) and not overwrite:
        if _done_before_loading(Path(out), formats, items, manifest, recipe):  # a rerun with nothing to do
            if manifest is not None:
                manifest.compact()
            summary = RunSummary(out=Path(out), total=len(items), skipped=len(items))
            summary.manifest = manifest.path if manifest else None
            summary.seconds = time.perf_counter() - start
            return summary
    if isinstance(segmenter, SegmenterSpec):
        spec = segmenter
        # The Ray engine's actors load their own models; this copy only describes the settings.
        segmenter = spec.build() if engine == "local" else dataclasses.replace(spec, device="cpu").build()
    else:
        spec = SegmenterSpec.from_segmenter(segmenter)
    weights = weights_used(segmenter.model, segmenter.method.options())
    writer = OutputWriter(Path(out), formats, _description(segmenter), weights=weights, recipe_hash=recipe)
    pending = plan_run(writer, items, overwrite, manifest)
    summary = RunSummary(out=Path(out), total=len(items), skipped=len(items) - len(pending))
    summary.manifest = manifest.path if manifest else None
    if manifest is not None and recipe is not None:  # outputs still valid: the next rerun can skip loading
        waiting = {item.key for item in pending}
        for key, record in manifest.read().items():
            if key not in waiting and record.get("settings_hash") == writer.hash and "error" not in record:
                if record.get("recipe_hash") != recipe:
                    manifest.append({**record, "recipe_hash": recipe})
    if engine == "ray":
        from .ray_engine import run_ray

        records = run_ray(spec, pending, writer, images_per_batch, concurrency, num_gpus, progress)
    else:
        records = _run_local(segmenter, writer, pending, images_per_batch, workers, progress)
    try:
        for record in records:
            if manifest is not None:
                manifest.append(record)
            if "error" in record:
                summary.failed.append((record["path"], record["error"]))
            else:
                summary.done += 1
    except OutputError as e:
        _compact(manifest, quiet=True)
        raise OutputError(f"{e}: the images finished are kept, the same command resumes the run") from e
    except BaseException:
        _compact(manifest, quiet=True)
        raise
    _compact(manifest)
    summary.seconds = time.perf_counter() - start
    return summary


def _compact(manifest: Manifest | None, quiet: bool = False) -> None:
    """Compact the manifest at the end of a run; ``quiet``: on the way out of a failed run, whatever happens."""
    if manifest is None:
        return
    try:
        manifest.compact()
    except OSError:
        if not quiet:
            raise


def _run_local(
    segmenter: Segmenter,
    writer: OutputWriter,
    pending: list[InputItem],
    images_per_batch: int,
    workers: int | None,
    progress: bool,
) -> Iterator[dict[str, Any]]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(pending), unit="img", disable=not progress or not pending, file=sys.stderr, smoothing=0.1)
    results = iter_items(segmenter, pending, images_per_batch, workers, writer.needs_probs, writer.needs_image)
    try:
        for r in results:
            if r.ok:
                start = time.perf_counter()
                record = writer.write(r.item, r.result, r.image, 0.0)  # type: ignore[arg-type]
                record["seconds"] = round(r.seconds + time.perf_counter() - start, 4)
            else:
                record = writer.failure(r.item, r.error)  # type: ignore[arg-type]
            bar.update(1)
            yield record
    finally:
        bar.close()

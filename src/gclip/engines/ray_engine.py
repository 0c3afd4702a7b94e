"""The Ray engine: Ray Data reads the input list, tasks decode, a pool of model actors segments and writes.

Needs ``pip install gclip[ray]``. Connects to the cluster in ``RAY_ADDRESS`` (or one already initialised with
``ray.init``), else starts a local instance.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from ..errors import ConfigError, GclipError
from ..inference.preprocess import Prepared
from ..io.images import DEFAULT_MAX_PIXELS
from ..io.inputs import InputItem, read_input
from ..io.writer import OutputWriter
from .batch import infer_batch
from .local import item_error
from .spec import SegmenterSpec

__all__ = ["run_ray"]


def _row(item: InputItem) -> dict[str, Any]:
    return {"path": item.path, "key": item.key, "member": item.member or "", "offset": item.offset, "size": item.size}


def _item(row: dict[str, Any]) -> InputItem:
    member = str(row["member"]) or None
    return InputItem(str(row["path"]), str(row["key"]), member, int(row["offset"]), int(row["size"]))


def _decode(row: dict[str, Any], max_pixels: int) -> dict[str, Any]:
    """Ray Data ``map``: one row -> its RGB bytes and shape, or the one-line reason it cannot be read."""
    item = _item(row)
    try:
        image = read_input(item, max_pixels)
    except Exception as e:  # noqa: BLE001 - a bad image is reported, never raised
        return {**row, "pixels": b"", "height": 0, "width": 0, "error": item_error(item, e)}
    return {**row, "pixels": image.tobytes(), "height": image.shape[0], "width": image.shape[1], "error": ""}


class SegmentActor:
    """Ray Data callable class: one Segmenter per actor; segments a batch of decoded rows and writes outputs.

    Returns one JSON manifest record per row (column ``record``).
    """

    def __init__(self, spec: SegmenterSpec, writer: OutputWriter) -> None:
        self.segmenter = spec.build()
        self.writer = writer

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        loaded: list[tuple[InputItem, Prepared, np.ndarray]] = []
        records: dict[str, dict[str, Any]] = {}
        rows = [{k: batch[k][i] for k in batch} for i in range(len(batch["key"]))]
        for row in rows:
            item = _item(row)
            if row["error"]:
                records[item.key] = self.writer.failure(item, str(row["error"]))
                continue
            image = np.frombuffer(row["pixels"], dtype=np.uint8).reshape(int(row["height"]), int(row["width"]), 3)
            try:
                prepared = self.segmenter.prepare(image, key=item.key)
            except Exception as e:  # noqa: BLE001
                records[item.key] = self.writer.failure(item, item_error(item, e))
                continue
            loaded.append((item, prepared, image))
        if loaded:
            start = time.perf_counter()
            names = [item.name for item, _, _ in loaded]
            outcomes = infer_batch(self.segmenter, [p for _, p, _ in loaded], names, self.writer.needs_probs)
            share = (time.perf_counter() - start) / len(loaded)
            for (item, _, image), outcome in zip(loaded, outcomes):
                if isinstance(outcome, str):
                    records[item.key] = self.writer.failure(item, outcome)
                else:
                    records[item.key] = self.writer.write(item, outcome, image, share)
        ordered = [json.dumps(records[_item(r).key]) for r in rows]
        return {"record": np.array(ordered, dtype=object)}


def run_ray(
    spec: SegmenterSpec,
    items: Sequence[InputItem],
    writer: OutputWriter,
    images_per_batch: int = 8,
    concurrency: int | None = None,
    num_gpus: float | None = None,
    progress: bool = True,
) -> Iterator[dict[str, Any]]:
    """Segment ``items`` on Ray and yield their manifest records as actors finish them.

    Args:
        spec: how each actor builds its Segmenter.
        items: the images still to do.
        writer: writes each image's files (in the actors; the output folder must be shared by all nodes).
        images_per_batch: rows per actor call.
        concurrency: number of model actors (default: one per GPU in the cluster, else 1).
        num_gpus: GPUs per actor (default: 1 when the cluster has GPUs, else 0).
        progress: show a progress bar.

    >>> import ray; ray.init(address="auto")  # doctest: +SKIP
    >>> gclip.segment_folder(spec, "/shared/photos", "/shared/labels", engine="ray", concurrency=8)  # doctest: +SKIP
    """
    try:
        import ray
        import ray.data
    except ImportError as e:
        raise ConfigError("the Ray engine needs Ray: pip install 'gclip[ray]'") from e
    if not items:
        return
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    cluster_gpus = float(ray.cluster_resources().get("GPU", 0))
    gpus = num_gpus if num_gpus is not None else (1.0 if cluster_gpus >= 1 else 0.0)
    actors = concurrency or (max(1, int(cluster_gpus // gpus)) if gpus else 1)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    max_pixels = int(spec.settings.get("max_pixels", DEFAULT_MAX_PIXELS))
    ds = ray.data.from_items([_row(i) for i in items])
    ds = ds.map(_decode, fn_kwargs={"max_pixels": max_pixels})
    ds = ds.map_batches(
        SegmentActor,
        fn_constructor_args=(spec, writer),
        batch_size=max(1, images_per_batch),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_gpus=gpus,
    )
    from tqdm.auto import tqdm

    with tqdm(total=len(items), unit="img", disable=not progress, file=sys.stderr) as bar:
        try:
            for row in ds.iter_rows():
                bar.update(1)
                yield json.loads(row["record"])
        except GclipError as e:  # Ray's wrapper of an actor's error is a GclipError too, with a traceback for text
            raise actor_error(e) from None
        except Exception as e:  # noqa: BLE001 - an actor or task that died: one line, not Ray's traceback
            raise actor_error(e) from None


def actor_error(e: BaseException) -> GclipError:
    """The one-line error of a Ray run: the :class:`~gclip.errors.GclipError` an actor or task raised (unwrapped
    from Ray's exceptions, which carry the remote traceback as their text), else a :class:`GclipError` naming what
    Ray reported in its last line."""
    seen: set[int] = set()
    cause: BaseException | None = e
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, GclipError) and "\n" not in str(cause).strip():
            return cause
        cause = getattr(cause, "cause", None) or cause.__cause__
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return GclipError(f"a Ray worker failed: {lines[-1] if lines else type(e).__name__}")

"""The benchmark run: throughput, latency, time per stage, peak memory and encoder TFLOP/s of the engine, against the
reference-style loop (:mod:`gclip.inference.reference`) on the same images in the same process.

Two engine passes, because timing stages and running at full speed do not mix on a GPU:

- the **pipelined pass** (the headline images/s, when ``workers > 0``): the images go through the local engine
  exactly as ``gclip segment`` runs them (:func:`gclip.engines.local.iter_items`): DataLoader workers decode and
  resize the next batch while the model runs on this one, and nothing synchronises the GPU but the labels coming
  back. Its peak RSS is the main process's (the workers are separate processes).
- the **staged pass** (always): one ``batch_images`` call at a time, decoding in this process, each stage timed
  with ``torch.cuda.synchronize`` at both ends on a GPU (asynchronous kernels are charged to the stage that
  launched them). It gives the latency, the stage split and the encoder's TFLOP/s; without workers (the CPU
  default: on a compute-bound CPU a decoding process only takes cores from the model) it is also the headline.

Stages: ``decode`` (file or JPEG bytes to an RGB array), ``preprocess`` (resize, normalise, crop and pad windows),
``encoder`` (patch embedding and blocks ``0..L-2``), ``head`` (the method's last block, projection, cosine logits,
upsampling, merging, final resize, softmax and labels), ``text`` (class embeddings; once per vocabulary, cached on
disk).

Latency: every image of a staged call gets the call's wall time (decode to labels), i.e. the time a caller waits
for it; with ``batch_images=1`` it is the single-image latency.

FLOPs of the image encoder (multiply-add = 2 FLOPs), per window with a ``gh x gw`` patch grid, ``N = 1 + gh gw``
tokens, width ``D``, MLP width ``M``, patch ``p`` and ``L`` blocks of which ``L-1`` run in the encoder::

    patch embedding: 2 * gh*gw * 3*p*p * D
    per block:       2*N*3*D*D (q, k, v) + 2*N*N*D (q kᵀ) + 2*N*N*D (attention x v) + 2*N*D*D (out proj)
                     + 2 * 2*N*D*M (MLP)

Peak memory: the process's resident-set high-water mark (``VmHWM``, reset through ``/proc/self/clear_refs``
before each measured phase where Linux allows it, else the lifetime ``ru_maxrss``) and, on a GPU,
``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...backbones import weights_used
from ...errors import ConfigError
from .config import BenchConfig, build_segmenter, load_inputs, resolve_classes
from .measure import (
    STAGES,
    StageTimer,
    encoder_flops,
    machine_info,
    peaks,
    percentile,
    reset_peaks,
    window_grids,
)


def resolve_workers(config: BenchConfig, cuda: bool) -> int:
    """Decoding workers of the pipelined pass: as given, else :func:`default_workers` on a GPU and 0 on a CPU."""
    from ...engines.local import default_workers

    if config.workers is not None:
        return max(0, config.workers)
    return default_workers() if cuda else 0


def staged_pass(seg, inputs: list[Any], config: BenchConfig, cuda: bool) -> dict[str, Any]:
    """``batch_images`` images per call, decoded here, every stage timed (synchronised on a GPU)."""
    s = seg.settings
    timer = StageTimer(sync=cuda)
    seg.timer = timer
    reset_peaks(cuda)
    latencies: list[float] = []
    labels: list[np.ndarray] = []
    flops = windows = 0
    start = time.perf_counter()
    for first in range(0, len(inputs), config.batch_images):
        group = inputs[first : first + config.batch_images]
        t0 = time.perf_counter()
        prepared = [seg.prepare(x) for x in group]  # keyed by the path: a masks folder finds its files
        results = seg.infer(prepared)
        if cuda:
            torch.cuda.synchronize()
        latencies += [time.perf_counter() - t0] * len(group)
        labels += [r.labels for r in results]
        for p in prepared:
            shape = seg.method.input_shape(tuple(p.image.shape[-2:]), seg.vit.patch_size, s.crop)
            grids = window_grids(shape, s.crop, s.stride, seg.vit.patch_size, s.padding)
            windows += len(grids)
            flops += sum(encoder_flops(seg.vit, g) for g in grids)
    seconds = time.perf_counter() - start
    seg.timer = None
    encoder_seconds = timer.seconds.get("encoder", 0.0)
    return {
        "count": len(inputs),
        "images_per_s": len(inputs) / seconds,
        "seconds": seconds,
        "latency_ms": {"p50": 1000 * percentile(latencies, 50), "p95": 1000 * percentile(latencies, 95)},
        "stage_seconds": {name: round(timer.seconds.get(name, 0.0), 6) for name in STAGES if name != "text"},
        "windows": windows,
        "encoder_gflop": flops / 1e9,
        "encoder_tflops_per_s": flops / encoder_seconds / 1e12 if encoder_seconds > 0 else None,
        "labels": labels,
        **peaks(cuda),
    }


def pipelined_pass(seg, inputs: list[Any], config: BenchConfig, workers: int, cuda: bool) -> dict[str, Any]:
    """The images through the local engine (``gclip segment``'s path): workers decode while the model runs."""
    from ...engines.local import iter_items
    from ...io.inputs import InputItem

    with tempfile.TemporaryDirectory(prefix="gclip-bench-") as tmp:
        items = []
        for k, x in enumerate(inputs):
            path = x
            if isinstance(x, bytes):  # synthetic JPEGs are read from files, as real images are
                path = Path(tmp) / f"{k:06d}.jpg"
                path.write_bytes(x)
            items.append(InputItem(str(path), f"{k:06d}"))
        reset_peaks(cuda)
        start = time.perf_counter()
        outcomes = list(iter_items(seg, items, images_per_batch=config.batch_images, workers=workers))
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    failed = [o.error for o in outcomes if not o.ok]
    if failed:
        raise ConfigError(f"the pipelined pass failed on {len(failed)} image(s): {failed[0]}")
    return {
        "count": len(inputs),
        "workers": workers,
        "images_per_s": len(inputs) / seconds,
        "seconds": seconds,
        "labels": [o.result.labels for o in outcomes],  # type: ignore[union-attr]
        **peaks(cuda),
    }


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready record (see ``gclip bench --help`` for the fields).

    Raises:
        ConfigError: the images are missing (e.g. the developers' sample), before the model loads.
    """
    inputs, source = load_inputs(config)
    seg = build_segmenter(config)  # compiled here when config.compile
    cuda = seg.device.type == "cuda"
    start = time.perf_counter()
    seg.set_classes(resolve_classes(config.classes))
    if cuda:
        torch.cuda.synchronize()
    text_seconds = time.perf_counter() - start
    workers = resolve_workers(config, cuda)
    if config.warmup:
        seg.predict_batch(inputs[: max(1, min(config.warmup, len(inputs)))])

    staged = staged_pass(seg, inputs, config, cuda)
    pipelined = pipelined_pass(seg, inputs, config, workers, cuda) if workers > 0 else None
    headline = pipelined or staged
    staged_labels = staged.pop("labels")
    labels = pipelined.pop("labels") if pipelined is not None else staged_labels
    record: dict[str, Any] = {
        "images": source,
        "count": len(inputs),
        "model": seg.model.name,
        "pretrained": seg.model.pretrained,
        "weights": weights_used(seg.model, seg.method.options()),
        "method": seg.method.name,
        "method_options": seg.method.options(),
        "precision": config.precision,
        "device": str(seg.device),
        "batch_size": seg.batch_size,
        "batch_images": config.batch_images,
        "workers": workers,
        "compile": bool(config.compile and seg._compiled is not None),
        "settings": seg.describe(),
        "classes": len(seg.classes),  # type: ignore[arg-type]
        "windows": staged["windows"],
        "images_per_s": headline["images_per_s"],
        "seconds": headline["seconds"],
        "latency_ms": staged["latency_ms"],
        "stage_seconds": {**staged["stage_seconds"], "text": round(text_seconds, 6)},
        "text_cache_hits": seg.text.disk_hits,
        "text": text_record(seg, text_seconds),
        "encoder_gflop": staged["encoder_gflop"],
        "encoder_tflops_per_s": staged["encoder_tflops_per_s"],
        "peak_rss_mb": headline["peak_rss_mb"],
        "cuda_peak_mb": headline["cuda_peak_mb"],
        "staged": {k: v for k, v in staged.items() if k in ("count", "images_per_s", "seconds")},
        "pipelined": pipelined,
        "pipelined_labels_identical": (
            None if pipelined is None else all(np.array_equal(a, b) for a, b in zip(labels, staged_labels))
        ),
        "reference": None,
        "machine": machine_info(),
    }
    if config.reference:
        record["reference"] = _run_reference(seg, inputs, labels, config, cuda)
    return record


def text_record(seg, seconds: float) -> dict[str, Any]:
    """The text stage: classes and prompts embedded, how many came from the disk cache, and classes/s."""
    classes, queries = len(seg.classes), len(seg.classes.queries)
    return {
        "classes": classes,
        "queries": queries,
        "templates": len(seg.text.templates),
        "cache_hits": seg.text.disk_hits,
        "seconds": round(seconds, 6),
        "classes_per_s": classes / seconds if seconds > 0 else None,
    }


def _run_reference(seg, inputs, labels, config: BenchConfig, cuda: bool) -> dict[str, Any]:
    from ...inference.reference import reference_labels

    count = len(inputs) if config.reference_count is None else max(1, min(config.reference_count, len(inputs)))
    reset_peaks(cuda)
    reference_labels(seg, inputs[0])  # warm-up, as for the engine
    latencies, mismatched_images, mismatched_pixels = [], 0, 0
    for k in range(count):
        t0 = time.perf_counter()
        ref = reference_labels(seg, inputs[k])
        if cuda:
            torch.cuda.synchronize()
        latencies.append(time.perf_counter() - t0)
        diff = int((ref != labels[k]).sum()) if ref.shape == labels[k].shape else ref.size
        mismatched_pixels += diff
        mismatched_images += diff > 0
    total = sum(latencies)
    return {
        "count": count,
        "images_per_s": count / total,
        "latency_ms": {"p50": 1000 * percentile(latencies, 50), "p95": 1000 * percentile(latencies, 95)},
        **peaks(cuda),
        "labels_identical": mismatched_images == 0,
        "mismatched_images": mismatched_images,
        "mismatched_pixels": mismatched_pixels,
    }

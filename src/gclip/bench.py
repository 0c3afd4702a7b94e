"""Benchmark: throughput, latency, time per stage, peak memory and encoder TFLOP/s of the engine, against the
reference-style loop (:mod:`gclip.reference`) on the same images in the same process.

Timing: each stage is wall time around the code doing it (``torch.cuda.synchronize`` at both ends on a GPU,
so asynchronous kernels are charged to the stage that launched them). Stages: ``decode`` (file or JPEG bytes
to an RGB array), ``preprocess`` (resize, normalise, crop and pad windows), ``encoder`` (patch embedding and
blocks ``0..L-2``), ``head`` (the method's last block, projection, cosine logits, upsampling, merging, final
resize, softmax and labels), ``text`` (class embeddings; once per vocabulary, cached on disk).

Latency: images are processed ``batch_images`` at a time (decode to labels); every image of a call gets the
call's wall time, i.e. the time a caller waits for it. With ``batch_images=1`` it is the single-image latency.

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

import contextlib
import dataclasses
import io
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .backbone import DenseViT
from .errors import ConfigError
from .models import LoadedModel, load_model
from .windows import pad_sizes, window_boxes

__all__ = [
    "StageTimer",
    "BenchConfig",
    "random_model",
    "encoder_flops",
    "peak_rss_bytes",
    "reset_peak_rss",
    "machine_info",
    "run_bench",
    "memory_check",
    "memory_check_subprocess",
]

STAGES = ("decode", "preprocess", "encoder", "head", "text")


class StageTimer:
    """Accumulates wall time per named stage; synchronises CUDA at stage boundaries when ``sync``."""

    def __init__(self, sync: bool = False) -> None:
        self.sync = sync
        self.seconds: dict[str, float] = defaultdict(float)
        self._depth = 0

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as ``name`` (nested stages are charged to the outermost one)."""
        if self._depth:
            yield
            return
        self._depth += 1
        if self.sync:
            torch.cuda.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - start
            self._depth -= 1


def random_model(
    name: str, precision: str = "fp32", device: str | None = None, seed: int = 0, quick_gelu: bool = True
) -> LoadedModel:
    """``name`` with the deterministic random weights of :func:`gclip.testing.random_state_dict` (no file)."""
    from .models import PRECISIONS, _fingerprint, resolve_device, trim_heap
    from .testing import random_state_dict

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    model = load_model(name, None, "fp32", "cpu", quick_gelu=quick_gelu)
    model.clip.load_state_dict(random_state_dict(model.clip, seed))
    model.clip.to(device=dev, dtype=PRECISIONS[precision])
    trim_heap()  # as load_model does after reading a checkpoint: the random state dict is garbage now
    return dataclasses.replace(
        model,
        pretrained=f"random:{seed}",
        device=dev,
        dtype=PRECISIONS[precision],
        fingerprint=_fingerprint(model.clip),
    )


def encoder_flops(vit: DenseViT, grid: tuple[int, int]) -> int:
    """FLOPs of the image encoder (patch embedding + blocks ``0..L-2``) on one window (see the module doc)."""
    gh, gw = grid
    d = vit.width
    m = int(vit.blocks[0].mlp.c_fc.out_features)
    n = 1 + gh * gw
    embed = 2 * gh * gw * 3 * vit.patch_size**2 * d
    block = 2 * n * 3 * d * d + 4 * n * n * d + 2 * n * d * d + 4 * n * d * m
    return embed + (vit.depth - 1) * block


def window_grids(shape: tuple[int, int], crop: int, stride: int, patch: int, padding: str) -> list[tuple[int, int]]:
    """Patch grid of every window of an image of ``shape`` (after resizing)."""
    grids = []
    for y1, y2, x1, x2 in window_boxes(shape[0], shape[1], crop, stride):
        h, w = y2 - y1, x2 - x1
        if padding == "symmetric":
            left, right, top, bottom = pad_sizes(h, w, patch)
            h, w = h + top + bottom, w + left + right
        grids.append((h // patch, w // patch))
    return grids


def peak_rss_bytes() -> int:
    """The process's peak resident set size (``VmHWM``, else ``ru_maxrss``) in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux); returns whether it could."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU name, and the versions that matter."""
    import open_clip

    from . import __version__

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info: dict[str, Any] = {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "?"),
        "numpy": np.__version__,
        "gclip": __version__,
        "platform": platform.platform(),
    }
    return info


@dataclass
class BenchConfig:
    """What to benchmark (the fields of ``gclip bench``)."""

    model: str = "ViT-B-16"
    pretrained: str | None = None
    random_weights: bool = True
    quick_gelu: bool | None = None
    method: str = "gclip"
    method_options: dict[str, Any] = field(default_factory=dict)
    precision: str = "fp32"
    device: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    classes: Any = "voc21"
    templates: str = "openai_imagenet_80"
    images: str = "sample"
    synthetic: tuple[int, int] | None = None
    count: int = 16
    batch_images: int = 8
    warmup: int = 1
    reference: bool = True
    reference_count: int | None = None
    compile: bool = False
    seed: int = 0
    model_configs: list[str] = field(default_factory=list)


def bundled_vocabulary(name: str) -> Path | None:
    """A bundled ClearCLIP class file by dataset name (``voc21``, ``ade20k``, ``coco_stuff`` ...)."""
    from importlib import resources

    path = resources.files("gclip") / "data" / "classes" / "clearclip" / f"cls_{name}.txt"
    return Path(str(path)) if path.is_file() else None


def sample_images(root: str | None = None) -> list[Path]:
    """VOC images of the real sample (``$GCLIP_SAMPLE_DATA`` or ``../shared/data``)."""
    repo = Path(__file__).resolve().parents[2]
    candidates = [root, os.environ.get("GCLIP_SAMPLE_DATA"), "../shared/data", str(repo.parent / "shared" / "data")]
    for cand in candidates:
        folder = Path(cand) / "VOCdevkit" / "VOC2012" / "JPEGImages" if cand else None
        if folder is not None and folder.is_dir():
            return sorted(folder.glob("*.jpg"))
    raise ConfigError(
        "the real sample (../shared/data or $GCLIP_SAMPLE_DATA) is not here: use --images DIR or --synthetic HxW"
    )


def load_inputs(config: BenchConfig) -> tuple[list[Any], str]:
    """The benchmark's inputs (paths, or JPEG-encoded synthetic images) and a description of them."""
    if config.synthetic is not None:
        from PIL import Image

        h, w = config.synthetic
        rng = np.random.default_rng(config.seed)
        inputs = []
        for _ in range(config.count):
            small = rng.integers(0, 256, size=(max(1, h // 16), max(1, w // 16), 3), dtype=np.uint8)
            img = Image.fromarray(small).resize((w, h), Image.BILINEAR)  # smooth, photo-like JPEG cost
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=90)
            inputs.append(buf.getvalue())
        return inputs, f"{config.count} synthetic {w}x{h} JPEGs"
    if config.images == "sample":
        paths = sample_images()
        source = "the real VOC2012 sample"
    else:
        folder = Path(config.images)
        if not folder.is_dir():
            raise ConfigError(f"--images {folder}: not a folder (give a folder of images, 'sample', or --synthetic)")
        paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp", ".webp"))
        source = str(folder)
    if not paths:
        raise ConfigError(f"no images found in {config.images}")
    paths = paths[: config.count]
    return paths, f"{len(paths)} images from {source}"


def _as_image(item: Any) -> Any:
    if isinstance(item, bytes):
        from PIL import Image

        return Image.open(io.BytesIO(item))
    return item


def _percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])


def build_segmenter(config: BenchConfig):
    """The model and the Segmenter of a configuration (classes not set yet)."""
    from .segmenter import Segmenter

    if config.model_configs:
        import open_clip

        for folder in config.model_configs:
            open_clip.add_model_config(folder)
    if config.random_weights:
        model = random_model(config.model, config.precision, config.device, config.seed, config.quick_gelu is not False)
    else:
        model = load_model(config.model, config.pretrained, config.precision, config.device, config.quick_gelu)
    return Segmenter(
        model, method=config.method, method_options=config.method_options, templates=config.templates, **config.settings
    )


def _classes(spec: Any) -> Any:
    if isinstance(spec, str) and bundled_vocabulary(spec) is not None:
        return bundled_vocabulary(spec)
    return spec


def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Run the benchmark; returns the JSON-ready record (see ``gclip bench --help`` for the fields)."""
    from .reference import reference_labels

    seg = build_segmenter(config)
    cuda = seg.device.type == "cuda"
    timer = StageTimer(sync=cuda)
    seg.timer = timer
    with timer.stage("text"):
        seg.set_classes(_classes(config.classes))
    text_seconds = timer.seconds.pop("text")
    if config.compile:
        seg.compile()
    inputs, source = load_inputs(config)
    s = seg.settings

    if config.warmup:
        seg.predict_batch([_as_image(x) for x in inputs[: max(1, min(config.warmup, len(inputs)))]])
    timer.seconds.clear()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()

    latencies: list[float] = []
    labels: list[np.ndarray] = []
    flops = 0
    windows = 0
    start = time.perf_counter()
    for first in range(0, len(inputs), config.batch_images):
        group = inputs[first : first + config.batch_images]
        t0 = time.perf_counter()
        prepared = [seg.prepare(_as_image(x), key=first + k) for k, x in enumerate(group)]
        results = seg.infer(prepared)
        if cuda:
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - t0
        latencies += [elapsed] * len(group)
        labels += [r.labels for r in results]
        for p in prepared:
            grids = window_grids(tuple(p.image.shape[-2:]), s.crop, s.stride, seg.vit.patch_size, s.padding)
            windows += len(grids)
            flops += sum(encoder_flops(seg.vit, g) for g in grids)
    total = time.perf_counter() - start
    engine_rss = peak_rss_bytes()
    cuda_peak = torch.cuda.max_memory_allocated() if cuda else None
    stages = {name: round(timer.seconds.get(name, 0.0), 6) for name in STAGES if name != "text"}
    stages["text"] = round(text_seconds, 6)
    encoder_seconds = timer.seconds.get("encoder", 0.0)
    n = len(inputs)
    record: dict[str, Any] = {
        "images": source,
        "count": n,
        "model": seg.model.name,
        "weights": seg.model.pretrained,
        "method": seg.method.name,
        "method_options": seg.method.options(),
        "precision": config.precision,
        "device": str(seg.device),
        "batch_size": seg.batch_size,
        "batch_images": config.batch_images,
        "compile": bool(config.compile and seg._compiled is not None),
        "settings": seg.describe(),
        "classes": len(seg.classes),  # type: ignore[arg-type]
        "windows": windows,
        "images_per_s": n / total,
        "seconds": total,
        "latency_ms": {"p50": 1000 * _percentile(latencies, 50), "p95": 1000 * _percentile(latencies, 95)},
        "stage_seconds": stages,
        "text_cache_hits": seg.text.disk_hits,
        "encoder_gflop": flops / 1e9,
        "encoder_tflops_per_s": flops / encoder_seconds / 1e12 if encoder_seconds > 0 else None,
        "peak_rss_mb": engine_rss / 2**20,
        "cuda_peak_mb": cuda_peak / 2**20 if cuda_peak is not None else None,
        "reference": None,
        "machine": machine_info(),
    }
    if config.reference:
        record["reference"] = _run_reference(seg, inputs, labels, config, cuda, reference_labels)
    return record


def _run_reference(seg, inputs, labels, config: BenchConfig, cuda: bool, reference_labels) -> dict[str, Any]:
    seg.timer = None
    count = len(inputs) if config.reference_count is None else max(1, min(config.reference_count, len(inputs)))
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    reference_labels(seg, _as_image(inputs[0]))  # warm-up, as for the engine
    latencies, mismatched_images, mismatched_pixels = [], 0, 0
    for k in range(count):
        t0 = time.perf_counter()
        ref = reference_labels(seg, _as_image(inputs[k]))
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
        "latency_ms": {"p50": 1000 * _percentile(latencies, 50), "p95": 1000 * _percentile(latencies, 95)},
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "labels_identical": mismatched_images == 0,
        "mismatched_images": mismatched_images,
        "mismatched_pixels": mismatched_pixels,
    }


def memory_check(config: BenchConfig, size: tuple[int, int] = (3000, 4000), classes: Any = "ade20k") -> dict[str, Any]:
    """Segment one synthetic ``size`` photo at full resolution (``short_side=0``) in this process; peak RSS.

    Run it in a fresh process (``gclip bench --memory-check`` does) so the figure is this job's alone.
    """
    config = dataclasses.replace(config, settings={**config.settings, "short_side": 0})
    seg = build_segmenter(config)
    seg.set_classes(_classes(classes))
    config = dataclasses.replace(config, synthetic=size, count=1)
    (jpeg,), _ = load_inputs(config)
    setup_peak = peak_rss_bytes()
    reset = reset_peak_rss()  # from here on: the segmentation's own peak (the model stays resident)
    start = time.perf_counter()
    result = seg.predict(_as_image(jpeg))
    seconds = time.perf_counter() - start
    n_queries = len(seg.classes.queries)  # type: ignore[union-attr]
    return {
        "size": list(size),
        "classes": len(seg.classes),  # type: ignore[arg-type]
        "model": seg.model.name,
        "method": seg.method.name,
        "device": str(seg.device),
        "labels_shape": list(result.labels.shape),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "peak_reset": reset,
        "setup_peak_rss_mb": setup_peak / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if seg.device.type == "cuda" else None,
        "naive_canvas_mb": n_queries * size[0] * size[1] * 4 / 2**20,
    }


def memory_check_subprocess(
    config: BenchConfig, size: tuple[int, int] = (3000, 4000), classes: Any = "ade20k", timeout: float | None = None
) -> dict[str, Any]:
    """:func:`memory_check` in a fresh Python process, so that the peak RSS is the job's alone."""
    payload = json.dumps(
        {"config": dataclasses.asdict(config), "size": list(size), "classes": str(classes) if classes else None}
    )
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "from gclip.bench import _memory_child; _memory_child()"],
        input=payload,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise ConfigError(f"memory check failed: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_child() -> None:
    import logging
    import warnings

    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    payload = json.loads(sys.stdin.read())
    cfg = payload["config"]
    if cfg.get("synthetic") is not None:
        cfg["synthetic"] = tuple(cfg["synthetic"])
    config = BenchConfig(**cfg)
    print(json.dumps(memory_check(config, tuple(payload["size"]), payload["classes"])))

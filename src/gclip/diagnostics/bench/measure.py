"""Measuring: stage wall times, peak memory, encoder FLOPs and the machine (see :mod:`gclip.diagnostics.bench`)."""

from __future__ import annotations

import contextlib
import os
import platform
import resource
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...backbones.base import Backbone
from ...inference.windows import pad_sizes, window_boxes

STAGES = ("decode", "preprocess", "masks", "encoder", "second_model", "head", "text")


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


def encoder_flops(vit: Backbone, grid: tuple[int, int]) -> int:
    """FLOPs of the image encoder (patch embedding + blocks ``0..L-2``) on one window (see the module doc)."""
    gh, gw = grid
    d = vit.width
    m = int(vit.ffn_out_weight(0).shape[1])  # the MLP's hidden width (a gated MLP's extra product is not counted)
    n = vit.prefix_tokens + gh * gw
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


def reset_peaks(cuda: bool) -> None:
    """Start a measured phase: reset the RSS high-water mark and, on a GPU, CUDA's peak."""
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()


def peaks(cuda: bool) -> dict[str, float | None]:
    """``peak_rss_mb`` and ``cuda_peak_mb`` (``None`` off a GPU) since the last reset, in MiB."""
    return {
        "peak_rss_mb": peak_rss_bytes() / 2**20,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def machine_info() -> dict[str, Any]:
    """CPU model and cores, GPU name, and the versions that matter."""
    import open_clip

    from ... import __version__

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


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return float(values[0])
    return float(statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1])

"""``gclip bench``: speed and memory of the engine against the reference-style loop, recorded as JSON and Markdown.

- :mod:`.config`: what to benchmark (:class:`BenchConfig`), its inputs and its model.
- :mod:`.measure`: stage timer, peak memory, encoder FLOPs, machine description.
- :mod:`.run`: the engine passes and the reference loop (:func:`run_bench`); timing rules in its docstring.
- :mod:`.memory`: the large-photo memory check in a fresh process.
"""

from ...testing import random_model
from .config import BenchConfig, build_segmenter, bundled_vocabulary, load_inputs, recipe, sample_images
from .measure import (
    STAGES,
    StageTimer,
    encoder_flops,
    machine_info,
    peak_rss_bytes,
    reset_peak_rss,
    window_grids,
)
from .memory import memory_check, memory_check_subprocess
from .run import run_bench

__all__ = [
    "STAGES",
    "StageTimer",
    "BenchConfig",
    "build_segmenter",
    "recipe",
    "bundled_vocabulary",
    "load_inputs",
    "random_model",
    "sample_images",
    "encoder_flops",
    "window_grids",
    "peak_rss_bytes",
    "reset_peak_rss",
    "machine_info",
    "run_bench",
    "memory_check",
    "memory_check_subprocess",
]

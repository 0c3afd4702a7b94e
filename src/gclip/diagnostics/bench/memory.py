"""The memory check: one large photo at full resolution, in a fresh process so the peak is its own."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...errors import ConfigError
from .config import BenchConfig, build_segmenter, load_inputs, resolve_classes
from .measure import peak_rss_bytes, peaks, reset_peak_rss


def memory_check(config: BenchConfig, size: tuple[int, int] = (3000, 4000), classes: Any = "ade20k") -> dict[str, Any]:
    """Segment one synthetic ``size`` photo at full resolution (``short_side=0``) in this process; peak RSS.

    Run it in a fresh process (``gclip bench --memory-check`` does) so the figure is this job's alone.
    """
    config = dataclasses.replace(config, settings={**config.settings, "short_side": 0}, compile=False)
    seg = build_segmenter(config)
    seg.set_classes(resolve_classes(classes))
    config = dataclasses.replace(config, synthetic=size, count=1)
    (jpeg,), _ = load_inputs(config)
    setup_peak = peak_rss_bytes()
    reset = reset_peak_rss()  # from here on: the segmentation's own peak (the model stays resident)
    start = time.perf_counter()
    result = seg.predict(jpeg)
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
        **peaks(seg.device.type == "cuda"),
        "peak_reset": reset,
        "setup_peak_rss_mb": setup_peak / 2**20,
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
    src = str(Path(__file__).resolve().parents[3])
    env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = subprocess.run(
        [sys.executable, "-c", "from gclip.diagnostics.bench.memory import _memory_child; _memory_child()"],
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

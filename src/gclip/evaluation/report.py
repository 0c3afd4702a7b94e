"""Printing results: the per-class table, the summary line, the paper-style markdown table, versions."""

from __future__ import annotations

import platform
from typing import Any

import torch

from .layouts import DATASETS, TABLE_ORDER
from .scoring import EvalResult

__all__ = ["per_class_table", "summary_line", "markdown_table", "software_versions"]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def per_class_table(result: EvalResult) -> str:
    """A fixed-width table: class, IoU, Acc (percent; ``-`` for classes absent from labels and predictions)."""
    rows = result.per_class()
    width = max([5] + [len(r["class"]) for r in rows])
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}", f"{'-' * width}  {'-' * 6}  {'-' * 6}"]
    lines += [f"{r['class']:<{width}}  {_fmt(r['IoU']):>6}  {_fmt(r['Acc']):>6}" for r in rows]
    return "\n".join(lines)


def summary_line(result: EvalResult) -> str:
    """``<method> on <dataset>: mIoU .. aAcc .. images .. seconds .. images/s ..``."""
    s = result.summary
    line = (
        f"{result.method} on {result.dataset}: mIoU {_fmt(s['mIoU'])}  aAcc {_fmt(s['aAcc'])}  "
        f"images {s['images']}  seconds {s['seconds']:.1f}  images/s {s['images_per_s'] or 0:.2f}"
    )
    if s["skipped"]:
        line += f"  skipped {s['skipped']}"
    return line


def markdown_table(results: list[EvalResult]) -> str:
    """Rows methods, columns datasets (paper order, then the other sets), then the mean over the columns of each row.

    Sets of one ``table_group`` (MESS's four PAXRay sets) make one column, the mean of its members, when every
    member was run (as MESS's ``PAXRay-4``); the row's mean is then MESS's mean over its 22 sets.
    """
    datasets = [d for d in TABLE_ORDER if any(r.dataset == d for r in results)]
    columns: dict[str, list[str]] = {}  # title -> its sets
    for d in datasets:
        group = DATASETS[d].table_group
        members = [n for n in TABLE_ORDER if group and DATASETS[n].table_group == group]
        if members and all(m in datasets for m in members):
            columns.setdefault(group, members)
        else:
            columns[DATASETS[d].title] = [d]
    methods = list(dict.fromkeys(r.method for r in results))
    score = {(r.method, r.dataset): r.summary["mIoU"] for r in results}
    header = "| method | " + " | ".join(columns) + " | mean |"
    lines = [header, "|---|" + "---|" * (len(columns) + 1)]
    for m in methods:
        values = []
        for sets in columns.values():
            found = [score.get((m, d)) for d in sets]
            values.append(None if None in found else sum(found) / len(found))  # type: ignore[arg-type]
        known = [v for v in values if v is not None]
        mean = sum(known) / len(known) if known and len(known) == len(values) else None
        lines.append(f"| {m} | " + " | ".join(_fmt(v) for v in values) + f" | {_fmt(mean)} |")
    return "\n".join(lines)


def software_versions(device: torch.device | str) -> dict[str, Any]:
    """Versions of torch, open_clip, gclip and Python, and the device's name."""
    import open_clip

    from .. import __version__

    device = torch.device(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu")
    return {
        "gclip": __version__,
        "torch": torch.__version__,
        "open_clip": getattr(open_clip, "__version__", "unknown"),
        "python": platform.python_version(),
        "device": f"{device} ({name})",
    }

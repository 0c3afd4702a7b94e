"""gclip's one disk cache: ``$GCLIP_CACHE_DIR`` (default ``~/.cache/gclip``), a folder per kind of entry
(``text``: class-name embeddings; ``auto``: GCLIP's measured auto-configuration). Entries are keyed by the
weights' :func:`~gclip.backbones.base.fingerprint`. ``GCLIP_NO_CACHE=1`` turns the disk cache off. Beside them,
``weights``: the weights files of every kind that ``gclip download`` fetched
(:func:`gclip.backbones.weights.weights_dir`; not a cache, so ``GCLIP_NO_CACHE`` leaves it on)."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir", "cache_root"]


def cache_root() -> Path:
    """``$GCLIP_CACHE_DIR``, else ``~/.cache/gclip``."""
    root = os.environ.get("GCLIP_CACHE_DIR")
    return Path(root) if root else Path.home() / ".cache" / "gclip"


def cache_dir(kind: str) -> Path | None:
    """The folder of one kind of cache entry (``cache_root() / kind``), or ``None`` when ``GCLIP_NO_CACHE`` is set."""
    if os.environ.get("GCLIP_NO_CACHE", "") not in ("", "0"):
        return None
    return cache_root() / kind

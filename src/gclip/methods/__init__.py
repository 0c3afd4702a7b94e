"""Training-free methods, one module each, registered by name (``list_methods()``).

Every module of this package is imported here, so a new method is one file with a ``@register``-ed class.
"""

import importlib
import pkgutil

from .base import (
    Method,
    Trace,
    WindowContext,
    attend,
    attention_map,
    cosine_logits,
    get_method,
    list_methods,
    paired_methods,
    register,
)

_ORDER = ["clip", "maskclip", "sclip", "clearclip", "naclip", "gclip"]  # the baselines first, then the rest by name
for _name in _ORDER + sorted({m.name for m in pkgutil.iter_modules(__path__)} - set(_ORDER) - {"base"}):
    if not _name.startswith("_"):
        importlib.import_module(f"{__name__}.{_name}")

__all__ = [
    "Method",
    "Trace",
    "WindowContext",
    "attend",
    "attention_map",
    "cosine_logits",
    "get_method",
    "list_methods",
    "paired_methods",
    "register",
]

"""Training-free methods, one module each, registered by name (``list_methods()``).

Every module of this package is imported here, so a new method is one file with a ``@register``-ed class.
"""

import importlib
import pkgutil

from .base import (
    SECOND_MODEL_OPTIONS,
    BlockChange,
    Method,
    Trace,
    WindowContext,
    attend,
    attention_map,
    cls_cosine,
    cosine_logits,
    get_method,
    grid_features,
    list_methods,
    method_class,
    methods_with_option,
    methods_with_second_models,
    register,
)
from .pieces import ImageContext, LabelRefinement, SecondModelPass, TextSide

_ORDER = ["clip", "maskclip", "sclip", "clearclip", "naclip", "gclip"]  # the baselines first, then the rest by name


def discover() -> list[str]:
    """Import the method modules of this package (each registers its method; modules named ``_*`` are helpers),
    as ``import gclip.methods`` does; again later, only the files added since. Returns the newly registered names."""
    before = set(list_methods())
    helpers = {"base", "pieces"}
    for name in _ORDER + sorted({m.name for m in pkgutil.iter_modules(__path__)} - set(_ORDER) - helpers):
        if not name.startswith("_"):
            importlib.import_module(f"{__name__}.{name}")
    return [m for m in list_methods() if m not in before]


discover()

__all__ = [
    "SECOND_MODEL_OPTIONS",
    "BlockChange",
    "ImageContext",
    "LabelRefinement",
    "SecondModelPass",
    "TextSide",
    "Method",
    "Trace",
    "WindowContext",
    "attend",
    "attention_map",
    "cls_cosine",
    "cosine_logits",
    "discover",
    "get_method",
    "grid_features",
    "list_methods",
    "method_class",
    "methods_with_option",
    "methods_with_second_models",
    "register",
]

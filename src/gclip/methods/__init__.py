"""Last-block variants, one module each, registered by name (``list_methods()``)."""

from . import clearclip, clip, gclip, maskclip, naclip, sclip  # noqa: F401  (registration)
from .base import Method, attend, attention_map, get_method, list_methods, register

__all__ = ["Method", "attend", "attention_map", "get_method", "list_methods", "register"]

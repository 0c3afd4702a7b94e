"""Diagnostics: ``gclip inspect`` (:mod:`.inspect`, :mod:`.plots`), ``gclip bench`` (:mod:`.bench`), and GCLIP's
measured auto-configuration (:func:`auto_settings`; :func:`clear_auto_cache` after changing weights in place)."""

from ..backbones.auto import AutoSettings, auto_settings, clear_auto_cache

__all__ = ["AutoSettings", "auto_settings", "clear_auto_cache"]

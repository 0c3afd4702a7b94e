"""Backbones: the CLIP towers' dense walk (:mod:`.openclip`), loading them (:mod:`.models`), the second models that
some methods pair with CLIP (:mod:`.second_models`), and the per-tag presets (:mod:`.presets`)."""

from .presets import Preset, get_preset, list_presets

__all__ = ["Preset", "get_preset", "list_presets"]

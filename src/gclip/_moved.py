"""The module names of gclip before the v3 layout, kept importable with a deprecation notice."""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

MOVED = {
    "gclip.vit": "gclip.backbones.openclip",
    "gclip.models": "gclip.backbones.models",
    "gclip.proxy": "gclip.backbones.second_models",
    "gclip.backbone_presets": "gclip.backbones.presets",
    "gclip.images": "gclip.io.images",
    "gclip.outputs": "gclip.io.outputs",
    "gclip.masks": "gclip.io.masks",
    "gclip.pilresize": "gclip.io.pilresize",
    "gclip.engines.inputs": "gclip.io.inputs",
    "gclip.engines.writer": "gclip.io.writer",
    "gclip.engines.manifest": "gclip.io.manifest",
    "gclip.canvas": "gclip.inference.canvas",
    "gclip.preprocess": "gclip.inference.preprocess",
    "gclip.windows": "gclip.inference.windows",
    "gclip.segmenter": "gclip.inference.segmenter",
    "gclip.forward": "gclip.inference.forward",
    "gclip.postprocess": "gclip.inference.postprocess",
    "gclip.reference": "gclip.inference.reference",
    "gclip.result": "gclip.inference.result",
    "gclip.autoconfig": "gclip.backbones.auto",
    "gclip.datasets.presets": "gclip.evaluation.protocols",
    "gclip.datasets.evaluate": "gclip.evaluation.scoring",
    "gclip.datasets": "gclip.evaluation",
    "gclip.inspect": "gclip.diagnostics.inspect",
    "gclip.plots": "gclip.diagnostics.plots",
    "gclip.bench": "gclip.diagnostics.bench",
}
"""Old module name -> its module now (a moved package's submodules follow it)."""


def new_name(old: str) -> str | None:
    """Where the module ``old`` lives now, or ``None`` if it did not move."""
    for src in sorted(MOVED, key=len, reverse=True):
        if old == src or old.startswith(src + "."):
            return MOVED[src] + old[len(src) :]
    return None


class _Alias(importlib.abc.Loader):
    def __init__(self, target: str) -> None:
        self.target = target

    def create_module(self, spec):
        return None  # a fresh module that forwards every attribute to the module it became

    def exec_module(self, module) -> None:
        warnings.warn(f"{module.__name__} is now {self.target}", DeprecationWarning, stacklevel=2)
        target = importlib.import_module(self.target)
        module.__getattr__ = lambda name: getattr(target, name)
        module.__doc__ = target.__doc__


class MovedFinder(importlib.abc.MetaPathFinder):
    """Resolves an old module name to the module it became (the same module object, with a notice)."""

    def find_spec(self, fullname, path=None, target=None):
        new = new_name(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    if not any(isinstance(f, MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, MovedFinder())

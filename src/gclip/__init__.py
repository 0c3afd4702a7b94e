"""gclip: training-free open-vocabulary semantic segmentation with CLIP ViTs (GCLIP and baselines).

>>> import gclip
>>> seg = gclip.Segmenter("ViT-B-16", pretrained="openai", method="gclip")  # doctest: +SKIP
>>> seg.set_classes(["cat", "dog", "sky"])  # doctest: +SKIP
>>> labels = seg.predict("photo.jpg").labels  # (H, W) int32  # doctest: +SKIP
"""

from . import _moved
from .backbones.models import LoadedModel, load_model
from .diagnostics.inspect import BackboneReport, inspect_backbone
from .engines import SegmenterSpec, iter_segment, segment_folder
from .errors import ClassesError, ConfigError, GclipError, ImageError, WeightsError
from .evaluation import evaluate
from .inference.result import SegmentationResult
from .inference.segmenter import Segmenter, Settings
from .methods import Method, get_method, list_methods, register
from .text import ClassList, parse_classes

__version__ = "0.1.0"

_moved.install()  # the module names before the v3 layout still import, with a DeprecationWarning

__all__ = [
    "BackboneReport",
    "ClassList",
    "ClassesError",
    "ConfigError",
    "GclipError",
    "ImageError",
    "LoadedModel",
    "Method",
    "SegmentationResult",
    "Segmenter",
    "SegmenterSpec",
    "Settings",
    "WeightsError",
    "evaluate",
    "get_method",
    "inspect_backbone",
    "iter_segment",
    "list_methods",
    "load_model",
    "parse_classes",
    "register",
    "segment_folder",
]

"""The benchmarks: dataset layouts, protocol presets (TOML data files), the mmseg-identical IoU metric, and
the scoring loop (DataLoader workers, several images per step, multi-process sharding), and
:func:`evaluate`: methods x datasets under their protocols (the library call behind ``gclip eval``)."""

from .coco_object import build_coco_object, stuff_to_object
from .distributed import DistContext, init_distributed, shard
from .layouts import (
    DATASETS,
    PAPER_ORDER,
    DatasetError,
    DatasetMissing,
    DatasetSpec,
    Sample,
    get_dataset,
    list_samples,
    read_label,
    reduce_zero_label,
)
from .loader import BenchmarkDataset
from .metric import Areas, image_areas, summarize
from .protocols import ProtocolSettings, list_protocols, protocol_for, resolve_preset
from .published import SEED_SETS, Published, published
from .run import evaluate, expand_datasets, expand_methods
from .scoring import EvalResult, score

__all__ = [
    "Areas",
    "BenchmarkDataset",
    "DATASETS",
    "DatasetError",
    "DatasetMissing",
    "DatasetSpec",
    "DistContext",
    "EvalResult",
    "PAPER_ORDER",
    "Published",
    "SEED_SETS",
    "ProtocolSettings",
    "Sample",
    "build_coco_object",
    "evaluate",
    "expand_datasets",
    "expand_methods",
    "get_dataset",
    "image_areas",
    "init_distributed",
    "list_protocols",
    "list_samples",
    "protocol_for",
    "published",
    "read_label",
    "reduce_zero_label",
    "resolve_preset",
    "score",
    "shard",
    "stuff_to_object",
    "summarize",
]

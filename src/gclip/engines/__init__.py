"""Bulk runners: inputs discovery, the decoder in workers and the batch loop they share, the local engine, the Ray
Data engine, the manifest and resume.

>>> import gclip
>>> seg = gclip.Segmenter("ViT-B-16", classes=["cat", "dog", "sky"])  # doctest: +SKIP
>>> gclip.segment_folder(seg, "photos/", "labels/", formats="png,overlay,rle,manifest")  # doctest: +SKIP
"""

from ..io.inputs import IMAGE_EXTENSIONS, InputItem, collect_inputs, parse_shard, read_input, shard_items
from ..io.manifest import Manifest, manifest_name
from ..io.writer import (
    FILE_SUFFIXES,
    FORMATS,
    OutputWriter,
    check_output_folder,
    clean_stale_tmp,
    parse_formats,
    settings_hash,
)
from .batch import infer_batch, one_line_error
from .local import ItemResult, default_workers, iter_items
from .run import RunSummary, iter_segment, plan_run, segment_folder
from .spec import SegmenterSpec
from .workers import map_in_workers

__all__ = [
    "FILE_SUFFIXES",
    "FORMATS",
    "IMAGE_EXTENSIONS",
    "InputItem",
    "ItemResult",
    "Manifest",
    "OutputWriter",
    "RunSummary",
    "SegmenterSpec",
    "check_output_folder",
    "clean_stale_tmp",
    "collect_inputs",
    "default_workers",
    "infer_batch",
    "iter_items",
    "iter_segment",
    "manifest_name",
    "map_in_workers",
    "one_line_error",
    "parse_formats",
    "parse_shard",
    "plan_run",
    "read_input",
    "segment_folder",
    "settings_hash",
    "shard_items",
]

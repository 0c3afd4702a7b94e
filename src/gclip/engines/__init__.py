"""Bulk runners: inputs discovery, the local DataLoader engine, the Ray Data engine, the manifest and resume.

>>> import gclip
>>> seg = gclip.Segmenter("ViT-B-16", classes=["cat", "dog", "sky"])  # doctest: +SKIP
>>> gclip.segment_folder(seg, "photos/", "labels/", formats="png,overlay,rle,manifest")  # doctest: +SKIP
"""

from ..io.inputs import IMAGE_EXTENSIONS, InputItem, collect_inputs, parse_shard, read_input, shard_items
from ..io.manifest import Manifest, manifest_name
from ..io.writer import FILE_SUFFIXES, FORMATS, OutputWriter, clean_stale_tmp, parse_formats, settings_hash
from .local import ItemResult, default_workers, iter_items
from .run import RunSummary, iter_segment, plan_run, segment_folder
from .spec import SegmenterSpec

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
    "clean_stale_tmp",
    "collect_inputs",
    "default_workers",
    "iter_items",
    "iter_segment",
    "manifest_name",
    "parse_formats",
    "parse_shard",
    "plan_run",
    "read_input",
    "segment_folder",
    "settings_hash",
    "shard_items",
]

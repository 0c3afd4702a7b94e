"""``gclip segment``: label images, folders, globs, list files or webdataset shards; resumable, local or on Ray.

Outputs mirror the input tree under --out: <key>.png (palettized labels; 255: unlabeled), <key>.overlay.png
(colours over the photo), <key>.legend.png (the classes present), <key>.rle.json (COCO RLE per class),
<key>.json (per-image summary) and manifest.jsonl (one line per image). A rerun skips images whose outputs are
complete, without loading the model when all are; exit code 1 when some images could not be read.
"""

from __future__ import annotations

import argparse
import sys

from .common import (
    add_class_args,
    add_method_args,
    add_model_args,
    add_settings_args,
    add_text_embeddings_arg,
    classes_from,
    method_options_from,
    settings_from,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "segment",
        help="segment images, folders or shards into the given classes",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="*", metavar="INPUT", help="image files, folders (recursive) or quoted globs")
    p.add_argument("--from-list", metavar="FILE", help="text file with one image path per line")
    p.add_argument("--wds", nargs="+", metavar="SHARD", default=[], help="webdataset .tar shards (files or globs)")
    add_class_args(p)
    add_text_embeddings_arg(p)
    p.add_argument("--out", required=True, help="output folder (the input tree is mirrored below it)")
    p.add_argument(
        "--format",
        default="png,json",
        help="comma-separated outputs among png, overlay, legend, rle, json, manifest (default: png,json)",
    )
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    g = p.add_argument_group("running")
    g.add_argument("--engine", choices=["local", "ray"], default="local", help="local (default) or ray (Ray Data)")
    g.add_argument("--images-per-batch", type=int, default=8, help="images per model call (default 8)")
    g.add_argument("--workers", type=int, default=None, help="decoding processes (local engine; default: cores-1)")
    g.add_argument("--concurrency", type=int, default=None, help="model actors (ray engine; default: one per GPU)")
    g.add_argument("--gpus-per-actor", type=float, default=None, help="ray engine (default: 1 with GPUs, else 0)")
    g.add_argument("--shard", metavar="I/N", help="only the I-th of N interleaved shards of the sorted inputs")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    add_model_args(p)
    add_method_args(p)
    add_settings_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..engines import SegmenterSpec, collect_inputs, parse_shard, segment_folder
    from ..errors import ConfigError

    if not (args.images or args.from_list or args.wds):
        raise ConfigError("no inputs: give image files, folders, globs, --from-list FILE or --wds SHARD")
    items = collect_inputs(args.images, args.from_list, args.wds)
    spec = SegmenterSpec(
        model=args.model,
        pretrained=args.pretrained,
        method=args.method,
        method_options=method_options_from(args),
        precision=args.precision,
        device=args.device,
        quick_gelu=args.quick_gelu,
        tokenizer=args.tokenizer,
        text_embeddings=args.text_embeddings,
        templates=args.templates,
        classes=classes_from(args),
        settings=settings_from(args),
    )
    summary = segment_folder(
        spec,
        items,
        args.out,
        args.format,
        engine=args.engine,
        overwrite=args.overwrite,
        shard=parse_shard(args.shard) if args.shard else None,
        images_per_batch=args.images_per_batch,
        workers=args.workers,
        concurrency=args.concurrency,
        num_gpus=args.gpus_per_actor,
        progress=args.progress,
    )
    for line in summary.lines():
        print(line, file=sys.stderr)
    return 1 if summary.failed else 0

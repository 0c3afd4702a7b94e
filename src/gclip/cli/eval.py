"""``gclip eval``: mIoU on the benchmark datasets with each method's protocol preset."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .common import (
    add_method_args,
    add_model_args,
    add_settings_args,
    add_text_embeddings_arg,
    method_options_from,
    settings_from,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.protocols import list_protocols

    p = sub.add_parser(
        "eval",
        help="score methods on the benchmarks (mIoU, as mmseg computes it)",
        description="Score methods on the benchmark datasets (the layouts their preparation scripts "
        "write) with the protocol presets. "
        "Runs under torchrun too: each process scores a disjoint shard and the areas are summed.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        required=True,
        help="voc21, voc20, context60, context59, coco_stuff, coco_object, cityscapes, ade20k, ade847, context459, "
        "a remote-sensing set (loveda, potsdam, ...) or a MESS set (mess_dram, mess_paxray_lungs, ... or MESS's "
        "own names: docs, More datasets); a comma-separated list; 'all' (the eight classic sets found under "
        "--data-root) or a family: large, remote, mess (its sets found there)",
    )
    g.add_argument(
        "--data-root",
        required=True,
        help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/, ade/, LoveDA/, ... "
        "(MESS's sets: its DETECTRON2_DATASETS folder)",
    )
    g.add_argument("--limit", type=int, help="score only the first N images of each dataset")
    g.add_argument("--skip-bad", action="store_true", help="skip unreadable or mismatched samples (with a warning)")
    g.add_argument(
        "--centre-crop",
        "--center-crop",
        dest="centre_crop",
        type=int,
        metavar="N",
        help="score the central NxN square of each image and its ground truth, both resized to short side N "
        "(CLIPtrase's protocol; its preset sets 336); 0: off",
    )
    add_model_args(p)
    add_text_embeddings_arg(p)
    add_method_args(p, multiple=True)
    p.add_argument("--protocol", choices=list_protocols(), help="force a protocol preset (default: the method's own)")
    p.add_argument(
        "--classes-dir",
        metavar="DIR",
        help="class-name files cls_<set>.txt (e.g. cls_voc21.txt) from DIR instead of the protocol's, e.g. a method "
        "repository's configs/ folder; '{dataset}' in a --method-options path becomes each set's name",
    )
    add_settings_args(p)
    g = p.add_argument_group("running and output")
    g.add_argument("--images-per-step", type=int, default=4, help="images whose windows share forward passes")
    g.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="DataLoader processes decoding images"
    )
    g.add_argument("--out", help="write the results as JSON to this file")
    g.add_argument("--save-predictions", metavar="DIR", help="write <DIR>/<method>/<dataset>/<image>.png label maps")
    g.add_argument("--quiet", action="store_true", help="no progress bar and no per-class table")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..backbones.models import resolve_device
    from ..errors import ConfigError
    from ..evaluation import EvalResult, evaluate, expand_methods, init_distributed
    from ..evaluation.report import markdown_table, per_class_table, software_versions, summary_line
    from ..io.outputs import write_json, write_text

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    overrides = settings_from(args)
    if args.centre_crop is not None:
        overrides["centre_crop"] = args.centre_crop
    options = {m: method_options_from(args, m) for m in expand_methods(args.method)}
    wants_cuda = torch.cuda.is_available() and (args.device is None or str(args.device).startswith("cuda"))
    ctx = init_distributed(use_cuda=wants_cuda)
    device = f"cuda:{ctx.local_rank}" if wants_cuda and ctx.world_size > 1 else args.device
    say = print if ctx.is_main else (lambda *a, **k: None)

    def report(result) -> None:
        if not args.quiet:
            say(per_class_table(result))
        say(summary_line(result), flush=True)

    try:
        results = evaluate(
            args.method,
            args.dataset,
            args.data_root,
            args.model,
            args.pretrained,
            precision=args.precision,
            device=device,
            quick_gelu=args.quick_gelu,
            tokenizer=args.tokenizer,
            text_embeddings=args.text_embeddings,
            method_options=options,
            settings=overrides,
            protocol=args.protocol,
            classes_dir=args.classes_dir,
            templates=args.templates,
            limit=args.limit,
            images_per_step=args.images_per_step,
            workers=args.workers,
            skip_bad=args.skip_bad,
            save_predictions=args.save_predictions,
            ctx=ctx,
            progress=not args.quiet and sys.stderr.isatty(),
            say=say,
            on_result=report,
        )
        if len(results) > 1:
            say("\n" + markdown_table(results))
        if args.out and ctx.is_main:
            versions = software_versions(resolve_device(device))
            record = {"versions": versions, "runs": [r.to_dict() for r in results]}
            if len(results) > 1:
                record["table"] = markdown_table(results)
            write_json(record, args.out)
            table = write_text(EvalResult.per_class_csv(results), Path(args.out).with_suffix(".csv"))
            say(f"results -> {args.out}, per-class IoU -> {table}")
    finally:
        if ctx.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 1 if any(r.skipped for r in results) else 0

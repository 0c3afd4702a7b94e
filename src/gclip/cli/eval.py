"""``gclip eval``: mIoU on the benchmark datasets with each method's protocol preset."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .common import add_method_args, add_model_args, add_settings_args, method_options_from, settings_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    from ..evaluation.protocols import list_protocols

    p = sub.add_parser(
        "eval",
        help="score methods on the benchmarks (mIoU, as mmseg computes it)",
        description="Score methods on the benchmark datasets (mmsegmentation layouts) with the protocol presets. "
        "Runs under torchrun too: each process scores a disjoint shard and the areas are summed.",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        required=True,
        help="voc21, voc20, context60, context59, coco_stuff, coco_object, cityscapes, ade20k; "
        "a comma-separated list; or 'all' (every set found under --data-root)",
    )
    g.add_argument("--data-root", required=True, help="folder holding VOCdevkit/, coco_stuff164k/, cityscapes/, ade/")
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


def _parse_datasets(text: str) -> tuple[list[Any], bool]:
    from ..evaluation import PAPER_ORDER, get_dataset

    if text.strip().lower() == "all":
        return [get_dataset(d) for d in PAPER_ORDER], True
    return [get_dataset(d) for d in text.split(",") if d.strip()], False


def expand_methods(text: str) -> list[str]:
    """``--method``: comma-separated names, or ``all``: every registered method."""
    from ..methods import list_methods

    if text.strip().lower() == "all":
        return list_methods()
    return [m.strip() for m in text.split(",") if m.strip()]


def _settings_text(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items() if k not in ("method_options",))


def _for_dataset(options: dict[str, Any], dataset: str) -> dict[str, Any]:
    """The method options with ``{dataset}`` in each text value replaced by the set's name (e.g. ITACLIP's
    per-set description files: ``"defs/{dataset}_definitions.txt"``)."""
    return {k: v.replace("{dataset}", dataset) if isinstance(v, str) else v for k, v in options.items()}


def _with_second_models(
    methods: list[str], options: dict, datasets: list[str], model: Any, every: bool, say: Any
) -> list[str]:
    """Load the second models (and check the mask sources) of each method that has them, before any image is
    scored (:meth:`~gclip.methods.Method.check_resources`); with ``--method all`` a method that cannot run here is
    skipped with a one-line notice (named: an error)."""
    from ..errors import ConfigError, WeightsError
    from ..methods import get_method

    kept = []
    for m in methods:
        try:
            for name in datasets:
                get_method(m, **_for_dataset(options[m], name)).check_resources(model.device, model.dtype)
        except (WeightsError, ConfigError) as e:
            message = f"{m}: {e}"
            if not every:
                raise type(e)(message) from e
            say(f"gclip: skipped {message}", file=sys.stderr)
            continue
        kept.append(m)
    return kept


def run(args: argparse.Namespace) -> int:
    import torch

    from ..backbones.models import load_model
    from ..errors import ConfigError
    from ..evaluation import DatasetMissing, evaluate, init_distributed, list_samples, resolve_preset
    from ..evaluation.report import markdown_table, per_class_table, software_versions, summary_line
    from ..inference.segmenter import Segmenter
    from ..io.outputs import write_json
    from ..methods import get_method
    from ..text import TextEncoder, read_class_file

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    specs, every = _parse_datasets(args.dataset)
    methods = expand_methods(args.method)
    every_method = args.method.strip().lower() == "all"
    if not methods or not specs:
        raise ConfigError("give at least one --method and one --dataset")
    options = {m: method_options_from(args, m) for m in methods}
    for m in methods:
        get_method(m, **options[m])
    overrides = settings_from(args)
    if args.centre_crop is not None:
        overrides["centre_crop"] = args.centre_crop

    wants_cuda = torch.cuda.is_available() and (args.device is None or str(args.device).startswith("cuda"))
    ctx = init_distributed(use_cuda=wants_cuda)
    device = f"cuda:{ctx.local_rank}" if wants_cuda and ctx.world_size > 1 else args.device
    say = print if ctx.is_main else (lambda *a, **k: None)

    plans = []
    for spec in specs:
        try:
            samples = list_samples(spec, args.data_root)
        except DatasetMissing as e:
            if not every:
                raise
            say(f"gclip: {spec.name} skipped: {e}", file=sys.stderr)
            continue
        plans.append((spec, samples[: args.limit] if args.limit else samples))
    if not plans:
        raise ConfigError(f"no benchmark dataset found under {args.data_root}")

    model = load_model(args.model, args.pretrained, args.precision, device, quick_gelu=args.quick_gelu)
    methods = _with_second_models(methods, options, [spec.name for spec, _ in plans], model, every_method, say)
    text = TextEncoder(model, args.templates)
    versions = software_versions(model.device)
    results = []
    try:
        for method in methods:
            for spec, samples in plans:
                preset = resolve_preset(method, spec, overrides, args.protocol, args.classes_dir)
                seg = Segmenter(
                    model,
                    method=method,
                    method_options={**preset.method_options, **_for_dataset(options[method], spec.name)},
                    templates=args.templates,
                    **preset.settings,
                )
                seg.text = text  # one text-embedding cache for every method
                seg.set_classes(read_class_file(preset.classes_file, allow_duplicates=True))
                settings = {**preset.describe(), **seg.describe(), "dataset": spec.name, "data_root": args.data_root}
                settings.update(limit=args.limit, images_per_step=args.images_per_step, world_size=ctx.world_size)
                say(f"== {method} on {spec.name} ({len(samples)} images): {_settings_text(preset.describe())}")
                save = Path(args.save_predictions) / method / spec.name if args.save_predictions else None
                result = evaluate(
                    seg,
                    spec,
                    samples,
                    images_per_step=args.images_per_step,
                    workers=args.workers,
                    skip_bad=args.skip_bad,
                    save_dir=save,
                    ctx=ctx,
                    progress=not args.quiet and sys.stderr.isatty(),
                    **preset.scoring,
                )
                result.settings = settings
                if not args.quiet:
                    say(per_class_table(result))
                say(summary_line(result), flush=True)
                results.append(result)
        if len(results) > 1:
            say("\n" + markdown_table(results))
        if args.out and ctx.is_main:
            record = {"versions": versions, "runs": [r.to_dict() for r in results]}
            if len(results) > 1:
                record["table"] = markdown_table(results)
            write_json(record, args.out)
            say(f"results -> {args.out}")
    finally:
        if ctx.active:
            import torch.distributed as dist

            dist.destroy_process_group()
    return 1 if any(r.skipped for r in results) else 0

"""``gclip inspect``: measure a backbone (token norms, emerging blocks, abnormal channels) and GCLIP's auto choice."""

from __future__ import annotations

import argparse

from ..errors import ConfigError
from .common import add_model_args, load_model_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "inspect",
        help="per-block token norms, emerging blocks, abnormal FFN channels and GCLIP's auto settings",
        description="Measure a backbone on calibration images (the given ones, else four bundled photos) and "
        "print what GCLIP's emerging_blocks='auto' chooses.",
    )
    p.add_argument("images", nargs="*", help="calibration images (default: four bundled photos)")
    add_model_args(p)
    p.add_argument("--size", type=int, help="calibration side in pixels (default: the model's native size)")
    p.add_argument("--json", dest="json_out", metavar="OUT", help="write the report as JSON")
    p.add_argument("--plot", metavar="DIR", help="write figures (PNG) to DIR (needs matplotlib: gclip[plot])")
    p.add_argument("--patch", metavar="ROW,COL", help="patch whose fused attention is plotted (default: centre)")
    p.add_argument("--classes", help="comma-separated classes for similarity maps with --plot")
    p.set_defaults(func=run)


def _patch(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    try:
        row, col = (int(v) for v in text.split(","))
    except ValueError as e:
        raise ConfigError(f"--patch must be ROW,COL (two integers), got {text!r}") from e
    return row, col


def run(args: argparse.Namespace) -> int:
    from ..diagnostics.inspect import inspect_backbone
    from ..io.outputs import write_json

    patch = _patch(args.patch)
    if args.size is not None and args.size <= 0:
        raise ConfigError(f"--size must be positive, got {args.size}")
    model = load_model_from(args)
    report = inspect_backbone(model, images=args.images or None, size=args.size)
    print(report.format())
    if args.json_out:
        write_json(report.to_dict(), args.json_out)
        print(f"report: {args.json_out}")
    if args.plot:
        from ..diagnostics.plots import save_figures
        from ..text import parse_classes

        classes = parse_classes(args.classes) if args.classes else None
        for path in save_figures(model, report, args.plot, patch=patch, classes=classes):
            print(f"figure: {path}")
    return 0

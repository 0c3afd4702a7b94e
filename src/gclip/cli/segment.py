"""``gclip segment``: label images and write palettized PNG label maps plus JSON."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import (
    add_class_args,
    add_method_args,
    add_model_args,
    add_settings_args,
    classes_from,
    load_model_from,
    method_options_from,
    settings_from,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("segment", help="segment images into the given classes", description=__doc__)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    add_class_args(p)
    p.add_argument("--out", required=True, help="output folder for <stem>.png and <stem>.json")
    add_model_args(p)
    add_method_args(p)
    add_settings_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..errors import ImageError
    from ..outputs import result_record, write_json, write_label_png
    from ..segmenter import Segmenter

    classes = classes_from(args)
    segmenter = Segmenter(
        load_model_from(args),
        method=args.method,
        method_options=method_options_from(args),
        templates=args.templates,
        classes=classes,
        **settings_from(args),
    )
    out = Path(args.out)
    failed = []
    for image in args.images:
        try:
            result = segmenter.predict(image)
        except ImageError as e:
            print(f"gclip: skipped: {e}", file=sys.stderr)
            failed.append(image)
            continue
        stem = Path(image).stem
        write_label_png(result.labels, out / f"{stem}.png")
        write_json(
            {"image": str(image), **result_record(result), "settings": segmenter.describe()}, out / f"{stem}.json"
        )
        print(f"{image} -> {out / (stem + '.png')}")
    if failed:
        print(f"gclip: {len(failed)} of {len(args.images)} images failed", file=sys.stderr)
    return 1 if failed else 0

"""``gclip data``: prepare benchmark labels (``coco-object``: COCO-Object labels from COCO-Stuff)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare benchmark data (coco-object)", description=__doc__)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    c = tasks.add_parser(
        "coco-object",
        help="write *_instanceTrainIds.png (80 things -> 1..80, stuff -> 0) beside COCO-Stuff's *_labelTrainIds.png",
    )
    c.add_argument("--data-root", required=True, help="folder holding coco_stuff164k/")
    c.add_argument("--overwrite", action="store_true", help="rewrite labels that already exist")
    c.set_defaults(func=run_coco_object)


def run_coco_object(args: argparse.Namespace) -> int:
    from ..evaluation import build_coco_object

    written, kept = build_coco_object(args.data_root, overwrite=args.overwrite)
    print(f"coco_object: {written} labels written, {kept} already present (use --overwrite to rewrite)")
    return 0

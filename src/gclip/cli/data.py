"""``gclip data``: prepare benchmark labels (``coco-object``: COCO-Object labels from COCO-Stuff) and check a prepared
layout (``check``: counts, pairs, sizes, label values, image modes; one line per set)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare (coco-object) or check (check) benchmark data", description=__doc__)
    tasks = p.add_subparsers(dest="task", required=True, metavar="TASK")
    c = tasks.add_parser(
        "coco-object",
        help="write *_instanceTrainIds.png (80 things -> 1..80, stuff -> 0) beside COCO-Stuff's *_labelTrainIds.png",
    )
    c.add_argument("--data-root", required=True, help="folder holding coco_stuff164k/")
    c.add_argument("--overwrite", action="store_true", help="rewrite labels that already exist")
    c.set_defaults(func=run_coco_object)
    k = tasks.add_parser(
        "check",
        help="check a prepared dataset: image count, every label present and readable, sizes, label values, modes",
    )
    k.add_argument(
        "dataset", help="comma-separated datasets, 'all' (the eight classic sets), or a family: large, remote, mess"
    )
    k.add_argument("--data-root", required=True, help="folder holding the datasets (the layouts the docs show)")
    k.add_argument("--limit", type=int, help="check only the first N images of each set")
    k.add_argument("--workers", type=int, default=4, help="threads reading the files (default 4)")
    k.set_defaults(func=run_check)


def run_check(args: argparse.Namespace) -> int:
    """One verdict line per set; exit 1 when a set is broken."""
    from ..errors import ConfigError
    from ..evaluation import expand_datasets
    from ..evaluation.check import check_dataset

    if args.limit is not None and args.limit < 1:
        raise ConfigError("--limit must be >= 1")
    broken = False
    for spec in expand_datasets(args.dataset):
        result = check_dataset(spec, args.data_root, args.limit, args.workers)
        print(result.verdict(), flush=True)
        broken |= result.broken
    return 1 if broken else 0


def run_coco_object(args: argparse.Namespace) -> int:
    from ..evaluation import build_coco_object

    written, kept = build_coco_object(args.data_root, overwrite=args.overwrite)
    print(f"coco_object: {written} labels written, {kept} already present (use --overwrite to rewrite)")
    return 0

"""``gclip models``: the methods and the open_clip ViT models gclip can run."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list methods and supported backbones")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import open_clip

    from ..methods import get_method, list_methods

    print("methods:")
    for name in list_methods():
        print(f"  {name:10s} {get_method(name).summary}")
    print("open_clip ViT models with pretrained tags:")
    for name in open_clip.list_models():
        tags = open_clip.list_pretrained_tags_by_model(name)
        if name.startswith("ViT-") and tags:
            print(f"  {name:24s} {', '.join(tags)}")
    return 0

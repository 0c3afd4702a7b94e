"""``gclip embed-text``: embed class names once, where the model's tokenizer is at hand, for runs without it.

SigLIP's and SigLIP 2's tokenizers come from the Hugging Face hub. On a machine that has it (online, or with
``--tokenizer DIR``), write the class embeddings to a file; then ``gclip segment`` / ``gclip eval`` with
``--text-embeddings FILE`` and the same model, weights, precision and templates need no tokenizer:

    gclip embed-text --model ViT-B-16-SigLIP2 --pretrained webli --classes-file voc21.txt --out voc21.npz
    gclip segment photo.jpg --model ViT-B-16-SigLIP2 --pretrained webli --classes-file voc21.txt \\
        --text-embeddings voc21.npz --out out/
"""

from __future__ import annotations

import argparse

from .common import add_class_args, add_model_args, classes_from, load_model_from


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "embed-text",
        help="embed class names into a file that runs without the tokenizer can use (--text-embeddings)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_class_args(p)
    p.add_argument("--out", required=True, metavar="FILE", help="the embeddings file to write (*.npz)")
    p.add_argument("--templates", default="openai_imagenet_80", help="bundled template set or a file")
    add_model_args(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..text import TextEncoder, write_text_embeddings

    classes = classes_from(args)
    model = load_model_from(args)
    encoder = TextEncoder(model, args.templates)
    path = write_text_embeddings(args.out, encoder, classes.queries)
    print(f"{path}: {len(classes.queries)} names, {model.name}, {len(encoder.templates)} templates")
    return 0

"""Options shared by subcommands: the model, the method, the classes and the inference settings."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..errors import ConfigError
from ..methods import SECOND_MODEL_OPTIONS, list_methods, methods_with_option, paired_methods


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default="ViT-B-16", help="open_clip model name (default: ViT-B-16)")
    g.add_argument("--pretrained", default="openai", help="pretrained tag (default: openai) or a local checkpoint file")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument(
        "--quick-gelu",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="force QuickGELU on/off (default: from the tag; on for OpenAI JIT files)",
    )


def add_method_args(parser: argparse.ArgumentParser, multiple: bool = False) -> None:
    g = parser.add_argument_group("method")
    names = ", ".join(list_methods())
    g.add_argument(
        "--method",
        default="gclip",
        help=(
            f"comma-separated methods, or 'all', among {names} (default: gclip)"
            if multiple
            else f"method among {names} (default: gclip)"
        ),
    )
    g.add_argument(
        "--method-options",
        default=None,
        metavar="JSON",
        help='method options as JSON, e.g. \'{"emerging_blocks": [6, 7], "fusion": "per_head"}\'',
    )
    for option, (metavar, text) in SECOND_MODEL_OPTIONS.items():  # for the methods that have the option
        users = methods_with_option(option)
        if users:
            flag = "--" + option.replace("_", "-")
            g.add_argument(flag, default=None, metavar=metavar, help=f"{text} ({', '.join(users)})")


def add_class_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    g = parser.add_mutually_exclusive_group(required=required)
    g.add_argument(
        "--classes",
        help='comma-separated class names, e.g. "cat,dog,sky" (";" between classes lets "," separate synonyms)',
    )
    g.add_argument("--classes-file", help="file with one class per line (comma-separated synonyms on a line)")


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("inference settings (default: the ClearCLIP protocol)")
    g.add_argument("--short-side", type=int, help="resize the short side to this (0: keep size; default 448)")
    g.add_argument("--max-long-side", type=int, help="cap on the long side after resize (default 2048)")
    g.add_argument("--crop", type=int, help="sliding-window size (0: whole image; default 448)")
    g.add_argument("--stride", type=int, help="sliding-window stride (default 224)")
    g.add_argument("--padding", choices=["symmetric", "none"], help="window padding to the patch multiple")
    g.add_argument("--logit-scale", type=float, help="logit scale before the softmax (default 50)")
    g.add_argument("--prob-thd", type=float, help="top probability below this -> class 0 (default 0)")
    g.add_argument("--area-thd", type=float, help="drop classes below this fraction of foreground (default off)")
    g.add_argument("--pamr", dest="pamr_steps", type=int, metavar="STEPS", help="PAMR steps (default 0: off)")
    g.add_argument("--batch-size", type=int, help="windows per forward pass (default: 16 on a GPU, 1 on a CPU)")
    g.add_argument("--templates", default="openai_imagenet_80", help="bundled template set or a file")


SETTING_FIELDS = (
    "short_side",
    "max_long_side",
    "crop",
    "stride",
    "padding",
    "logit_scale",
    "prob_thd",
    "area_thd",
    "pamr_steps",
    "batch_size",
)


def settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """The settings given on the command line (unset ones are left to defaults or presets)."""
    return {f: getattr(args, f) for f in SETTING_FIELDS if getattr(args, f, None) is not None}


def method_options_from(args: argparse.Namespace, method: str | None = None) -> dict[str, Any]:
    """``--method-options`` as a dict, plus ``--proxy``/``--proxy-checkpoint`` for a method that has a second
    model (for ``method=None``: the one ``--method`` names; other methods never get them)."""
    options: dict[str, Any] = {}
    if args.method_options:
        try:
            options = json.loads(args.method_options)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--method-options is not valid JSON ({e.msg} at column {e.colno})") from e
        if not isinstance(options, dict):
            raise ConfigError('--method-options must be a JSON object, e.g. \'{"fusion": "per_head"}\'')
    proxy = proxy_options_from(args)
    if proxy:
        mine = second_model_options(method or args.method, proxy)
        options.update(mine)
        if method is None and len(mine) < len(proxy):
            flag = "--" + sorted(set(proxy) - set(mine))[0].replace("_", "-")
            paired = ", ".join(paired_methods())
            raise ConfigError(f"{flag}: method {args.method!r} has no such second model (see {paired})")
    return options


def proxy_options_from(args: argparse.Namespace) -> dict[str, Any]:
    """``--proxy`` / ``--proxy-checkpoint`` / ``--sam-checkpoint`` / ``--masks`` / ``--mask-generator`` as method
    options (only those given)."""
    return {k: getattr(args, k, None) for k in SECOND_MODEL_OPTIONS if getattr(args, k, None) is not None}


def second_model_options(method: str, options: dict[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` (second-model flags) that ``method`` has as options."""
    if method not in list_methods():
        return {}
    return {k: v for k, v in options.items() if method in methods_with_option(k)}


def load_model_from(args: argparse.Namespace):
    from ..backbones.models import load_model

    return load_model(args.model, args.pretrained, args.precision, args.device, quick_gelu=args.quick_gelu)


def classes_from(args: argparse.Namespace):
    from ..text import parse_classes, read_class_file

    if getattr(args, "classes_file", None):
        return read_class_file(args.classes_file)
    return parse_classes(args.classes)

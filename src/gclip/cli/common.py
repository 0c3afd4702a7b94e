"""Options shared by subcommands: the model, the method, the classes and the inference settings."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from typing import Any

from ..errors import ConfigError
from ..inference.segmenter import Settings
from ..methods import SECOND_MODEL_OPTIONS, list_methods, methods_with_option, methods_with_second_models


def add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model",
        default=None,
        help="open_clip model name (default: the one a `gclip download` file records, else ViT-B-16)",
    )
    g.add_argument("--pretrained", default="openai", help="pretrained tag (default: openai) or a local checkpoint file")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    g.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    g.add_argument(
        "--quick-gelu",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="force QuickGELU on/off (default: from the tag, the `gclip download` file, or OpenAI's files)",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="a folder with the text tower's tokenizer files, for models whose tokenizer comes from the Hugging Face "
        "hub (SigLIP, SigLIP 2), offline",
    )


def add_text_embeddings_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--text-embeddings",
        default=None,
        metavar="FILE",
        help="class embeddings made beforehand with `gclip embed-text` (same model and templates): no tokenizer needed",
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


SETTING_ALIASES = {"pamr_steps": ["--pamr"]}
"""Older flag names a setting keeps."""


def _setting_docs() -> dict[str, str]:
    """Each :class:`~gclip.Settings` field's line(s) in its docstring, as plain text."""
    docs: dict[str, str] = {}
    name = None
    for line in (Settings.__doc__ or "").split("Attributes:")[-1].splitlines():
        found = re.match(r"^ {8}(\w+): (.*)$", line)
        if found:
            name, docs[found.group(1)] = found.group(1), found.group(2)
        elif name and line.startswith(" " * 12):
            docs[name] += " " + line.strip()
    return {k: v.replace("``", "") for k, v in docs.items()}


def add_settings_args(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`~gclip.Settings` field (``--short-side`` for ``short_side``), typed and documented
    from the dataclass; unset flags leave the setting to the defaults or a preset."""
    g = parser.add_argument_group("inference settings (default: the ClearCLIP protocol)")
    docs, defaults, hints = _setting_docs(), Settings(), typing.get_type_hints(Settings)
    for f in dataclasses.fields(Settings):
        hint = hints[f.name]
        union = typing.get_origin(hint) in (typing.Union, types.UnionType)
        kind = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
        default = getattr(defaults, f.name)
        options: dict[str, Any] = {"dest": f.name, "default": None}
        if typing.get_origin(kind[0]) is typing.Literal:
            options["choices"] = list(typing.get_args(kind[0]))
        elif typing.get_origin(kind[0]) is tuple:
            options.update(nargs="+", type=int, metavar="N")
            default = " ".join(str(v) for v in default)
        else:
            options["type"] = kind[0]
        shown = "" if default is None else f" (default {default})"
        flags = ["--" + f.name.replace("_", "-"), *SETTING_ALIASES.get(f.name, [])]
        g.add_argument(*flags, help=docs.get(f.name, "").rstrip(".") + shown, **options)
    g.add_argument("--templates", default="openai_imagenet_80", help="bundled template set or a file")


SETTING_FIELDS = tuple(f.name for f in dataclasses.fields(Settings))


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
            paired = ", ".join(methods_with_second_models())
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

    return load_model(
        args.model, args.pretrained, args.precision, args.device, quick_gelu=args.quick_gelu, tokenizer=args.tokenizer
    )


def classes_from(args: argparse.Namespace):
    from ..text import parse_classes, read_class_file

    if getattr(args, "classes_file", None):
        return read_class_file(args.classes_file)
    return parse_classes(args.classes)

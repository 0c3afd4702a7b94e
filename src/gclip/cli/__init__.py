"""The ``gclip`` command: one module per subcommand, each with ``add_parser(subparsers)``."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import warnings

from ..errors import GclipError

SUBCOMMANDS = ["segment", "eval", "data", "bench", "models", "inspect", "demo", "download", "embed-text"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="gclip", description="Training-free open-vocabulary semantic segmentation with CLIP (GCLIP and baselines)."
    )
    parser.add_argument("--version", action="version", version=f"gclip {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").add_parser(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, line=None) -> str:  # noqa: ARG001 - warnings' signature
    return f"gclip: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit code (0 ok, 1 some inputs failed, 2 a usage or setup error)."""
    logging.getLogger().setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*QuickGELU.*")
    warnings.formatwarning = _one_line_warning
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GclipError as e:
        print(f"gclip: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gclip: interrupted", file=sys.stderr)
        return 130

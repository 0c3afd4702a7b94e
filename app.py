"""Hugging Face Spaces entry point: start the gclip demo with the model named by environment variables.

    GCLIP_MODEL        open_clip model name (default ViT-B-16)
    GCLIP_PRETRAINED   pretrained tag or checkpoint file (default openai)
    GCLIP_DEVICE       cpu, cuda, cuda:N (default: cuda when available)
    GCLIP_PRECISION    fp32, fp16 or bf16 (default fp32)
    GCLIP_SHORT_SIDE   the short-side setting the app starts with (default 448)

The server listens on ``GRADIO_SERVER_NAME`` (Spaces sets 0.0.0.0; default here 127.0.0.1) and
``GRADIO_SERVER_PORT`` (default 7860). Locally, ``gclip demo`` does the same with command-line options.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent / "src"
if SRC.is_dir() and str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))  # a Space runs from the checkout without installing it

import gclip  # noqa: E402
from gclip.demo import DemoService, DemoSettings, launch  # noqa: E402


def main() -> None:
    try:
        model = gclip.load_model(
            os.environ.get("GCLIP_MODEL", "ViT-B-16"),
            os.environ.get("GCLIP_PRETRAINED", "openai"),
            os.environ.get("GCLIP_PRECISION", "fp32"),
            os.environ.get("GCLIP_DEVICE") or None,
        )
    except gclip.GclipError as e:
        print(f"gclip: error: {e}", file=sys.stderr)
        sys.exit(2)
    side = int(os.environ.get("GCLIP_SHORT_SIDE", "448"))
    service = DemoService(model, defaults=DemoSettings(short_side=side, crop=side))
    launch(
        service,
        host=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"),
        port=int(os.environ.get("GRADIO_SERVER_PORT", "7860")),
    )


if __name__ == "__main__":
    main()

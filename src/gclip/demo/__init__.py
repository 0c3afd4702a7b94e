"""The web demo (``gclip demo``, extra ``gclip[demo]``): a Gradio app over one shared model.

:mod:`gclip.demo.service` holds the engine (no web framework); :mod:`gclip.demo.ui` the Gradio app, imported
only when asked for so that ``import gclip.demo`` works without Gradio.

>>> from gclip.demo import DemoService, launch  # doctest: +SKIP
>>> launch(DemoService(gclip.load_model("ViT-B-16", "openai")))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from .service import EXAMPLES_DIR, DemoService, DemoSettings, Limits, Outcome, parse_vocabulary

__all__ = ["EXAMPLES_DIR", "DemoService", "DemoSettings", "Limits", "Outcome", "parse_vocabulary", "launch"]


def launch(service: DemoService, **kwargs: Any):
    """Start the Gradio app (see :func:`gclip.demo.ui.launch`); needs ``pip install 'gclip[demo]'``."""
    from ..errors import ConfigError

    try:
        from . import ui
    except ImportError as e:
        raise ConfigError(f"the demo needs Gradio ({e.name} is missing): pip install 'gclip[demo]'") from e
    return ui.launch(service, **kwargs)

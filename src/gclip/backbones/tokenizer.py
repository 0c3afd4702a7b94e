"""The text tower's tokenizer, found offline when it can be.

Most open_clip models (OpenAI, LAION, DataComp, MetaCLIP, DFN, PE-Core, EVA02) use open_clip's built-in BPE
tokenizer, which needs no file. SigLIP and SigLIP 2 name a tokenizer on the Hugging Face hub
(``timm/ViT-B-16-SigLIP2``: Gemma's); :func:`resolve_tokenizer` takes it, in order, from

1. a local folder given as ``tokenizer`` (``--tokenizer DIR``: the hub repository's tokenizer files, e.g.
   ``tokenizer.json`` and ``tokenizer_config.json``, as ``huggingface-cli download timm/ViT-B-16-SigLIP2
   --include "tokenizer*" "special_tokens_map.json" --local-dir DIR`` writes them),
2. the local hub cache (what an earlier online run downloaded),
3. the hub itself, when it answers;

otherwise it fails in one line that names ``--tokenizer`` and ``--text-embeddings`` (class embeddings made
elsewhere with ``gclip embed-text``, :mod:`gclip.text`). A hub tokenizer is read with open_clip's ``HFTokenizer``
and the model config's own settings (context length, text cleaning, mode), so the tokens are the ones open_clip
makes; it needs ``transformers`` (the ``hub-tokenizer`` extra).

:class:`LazyTokenizer` finds the tokenizer on its first call only: a run whose class embeddings all come from a
``--text-embeddings`` file or the text cache never needs one.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError, WeightsError
from .weights import hub_cached, hub_reachable

__all__ = ["LazyTokenizer", "hf_tokenizer", "hub_tokenizer_name", "resolve_tokenizer"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "vocab.json")
"""Files of which a tokenizer folder has at least one (the fast tokenizer's JSON, or a SentencePiece model)."""

_REMEDY = (
    "pass --tokenizer DIR (a folder with the hub repository's tokenizer files) or --text-embeddings FILE "
    "(made with `gclip embed-text` where the tokenizer is available)"
)


def _text_cfg(name: str) -> dict[str, Any]:
    import open_clip

    return dict((open_clip.get_model_config(name) or {}).get("text_cfg", {}))


def hub_tokenizer_name(name: str) -> str | None:
    """The Hugging Face repository model ``name``'s tokenizer comes from (``"timm/ViT-B-16-SigLIP2"``), ``None``
    for open_clip's built-in tokenizer (no file needed)."""
    return _text_cfg(name).get("hf_tokenizer_name") or None


def hf_tokenizer(name: str, source: str) -> Callable[..., torch.Tensor]:
    """open_clip's ``HFTokenizer`` for model ``name`` read from ``source`` (a folder or hub id), with the model
    config's context length, cleaning and mode."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise ConfigError(
            f"model {name} uses a Hugging Face tokenizer, which needs transformers: pip install 'gclip[hub-tokenizer]'"
        ) from None
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    cfg = _text_cfg(name)
    return HFTokenizer(
        source,
        context_length=cfg.get("context_length", DEFAULT_CONTEXT_LENGTH),
        tokenizer_mode=cfg.get("tokenizer_mode"),
        **cfg.get("tokenizer_kwargs", {}),
    )


def _check_folder(folder: Path) -> None:
    if not folder.exists():
        raise ConfigError(f"--tokenizer {folder}: no such folder")
    if not folder.is_dir():
        raise ConfigError(f"--tokenizer {folder}: not a folder (give the folder that holds tokenizer.json)")
    if not any((folder / f).is_file() for f in _TOKENIZER_FILES):
        expected = ", ".join(_TOKENIZER_FILES)
        raise ConfigError(f"--tokenizer {folder}: no tokenizer files in it (expected one of {expected})")


def resolve_tokenizer(
    name: str, tokenizer: str | Path | None = None, cache_dir: str | None = None
) -> Callable[..., torch.Tensor]:
    """The tokenizer of open_clip model ``name`` (see the module docstring for where it comes from).

    Args:
        tokenizer: a local folder with a hub tokenizer's files, for a model whose tokenizer comes from the hub.
        cache_dir: the hub cache to look in.

    Raises:
        ConfigError: ``tokenizer`` is not a tokenizer folder, or was given for a model with the built-in tokenizer.
        WeightsError: the hub tokenizer is neither given, nor cached, nor downloadable (offline).
    """
    import open_clip

    repo = hub_tokenizer_name(name)
    if repo is None:
        if tokenizer is not None:
            raise ConfigError(
                f"--tokenizer {tokenizer}: model {name} uses open_clip's built-in tokenizer, which needs no files; "
                "leave --tokenizer out"
            )
        return open_clip.get_tokenizer(name)
    if tokenizer is not None:
        folder = Path(tokenizer).expanduser()
        _check_folder(folder)
        return hf_tokenizer(name, str(folder))
    cached = hub_cached(repo, ["tokenizer_config.json", "tokenizer.json"], cache_dir)
    if cached is not None:
        return hf_tokenizer(name, str(Path(cached).parent))
    if not hub_reachable():
        raise WeightsError(f"model {name}'s tokenizer comes from huggingface.co/{repo}, not reachable here: {_REMEDY}")
    return hf_tokenizer(name, repo)


class LazyTokenizer:
    """A tokenizer found on its first call (:func:`resolve_tokenizer`), so that a model whose tokenizer is
    unavailable still loads, and runs whose class embeddings are given or cached never look for one.

    Calling it is calling the tokenizer: ``texts -> (N, context_length)`` token ids.
    """

    def __init__(self, name: str, tokenizer: str | Path | None = None, cache_dir: str | None = None) -> None:
        self.name, self.source, self.cache_dir = name, tokenizer, cache_dir
        self._tokenizer: Callable[..., torch.Tensor] | None = None
        self._lock = threading.Lock()

    def check(self) -> None:
        """Find the tokenizer now (a one-line error if it cannot be found)."""
        self.resolved()

    def resolved(self) -> Callable[..., torch.Tensor]:
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = resolve_tokenizer(self.name, self.source, self.cache_dir)
            return self._tokenizer

    def __call__(self, texts: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.resolved()(texts, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:  # shipped to workers without the lock (and found again there)
        return {"name": self.name, "source": self.source, "cache_dir": self.cache_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["name"], state["source"], state["cache_dir"])  # type: ignore[misc]

    def __repr__(self) -> str:
        return f"LazyTokenizer({self.name!r}, tokenizer={self.source!r})"

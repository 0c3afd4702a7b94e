"""Class lists (with synonyms), prompt templates, and text embeddings cached per (model, templates, name).

Embeddings are cached in memory and on disk: ``~/.cache/gclip/text/<key>/<sha1 of the name>.npy``, where the
key joins the model name, its weights' fingerprint, a hash of the text tower's projection, the precision and a
hash of the templates. ``GCLIP_CACHE_DIR`` moves the cache (``$GCLIP_CACHE_DIR/text``); ``GCLIP_NO_CACHE=1``
turns the disk cache off. Files are written to a temporary name and renamed, so concurrent runs are safe.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Union

import numpy as np
import torch

from .backbones.models import LoadedModel
from .cache import cache_dir as shared_cache_dir
from .errors import ClassesError, ConfigError, WeightsError
from .io.outputs import atomic_path

__all__ = [
    "ClassList",
    "TextEncoder",
    "cache_dir",
    "load_templates",
    "parse_classes",
    "read_class_file",
    "read_text_embeddings",
    "write_text_embeddings",
]

ClassSpec = Union[str, Path, Sequence[Union[str, Sequence[str]]]]
BACKGROUND = "background"
"""A first class of this name is a background class (see :attr:`ClassList.background`)."""


@dataclass(frozen=True)
class ClassList:
    """Classes, each with one or more synonyms (queries).

    Attributes:
        synonyms: per class, its names; the first is the display name.
        background: class 0 is a background class, not a thing to find: ``prob_thd`` sends uncertain pixels to
            it, ``area_thd`` never drops it, and it is drawn black. Set when the first class is named
            ``background`` (and by the evaluation for the benchmarks that have one). Without it, uncertain
            pixels are left unlabeled (label ``-1``; 255 in label PNGs) and every class is a real one.
    """

    synonyms: tuple[tuple[str, ...], ...]
    background: bool = False

    @property
    def names(self) -> list[str]:
        """Display names, one per class."""
        return [s[0] for s in self.synonyms]

    @property
    def queries(self) -> list[str]:
        """Every synonym of every class, flattened in order."""
        return [q for s in self.synonyms for q in s]

    @property
    def query_to_class(self) -> list[int]:
        """For each query, the index of its class."""
        return [i for i, s in enumerate(self.synonyms) for _ in s]

    def __len__(self) -> int:
        return len(self.synonyms)


def _split_synonyms(line: str) -> tuple[str, ...]:
    return tuple(name.strip() for name in line.split(",") if name.strip())


def _validate(synonyms: list[tuple[str, ...]], source: str, allow_duplicates: bool = False) -> ClassList:
    if not synonyms:
        raise ClassesError(f"class list from {source} is empty: give at least one class name")
    seen: dict[str, int] = {}
    for i, names in enumerate(synonyms):
        if not names:
            raise ClassesError(f"class {i + 1} from {source} has no name")
        for name in names:
            key = name.lower()
            if key in seen and not allow_duplicates:
                raise ClassesError(
                    f"class list from {source} names {name!r} twice (classes {seen[key] + 1} and {i + 1}): "
                    "remove the duplicate"
                )
            seen[key] = i
    return ClassList(tuple(synonyms), background=synonyms[0][0].lower() == BACKGROUND)


def _python_list(text: str, key: str, path: Path) -> list[str]:
    """The module-level list (or tuple) of strings ``key = [...]`` in Python source, read without running it."""
    import ast

    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as e:
        raise ClassesError(f"class file {path} is not valid Python: {e.msg} (line {e.lineno})") from e
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == key for t in node.targets):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                value = None
            if isinstance(value, (list, tuple)) and all(isinstance(x, str) for x in value):
                return list(value)
            raise ClassesError(f"class file {path}: {key} is not a list of class names")
    raise ClassesError(f"class file {path} has no class list {key}")


def read_class_file(path: str | Path, allow_duplicates: bool = False, key: str | None = None) -> ClassList:
    """One class per line; comma-separated synonyms on a line; blank lines and ``#`` comments skipped.

    A ``.json`` file is a list with one entry per class: a string of comma-separated synonyms (CAT-Seg's
    ``ade847.json``, ``pc459.json``) or a list of synonyms. A ``.py`` file is Python source holding the list
    ``key`` (default ``CLASSES``), one name per class, read without running the file (MESS's ``register_*.py``).

    ``allow_duplicates`` accepts a name listed under two classes (SCLIP's COCO-Object file lists ``bed``
    among the background synonyms and as a class); otherwise that is an error.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ClassesError(f"cannot read class file {path}: {e.__class__.__name__}: {e}") from e
    if path.suffix.lower() == ".json":
        import json

        try:
            entries = json.loads(text)
        except ValueError as e:
            raise ClassesError(f"class file {path} is not valid JSON: {e}") from e
        if not isinstance(entries, list) or not all(isinstance(x, (str, list)) for x in entries):
            raise ClassesError(f"class file {path}: expected a JSON list with one string (or list) per class")
        synonyms = [
            _split_synonyms(x) if isinstance(x, str) else tuple(str(n).strip() for n in x if str(n).strip())
            for x in entries
        ]
        return _validate(synonyms, str(path), allow_duplicates)
    if path.suffix.lower() == ".py":
        key = key or "CLASSES"
        names = [(name.strip(),) for name in _python_list(text, key, path)]
        return _validate(names, f"{path} ({key})", allow_duplicates)
    lines = [ln.strip() for ln in text.splitlines()]
    return _validate(
        [_split_synonyms(ln) for ln in lines if ln and not ln.startswith("#")], str(path), allow_duplicates
    )


def parse_classes(spec: ClassSpec | ClassList) -> ClassList:
    """A class list from a file path, a string, or a sequence.

    - ``Path`` or an existing file name: see :func:`read_class_file`.
    - a string: classes separated by ``;`` when it contains one (then ``,`` separates synonyms), otherwise
      classes separated by ``,`` (e.g. ``"cat,dog,sky"``).
    - a sequence: one item per class; an item is a name, a ``"name, synonym"`` string, or a list of synonyms.

    >>> parse_classes("cat,dog").names
    ['cat', 'dog']
    >>> parse_classes(["person, people", "car"]).queries
    ['person', 'people', 'car']
    """
    if isinstance(spec, ClassList):
        return spec
    if isinstance(spec, Path):
        return read_class_file(spec)
    if isinstance(spec, str):
        if "\n" not in spec and Path(spec).suffix == ".txt" and Path(spec).is_file():
            return read_class_file(spec)
        if ";" in spec:
            return _validate([_split_synonyms(part) for part in spec.split(";") if part.strip()], "--classes")
        return _validate([(n.strip(),) for n in spec.split(",") if n.strip()], "--classes")
    synonyms: list[tuple[str, ...]] = []
    for item in spec:
        if isinstance(item, str):
            synonyms.append(_split_synonyms(item))
        else:
            synonyms.append(tuple(str(n).strip() for n in item if str(n).strip()))
    return _validate(synonyms, "the class list")


def load_templates(name: str | Path | Sequence[str] = "openai_imagenet_80") -> list[str]:
    """Prompt templates with ``{c}`` for the class name: a bundled set's name, a file, or a list.

    The bundled ``openai_imagenet_80`` set is the 80 OpenAI ImageNet templates used by the peers.
    """
    if not isinstance(name, (str, Path)):
        templates = list(name)
    else:
        bundled = resources.files("gclip") / "data" / "templates" / f"{name}.txt"
        if isinstance(name, str) and bundled.is_file():
            text = bundled.read_text(encoding="utf-8")
        elif Path(name).is_file():
            text = Path(name).read_text(encoding="utf-8")
        else:
            raise ConfigError(f"unknown templates {str(name)!r}: use 'openai_imagenet_80' or a file with one per line")
        templates = [ln.strip() for ln in text.splitlines() if ln.strip()]
    bad = [t for t in templates if "{c}" not in t]
    if not templates or bad:
        raise ConfigError(f"templates must each contain '{{c}}' (bad: {bad[:1]})")
    return templates


def cache_dir() -> Path | None:
    """The text-embedding disk cache folder (:func:`gclip.cache.cache_dir` ``"text"``), ``None`` when off."""
    return shared_cache_dir("text")


def _causal_prefix(clip: torch.nn.Module, tokens: torch.Tensor) -> int | None:
    """Tokens to keep when the text tower is causal and pools at the end-of-text token, else ``None``."""
    mask = getattr(clip, "attn_mask", None)
    pool = getattr(clip, "text_pool_type", None)
    needed = ("token_embedding", "positional_embedding", "transformer", "ln_final", "text_projection")
    if mask is None or pool not in ("argmax", "eos") or not all(hasattr(clip, a) for a in needed):
        return None
    causal = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    if not (torch.isinf(mask[causal]).all() and (mask[~causal] == 0).all()):
        return None
    if pool == "argmax":
        ends = tokens.argmax(dim=-1)
    else:
        ends = (tokens == clip.text_eos_id).int().argmax(dim=-1)
    return int(ends.max()) + 1


def encode_text(clip: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """``clip.encode_text(tokens)``, computed on the tokens up to the last end-of-text token only.

    CLIP's text tower is causal and reads its output at the end-of-text token, so the padding after it never
    reaches the result: cutting the sequence there (typically 10-20 of 77 positions for prompt templates)
    gives the same embeddings for a fraction of the work. Other text towers run unchanged.
    """
    from open_clip.transformer import text_global_pool

    keep = _causal_prefix(clip, tokens)
    if keep is None or keep >= tokens.shape[1]:
        return clip.encode_text(tokens)
    tokens = tokens[:, :keep]
    cast = clip.transformer.get_cast_dtype()
    x = clip.token_embedding(tokens).to(cast) + clip.positional_embedding[:keep].to(cast)
    x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask[:keep, :keep]))
    x = text_global_pool(x, tokens, clip.text_pool_type, eos_token_id=getattr(clip, "text_eos_id", None))
    projection = clip.text_projection
    return projection(x) if isinstance(projection, torch.nn.Linear) else x @ projection


class TextEncoder:
    """Embeds class names with a model and a template set; one embedding per name, cached in memory and on disk.

    The embedding of a name: encode every template filled with it, L2-normalise each, average, L2-normalise.

    Args:
        model, templates: the model whose text tower embeds, and the prompt templates.
        embeddings: a file of embeddings made beforehand with this model and templates
            (:func:`write_text_embeddings`, ``gclip embed-text``); its names need no tokenizer.
    """

    def __init__(
        self,
        model: LoadedModel,
        templates: str | Path | Sequence[str] = "openai_imagenet_80",
        embeddings: str | Path | None = None,
    ) -> None:
        self.model = model
        self.templates = load_templates(templates)
        digest = hashlib.sha1("\n".join(self.templates).encode()).hexdigest()[:12]
        text_proj = getattr(model.clip, "text_projection", None)
        if text_proj is None:  # open_clip's CustomTextCLIP (SigLIP, PE-Core, EVA02): the text tower holds it
            text_proj = getattr(getattr(model.clip, "text", None), "text_projection", None)
        if isinstance(text_proj, torch.nn.Linear):
            text_proj = text_proj.weight
        tower = hashlib.sha1()
        if isinstance(text_proj, torch.Tensor):
            tower.update(text_proj.detach().float().cpu().contiguous().numpy().tobytes())
        precision = str(getattr(model, "dtype", "")).replace("torch.", "")
        self.key = f"{model.fingerprint}-{digest}"
        self.disk_key = f"{model.name}-{model.fingerprint}-{tower.hexdigest()[:8]}-{precision}-{digest}"
        self._cache: dict[str, torch.Tensor] = {}
        self.disk_hits = 0
        self.embeddings_file = None if embeddings is None else Path(embeddings)
        self.given = {} if embeddings is None else read_text_embeddings(embeddings, self)
        """Embeddings read from ``embeddings`` (:func:`write_text_embeddings`), used before the tokenizer."""

    @torch.no_grad()
    def _encode(self, name: str) -> torch.Tensor:
        tokens = self.model.tokenizer([t.replace("{c}", name) for t in self.templates]).to(self.model.device)
        features = encode_text(self.model.clip, tokens).float()
        features = features / features.norm(dim=-1, keepdim=True)
        mean = features.mean(dim=0)
        return (mean / mean.norm()).cpu()

    def _path(self, name: str) -> Path | None:
        root = cache_dir()
        if root is None:
            return None
        return root / self.disk_key / f"{hashlib.sha1(name.encode()).hexdigest()}.npy"

    def _load_or_encode(self, name: str) -> torch.Tensor:
        if name in self.given:
            return self.given[name]
        path = self._path(name)
        if path is not None and path.is_file():
            try:
                self.disk_hits += 1
                return torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
            except (OSError, ValueError):
                self.disk_hits -= 1  # unreadable entry: compute it again and overwrite
        try:
            embedding = self._encode(name)
        except (WeightsError, ConfigError) as e:
            if self.embeddings_file is None:
                raise
            raise type(e)(f"{self.embeddings_file} has no embedding for {name!r}, and the tokenizer: {e}") from e
        if path is not None:
            try:
                with atomic_path(path) as tmp, open(tmp, "wb") as f:
                    np.save(f, embedding.numpy())
            except OSError:
                pass  # a read-only or full cache only costs the recomputation next time
        return embedding

    progress_min: int = 16
    """With at least this many names to embed, :meth:`embed` shows a progress bar (on a terminal)."""

    def embed(self, names: Sequence[str]) -> torch.Tensor:
        """``(len(names), E)`` float32 unit vectors on the CPU. Many new names (``progress_min``) show a progress
        bar on a terminal, which says how many of them the disk cache holds (a name costs one text-tower pass per
        template: about 0.8 s with 80 templates on 2 CPU cores; ``--templates`` with fewer is faster)."""
        todo = list(dict.fromkeys(n for n in names if n not in self._cache))
        bar = None
        if len(todo) >= self.progress_min:
            from tqdm import tqdm

            cached = sum(1 for n in todo if (path := self._path(n)) is not None and path.is_file())
            desc = f"text: {len(todo)} classes x {len(self.templates)} templates ({cached} cached)"
            bar = tqdm(total=len(todo), desc=desc, unit="class", leave=False, disable=None)
        for name in todo:
            self._cache[name] = self._load_or_encode(name)
            if bar is not None:
                bar.update()
        if bar is not None:
            bar.close()
        return torch.stack([self._cache[n] for n in names])


TEXT_EMBEDDINGS_FORMAT = 1
"""The version of the files :func:`write_text_embeddings` writes."""


def write_text_embeddings(path: str | Path, encoder: TextEncoder, names: Sequence[str]) -> Path:
    """Embed ``names`` with ``encoder`` and write them to ``path`` (``.npz``, via a temporary name): the names, the
    ``(N, E)`` float32 unit embeddings, and what made them (model name, weights fingerprint, templates), so that a
    run on a machine without the tokenizer (SigLIP's from the Hugging Face hub) can use them
    (``--text-embeddings``, :class:`TextEncoder` ``embeddings``). Returns the path written."""
    names = list(dict.fromkeys(names))
    if not names:
        raise ClassesError("no class names to embed")
    embeddings = encoder.embed(names).float().numpy()
    path = Path(path)
    if path.suffix != ".npz":
        raise ConfigError(f"text embeddings file {path}: name it *.npz")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(
            f,
            format=np.array(TEXT_EMBEDDINGS_FORMAT),
            names=np.array(names, dtype=np.str_),
            embeddings=embeddings,
            model=np.array(encoder.model.name),
            fingerprint=np.array(encoder.model.fingerprint),
            templates=np.array(encoder.templates, dtype=np.str_),
        )
    return path


def read_text_embeddings(path: str | Path, encoder: TextEncoder) -> dict[str, torch.Tensor]:
    """The ``{name: (E,) embedding}`` of a :func:`write_text_embeddings` file, checked to have been made with the
    encoder's model (name and weights fingerprint, which includes the precision) and templates; one-line
    :class:`~gclip.errors.ConfigError` otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--text-embeddings {path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as data:
            found = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError) as e:
        raise ConfigError(f"--text-embeddings {path}: not a gclip text-embeddings file ({e})") from None
    needed = ("format", "names", "embeddings", "model", "fingerprint", "templates")
    missing = [k for k in needed if k not in found]
    if missing:
        raise ConfigError(f"--text-embeddings {path}: not a gclip text-embeddings file (no {', '.join(missing)})")
    if int(found["format"]) != TEXT_EMBEDDINGS_FORMAT:
        version = int(found["format"])
        raise ConfigError(f"--text-embeddings {path}: format {version}, this gclip reads {TEXT_EMBEDDINGS_FORMAT}")
    model = encoder.model
    if str(found["model"]) != model.name or str(found["fingerprint"]) != model.fingerprint:
        raise ConfigError(
            f"--text-embeddings {path} was made with model {found['model']} (weights {found['fingerprint']}), not "
            f"{model.name} (weights {model.fingerprint}): make it with `gclip embed-text` and the same --model, "
            "--pretrained and --precision"
        )
    if [str(t) for t in found["templates"]] != encoder.templates:
        raise ConfigError(
            f"--text-embeddings {path} was made with other templates ({len(found['templates'])} of them): make it "
            "with `gclip embed-text` and the same --templates"
        )
    names, vectors = found["names"], found["embeddings"]
    if vectors.ndim != 2 or vectors.shape[0] != len(names):
        raise ConfigError(f"--text-embeddings {path}: {len(names)} names but embeddings of shape {vectors.shape}")
    return {str(n): torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for n, v in zip(names, vectors)}

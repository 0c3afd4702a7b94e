"""What every method shares: the interface, the per-pass trace, the registry, and attention helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import typing
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..inference.windows import ImageWindows
from .pieces import (
    BlockChange,
    ImageContext,
    LabelRefinement,
    SecondModelPass,
    TextSide,
    Trace,
    WindowContext,
    run_block,
    window_multiple,
)

__all__ = [
    "Method",
    "Trace",
    "WindowContext",
    "BlockChange",
    "register",
    "get_method",
    "list_methods",
    "methods_with_second_models",
    "SECOND_MODEL_OPTIONS",
    "method_class",
    "methods_with_option",
    "attend",
    "attention_map",
    "cosine_logits",
    "cls_cosine",
    "grid_features",
]

_REGISTRY: dict[str, type[Method]] = {}

SECOND_MODEL_OPTIONS = {
    "proxy": ("NAME", "second model paired with CLIP (gclip models lists them)"),
    "proxy_checkpoint": ("PATH", "local weights file of --proxy"),
    "sam_checkpoint": ("PATH", "SAM's or SAM 2's weights file"),
    "upsampler_checkpoint": ("PATH", "SimFeatUp feature upsampler's weights file (SegEarth-OV's feature_up)"),
    "masks": ("FOLDER", "pre-generated instance masks, <image stem>.npz"),
    "mask_generator": ("NAME", "SAM or SAM 2 model making the masks (sam_vitb, sam2.1_hiera_l, ...)"),
}
"""The options through which a method declares what it needs besides CLIP, with a metavar and a help text: a
method that has one as a field gets it from the command line (``--proxy``, ...), checked by
:meth:`Method.check_resources`."""


_NOT_HOOKS = {
    # hooks before Engine v3, and what replaces each
    "keep_blocks": "blocks() with BlockChange(keep=True)",
    "overrides": "blocks() with BlockChange(weights=...)",
    "block": "blocks() with BlockChange(attention=..., before=...)",
    "encode": "blocks() with BlockChange(before=...)",
    "head": "features() (the text is trace.text) and logits()",
    "refine": "logits()",
    "second_pass": "a second_model piece",
    "warm": "blocks() (built eagerly for each grid) or a second_model piece's warm()",
    "label_context": "a label_refinement piece's context()",
    # derived from the pieces, never overridden
    "text_queries": "a text_side piece",
    "refine_labels": "a label_refinement piece",
    "check_resources": "a second_model piece's check()",
    "output_grid": "a second_model piece's grid()",
    "options": "the dataclass fields",
}
"""Names a method class may not define: the hooks before Engine v3 and what :class:`Method` derives from the
pieces, with what to write instead."""


class Method:
    """A training-free dense-prediction method. Subclasses are dataclasses whose fields are its options.

    A per-crop method writes one function, :meth:`features`: the tokens entering the last block -> the projected
    patch features. By default it runs the last block as the method's :class:`BlockChange` for it says, then the
    final norm and projection; blocks ``0..L-2`` run before it, each as its :class:`BlockChange` says
    (:meth:`blocks`). Everything else a method changes is a piece it names (:mod:`gclip.methods.pieces`):
    ``second_model``, ``text_side``, ``label_refinement``, ``image_context``; :meth:`logits` turns the features into
    logits (cosine similarity by default).

    A whole-image method (``window_mode = "image"``) writes :meth:`image_logits` instead, on the image's windows from
    the engine's window service.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    protocol: ClassVar[str] = ""
    """The evaluation protocol its authors use: a TOML file of ``gclip/evaluation/presets/`` (``gclip eval``)."""
    table_row: ClassVar[tuple[str, str, str]] = ("", "", "")
    """The method in the docs' table (markdown): what it changes, its attention per head, the last block's residual
    and FFN (``gclip models --markdown``)."""
    window_mode: ClassVar[str] = "crop"
    """How the engine hands it an image's windows: ``"crop"``: in batches of windows from any image; ``"cross"``:
    one pass per image with all its windows, whatever the batch size, their
    :class:`~gclip.inference.windows.Window` objects in ``trace.extras["windows"]`` (keys and values extended by
    the other windows', labels propagated across windows); ``"image"``: all windows of an image to
    :meth:`image_logits`."""
    pos_rule: ClassVar[str] = "sclip"
    """How the position embedding is resampled to a crop's grid
    (:func:`gclip.backbones.openclip.resample_pos_embed`)."""
    needs_original: ClassVar[bool] = False
    """The method also reads the decoded pixels (``Prepared.original``), e.g. for a second model's own resize."""

    second_model: ClassVar[SecondModelPass | None] = None
    text_side: ClassVar[TextSide | None] = None
    label_refinement: ClassVar[LabelRefinement | None] = None
    image_context: ClassVar[ImageContext | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for flag, mode in (("whole_image", "image"), ("cross_window", "cross")):  # the flags before Engine v3
            if flag in vars(cls) and not isinstance(vars(cls)[flag], property):
                if vars(cls)[flag]:
                    warnings.warn(
                        f"{cls.__qualname__}: {flag} = True is now window_mode = {mode!r}",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    cls.window_mode = mode
                delattr(cls, flag)
        for hook in sorted(set(vars(cls)) & set(_NOT_HOOKS)):
            raise ConfigError(
                f"method class {cls.__qualname__}: {hook}() is not a hook of Method (Engine v3): use "
                f"{_NOT_HOOKS[hook]} (see 'Adding a method' in the docs)"
            )
        if "last_block" in vars(cls):
            warnings.warn(
                f"{cls.__qualname__}: last_block() is deprecated; return a BlockChange for the last block from "
                "blocks() (or write features())",
                DeprecationWarning,
                stacklevel=2,
            )

    def __post_init__(self) -> None:
        """Options are checked when the method is built: a ``Literal`` option must be one of its values."""
        for option, choices in _literal_options(type(self)).items():
            value = getattr(self, option)
            if isinstance(value, (str, int, float, bool)) and value not in choices:
                shown = ", ".join(repr(c) for c in choices)
                raise ConfigError(f"{self.name} {option} must be one of {shown}, got {value!r}")

    @property
    def whole_image(self) -> bool:
        """``window_mode == "image"``."""
        return self.window_mode == "image"

    @property
    def cross_window(self) -> bool:
        """``window_mode == "cross"``."""
        return self.window_mode == "cross"

    def blocks(self, vit: Backbone, trace: Trace) -> Mapping[int, BlockChange]:
        """``{block index: its change}`` for a pass on ``trace.grid`` (``vit.depth - 1``: the last block); built once
        per pass, and once eagerly per grid before a compiled forward, so per-grid caches are filled here."""
        return {}

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The tokens entering the last block -> ``(B, gh, gw, E)`` projected patch features (not normalised)."""
        last = vit.depth - 1
        if hasattr(self, "last_block"):  # a method written before Engine v3
            tokens = self.last_block(vit, x, trace)
        else:
            tokens = run_block(vit, last, x, trace.changes.get(last), trace)
        return grid_features(vit, tokens, trace.grid)

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        """``(B, gh, gw, E)`` features and ``(Q, E)`` unit text embeddings -> ``(B, Q, gh, gw)`` float32 logits (the
        cosine similarity; a method may change it, e.g. per-crop text or a CLS-token factor)."""
        return cosine_logits(feats, text)

    def window_multiple(self, vit: Backbone) -> int:
        """Windows are padded to a multiple of this (``padding="symmetric"``): the patch, or what every model of
        the method divides."""
        return window_multiple(vit, self.second_model)

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """For ``window_mode = "image"``: all windows of one image at once -> ``(Q, h, w)`` cosine logits.

        Args:
            windows: the image's windows from the engine's window service
                (:class:`~gclip.inference.windows.ImageWindows`: ``crops``, ``cut`` for per-image maps, ``merge``
                to average per-window outputs over the image), cut from the model input resized to
                :meth:`input_shape` and padded to :meth:`window_multiple`.
            item: the :class:`~gclip.inference.preprocess.Prepared` image (its ``key``, ``size``, and its decoded
                ``original`` pixels when :attr:`needs_original`).
            text: ``(Q, E)`` unit query embeddings.
            stage: ``stage(name)`` times a part as a bench stage.

        Returns:
            The logits at a resolution of the method's choosing (the engine resizes them to the image), or
            ``(logits, context)``: ``context`` reaches the ``label_refinement`` as the image's one
            :class:`WindowContext` (its ``window`` ``None``).
        """
        raise NotImplementedError(f"{self.name} runs through the engine's windows")

    def input_shape(self, shape: tuple[int, int], patch: int, crop: int) -> tuple[int, int]:
        """For ``window_mode = "image"``: the ``(H, W)`` the windows are cut from, for a model input of ``shape`` (the
        bench counts windows and FLOPs on it)."""
        return shape

    def output_grid(self, vit: Backbone, size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of the features of an ``(H, W)`` crop (CLIP's, or the second model's)."""
        if self.second_model is not None:
            return self.second_model.grid(vit, size)
        return int(size[0]) // vit.patch_size, int(size[1]) // vit.patch_size

    def text_queries(self, encoder: Any, classes: Any) -> torch.Tensor:
        """The ``(Q, E)`` query embeddings of a :class:`~gclip.text.ClassList` (one per synonym): its ``text_side``
        piece's, else the encoder's."""
        if self.text_side is not None:
            return self.text_side(encoder, classes)
        return encoder.embed(classes.queries)

    def refine_labels(self, labels: torch.Tensor, windows: Sequence[WindowContext] = ()) -> torch.Tensor:
        """The final ``(H, W)`` label map through the ``label_refinement`` piece (unchanged without one)."""
        return labels if self.label_refinement is None else self.label_refinement(labels, windows)

    def check_resources(self, device: Any, dtype: torch.dtype) -> None:
        """Load (into the per-process cache) or check what the method needs besides CLIP, before any image: the
        second models of its options (``proxy``/``sam`` with their ``*_checkpoint``) and its ``second_model``
        piece. Raises a one-line :class:`~gclip.errors.WeightsError` or :class:`~gclip.errors.ConfigError`."""
        from ..backbones.second_models import load_second_model

        for name in ("proxy", "sam"):
            if getattr(self, name, None) is not None:
                option = f"{name}_checkpoint"
                load_second_model(getattr(self, name), getattr(self, option), device, dtype, option)
        if self.second_model is not None:
            self.second_model.check(device, dtype)

    def options(self) -> dict[str, Any]:
        """The method's settings as plain data (printed with and stored in results)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


def grid_features(vit: Backbone, tokens: torch.Tensor, grid: tuple[int, int], prefix: bool = True) -> torch.Tensor:
    """Tokens out of the last block (``prefix``: with the prefix tokens before the patches) -> ``(B, gh, gw, E)``
    projected patch features."""
    feats = vit.project(vit.patches(tokens) if prefix else tokens)
    return feats.reshape(feats.shape[0], grid[0], grid[1], -1)


def cosine_logits(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(B, gh, gw, E)`` features and ``(Q, E)`` unit text embeddings -> ``(B, Q, gh, gw)`` float32 cosines."""
    feats = F.normalize(feats.float(), dim=-1)
    return torch.einsum("bhwe,qe->bqhw", feats, text.to(feats.device, torch.float32))


@functools.cache
def cls_cosine(cls: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(B, E)`` CLS embeddings and ``(Q, E)`` unit text embeddings -> ``(B, Q)`` float32 cosines (CLIPtrase's CLS
    factor, SegEarth-OV's CLS-token subtraction)."""
    cls = F.normalize(cls.float(), dim=-1)
    return cls @ text.to(cls.device, torch.float32).t()


def _literal_options(cls: type) -> dict[str, tuple[Any, ...]]:
    """``{option: its allowed values}`` for the options of a method class typed with ``Literal`` (alone, or in a
    union whose other members are not of the literals' types, e.g. ``list[int] | Literal["auto"] | None``)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, AttributeError, TypeError):  # annotations that do not resolve: nothing to check
        return {}
    out = {}
    for f in dataclasses.fields(cls):
        members = typing.get_args(hints[f.name]) if typing.get_origin(hints[f.name]) in _UNIONS else (hints[f.name],)
        literals = [a for m in members if typing.get_origin(m) is typing.Literal for a in typing.get_args(m)]
        kinds = {type(a) for a in literals}
        if literals and not any(m in kinds for m in members):
            out[f.name] = tuple(literals)
    return out


_UNIONS = (typing.Union, types.UnionType)


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by its ``name``.

    Raises:
        ConfigError: the class has no name, or another class holds the name (the same class registered again,
            e.g. its module reloaded, replaces it with a warning).
    """
    if not cls.name or not cls.protocol:
        raise ConfigError(f"method class {cls.__qualname__} needs a name and a protocol")
    old = _REGISTRY.get(cls.name)
    if old is not None and old is not cls:
        if (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ConfigError(f"method name {cls.name!r} is taken by {old.__module__}.{old.__qualname__}")
        warnings.warn(f"method {cls.name!r} registered again ({cls.__module__} reloaded)", stacklevel=2)
    _REGISTRY[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(_REGISTRY)


def method_class(name: str) -> type[Method]:
    """The registered class of a method name."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown method {name!r}: choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def methods_with_option(option: str) -> list[str]:
    """The methods that have an option of this name (e.g. ``"proxy"``: those pairing CLIP with a second model)."""
    return [n for n, cls in _REGISTRY.items() if option in {f.name for f in dataclasses.fields(cls)}]


def methods_with_second_models() -> list[str]:
    """The methods that pair CLIP with a second model (they have a ``proxy`` option)."""
    return methods_with_option("proxy")


paired_methods = methods_with_second_models  # its name before Engine v3


def get_method(name: str | Method, **options: Any) -> Method:
    """A method instance by name with options, e.g. ``get_method("gclip", emerging_blocks=[5, 6])``."""
    if isinstance(name, Method):
        if options:
            return dataclasses.replace(name, **options)  # type: ignore[type-var]
        return name
    cls = method_class(name)
    fields = {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    unknown = sorted(set(options) - fields)
    if unknown:
        known = ", ".join(sorted(fields)) or "none"
        raise ConfigError(f"method {name!r} has no option {unknown[0]!r} (its options: {known})")
    return cls(**options)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q kᵀ d^-0.5 + bias) v`` per head with fused attention; inputs ``(B, H, N, d)``."""
    if bias is not None:
        bias = bias.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def attention_map(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ d^-0.5)`` per head, ``(B, H, N, N)``, computed in fp32."""
    scale = q.shape[-1] ** -0.5
    return torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)

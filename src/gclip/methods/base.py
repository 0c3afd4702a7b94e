"""What every method shares: the interface, the per-pass trace, the registry, and attention helpers."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import types
import typing
import warnings
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..inference.windows import ImageWindows

__all__ = [
    "Method",
    "Trace",
    "WindowContext",
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
]

_REGISTRY: dict[str, type[Method]] = {}

SECOND_MODEL_OPTIONS = {
    "proxy": ("NAME", "second model paired with CLIP (gclip models lists them)"),
    "proxy_checkpoint": ("PATH", "local weights file of --proxy"),
    "sam_checkpoint": ("PATH", "SAM's weights file"),
    "masks": ("FOLDER", "pre-generated instance masks, <image stem>.npz"),
    "mask_generator": ("NAME", "SAM model making instance masks"),
}
"""The options through which a method declares what it needs besides CLIP, with a metavar and a help text: a
method that has one as a field gets it from the command line (``--proxy``, ...), checked by
:meth:`Method.check_resources`."""


@dataclasses.dataclass(frozen=True)
class WindowContext:
    """One window of an image with what :meth:`Method.label_context` kept of its pass.

    Attributes:
        window: the :class:`~gclip.inference.windows.Window` (its box, padding, upsampled size, kept part, canvas
        target).
        canvas: ``(H, W)`` of the canvas the windows are merged on (the label map's size in the whole-image mode).
        context: the window's own slice of the context tensor.
    """

    window: Any
    canvas: tuple[int, int]
    context: torch.Tensor


@dataclasses.dataclass
class Trace:
    """What one forward pass of a batch of crops carries from the encoder to the head.

    Attributes:
        grid: ``(rows, cols)`` of patches.
        inputs: ``{block index: its input tokens}`` for the blocks in :meth:`Method.keep_blocks`.
        overrides: per block, the parameters :meth:`Method.overrides` replaces.
        extras: anything a method collects on the way (attention maps, features of other blocks ...).
        images: the ``(B, 3, H, W)`` normalised crops of the pass (for methods that look at pixels again).
    """

    grid: tuple[int, int]
    inputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    overrides: dict[int, dict[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    images: torch.Tensor | None = None


class Method:
    """A training-free dense-prediction method. Subclasses are dataclasses whose fields are its options.

    A forward pass of a batch of crops is :meth:`encode` (blocks ``0..L-2``, each through :meth:`block`) and
    :meth:`head` (:meth:`last_block`, the projection, the cosine logits, then :meth:`refine`). A method
    overrides what it changes:

    - :meth:`last_block` (required): the last block's tokens;
    - :meth:`block`: any intermediate block (replace its attention, drop its residual or FFN with
      :meth:`Backbone.block`, edit tokens before or after it, collect into ``trace.extras``);
    - :meth:`keep_blocks` / :meth:`overrides`: keep blocks' inputs; replace FFN parameters functionally;
    - :meth:`head`: the whole last stage (several passes through the last block, multi-level features);
    - :meth:`refine`: a step on a window's patch logits (it sees the features and the text);
    - :meth:`text_queries` / :meth:`refine_labels`: the text embeddings; a step on the final label map, which
      sees what :meth:`label_context` kept of each window's pass.

    Before a compiled forward the engine calls :meth:`warm`, which must fill every per-backbone and per-grid
    cache the method keeps.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    protocol: ClassVar[str] = ""
    table_row: ClassVar[tuple[str, str, str]] = ("", "", "")
    """The method in the docs' table (markdown): what it changes, its attention per head, the last block's residual
    and FFN (``gclip models --markdown``)."""
    """The evaluation protocol its authors use: a TOML file of ``gclip/evaluation/presets/`` (``gclip eval``)."""
    whole_image: ClassVar[bool] = False
    """The method sees all windows of an image together (:meth:`image_logits`) instead of the engine's batches of
    windows from any image."""
    cross_window: ClassVar[bool] = False
    """The method's window passes need every window of an image at once (e.g. keys and values extended by the other
    windows', labels propagated across windows): the engine gives it one pass per image, all its windows in it,
    whatever the batch size, with the windows in ``trace.extras["windows"]``."""
    needs_original: ClassVar[bool] = False
    """The method also reads the decoded pixels (``Prepared.original``), e.g. for a second model's own resize."""

    def __post_init__(self) -> None:
        """Options are checked when the method is built: a ``Literal`` option must be one of its values."""
        for option, choices in _literal_options(type(self)).items():
            value = getattr(self, option)
            if isinstance(value, (str, int, float, bool)) and value not in choices:
                shown = ", ".join(repr(c) for c in choices)
                raise ConfigError(f"{self.name} {option} must be one of {shown}, got {value!r}")

    @property
    def pos_rule(self) -> str:
        """How the position embedding is resampled to a crop's grid
        (:func:`gclip.backbones.openclip.resample_pos_embed`)."""
        return "sclip"

    def keep_blocks(self, vit: Backbone) -> set[int]:
        """Blocks whose input tokens the head needs (``trace.inputs``)."""
        return set()

    def overrides(self, vit: Backbone) -> dict[int, dict[str, torch.Tensor]]:
        """Per block, parameters to use instead of the model's during the walk (never written to the model)."""
        return {}

    def warm(self, vit: Backbone, grid: tuple[int, int]) -> None:
        """Compute eagerly what the method caches per backbone and per patch grid, so that ``torch.compile``
        traces cache hits only (a traced cache miss breaks the graph or forces a recompilation)."""
        self.keep_blocks(vit)
        self.overrides(vit)

    def encode(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """Blocks ``0..L-2`` on the embedded tokens ``x`` -> the tokens entering the last block."""
        keep = self.keep_blocks(vit)
        trace.overrides = self.overrides(vit)
        for i in range(vit.depth - 1):
            if i in keep:
                trace.inputs[i] = x
            x = self.block(vit, i, x, trace)
        return x

    def block(self, vit: Backbone, index: int, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """Intermediate block ``index`` (``0..L-2``); by default unchanged but for :meth:`overrides`."""
        return vit.block(index, x, overrides=trace.overrides.get(index))

    def last_block(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """``(B, 1+N, D)`` tokens entering the last block -> ``(B, 1+N, D)`` tokens."""
        raise NotImplementedError

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """The tokens entering the last block -> ``(B, gh, gw, E)`` projected patch features (not normalised)."""
        tokens = self.last_block(vit, x, trace)
        feats = vit.project(vit.patches(tokens))
        return feats.reshape(feats.shape[0], trace.grid[0], trace.grid[1], -1)

    def head(self, vit: Backbone, x: torch.Tensor, trace: Trace, text: torch.Tensor | None) -> torch.Tensor:
        """The last stage: :meth:`features`, then with ``text`` ``(Q, E)`` unit vectors the cosine logits,
        then :meth:`refine`.

        Returns:
            ``(B, gh, gw, E)`` float32 features without ``text``, else ``(B, Q, gh, gw)`` float32 logits.
        """
        feats = self.features(vit, x, trace).float()
        if text is None:
            return feats
        logits = cosine_logits(feats, text)
        return self.refine(vit, logits, feats, text, trace)

    def refine(
        self, vit: Backbone, logits: torch.Tensor, feats: torch.Tensor, text: torch.Tensor, trace: Trace
    ) -> torch.Tensor:
        """A step on a window's ``(B, Q, gh, gw)`` cosine logits (``feats``: the ``(B, gh, gw, E)`` features)."""
        return logits

    def text_queries(self, encoder: Any, classes: Any) -> torch.Tensor:
        """The ``(Q, E)`` query embeddings of a :class:`~gclip.text.ClassList` (one per synonym) with a
        :class:`~gclip.text.TextEncoder`; a method may change them (e.g. mix in descriptions)."""
        return encoder.embed(classes.queries)

    def second_pass(self, vit: Backbone, trace: Trace) -> None:
        """The method's second model on the pass's crops (``trace.images``), its results kept in ``trace.extras``;
        run once, before :meth:`head` (the engine times it as its own stage). Nothing for CLIP-only methods."""

    def image_context(self, vit: Backbone, image: torch.Tensor) -> torch.Tensor | None:
        """Something computed once per image from its whole normalised model input ``(1, 3, H, W)`` (e.g. CASS's
        global CLS embedding), stacked for the windows of a pass as ``trace.extras["image_context"]``; ``None``
        (the default): nothing, and the engine does not call it again for the image."""
        return None

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        """For :attr:`whole_image` methods: all windows of one image at once -> ``(Q, h, w)`` cosine logits.

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
            ``(logits, context)``: ``context`` reaches :meth:`refine_labels` as the image's one
            :class:`WindowContext` (its ``window`` ``None``).
        """
        raise NotImplementedError(f"{self.name} runs through the engine's windows")

    def input_shape(self, shape: tuple[int, int], patch: int, crop: int) -> tuple[int, int]:
        """The ``(H, W)`` the windows are cut from, for a model input of ``shape`` (a :attr:`whole_image` method may
        resize it first; the bench counts windows and FLOPs on it)."""
        return shape

    def window_multiple(self, vit: Backbone) -> int:
        """Windows are padded to a multiple of this (``padding="symmetric"``): the patch, or what every model of
        the method divides."""
        return vit.patch_size

    def output_grid(self, vit: Backbone, size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of the features of an ``(H, W)`` crop (CLIP's; a method with a second model: its own)."""
        return int(size[0]) // vit.patch_size, int(size[1]) // vit.patch_size

    def label_context(self, trace: Trace) -> torch.Tensor | None:
        """Per crop, ``(B, ...)`` tensors that :meth:`refine_labels` needs from the pass (computed inside the
        forward, so also under ``torch.compile``); ``None``: nothing."""
        return None

    def refine_labels(self, labels: torch.Tensor, windows: Sequence[WindowContext] = ()) -> torch.Tensor:
        """A step on an image's final ``(H, W)`` label map (after thresholds), e.g. a morphological filter.

        ``windows``: the image's windows with their :meth:`label_context` (empty when the method keeps none)."""
        return labels

    def check_resources(self, device: Any, dtype: torch.dtype) -> None:
        """Load (into the per-process cache) or check what the method needs besides CLIP, before any image: its
        second models (options ``proxy``/``sam`` with their ``*_checkpoint``). Raises a one-line
        :class:`~gclip.errors.WeightsError` or :class:`~gclip.errors.ConfigError`."""
        from ..backbones.second_models import load_second_model

        for name in ("proxy", "sam"):
            if getattr(self, name, None) is not None:
                option = f"{name}_checkpoint"
                load_second_model(getattr(self, name), getattr(self, option), device, dtype, option)

    def options(self) -> dict[str, Any]:
        """The method's settings as plain data (printed with and stored in results)."""
        if not dataclasses.is_dataclass(self):
            return {}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}


def cosine_logits(feats: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """``(B, gh, gw, E)`` features and ``(Q, E)`` unit text embeddings -> ``(B, Q, gh, gw)`` float32 cosines."""
    feats = F.normalize(feats.float(), dim=-1)
    return torch.einsum("bhwe,qe->bqhw", feats, text.to(feats.device, torch.float32))


@functools.cache
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

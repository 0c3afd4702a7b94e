"""The small pieces a method is composed of.

A per-crop method writes one function, :meth:`~gclip.methods.Method.features` (by default: the blocks, as its
:class:`BlockChange` pieces change them, then the projection), and says what else it changes by naming pieces:

- :class:`BlockChange` (from :meth:`~gclip.methods.Method.blocks`): the attention of a block, whether its residual
  and FFN stay, parameters used instead of the model's, its input kept for later, and the tokens entering it read
  or replaced (the tokens between blocks);
- :class:`SecondModelPass` (``second_model``): a second model on each pass's crops (DINO for ProxyCLIP and CASS),
  with the window padding and the output grid it implies;
- :class:`TextSide` (``text_side``): the text embeddings (ITACLIP's descriptions);
- :class:`LabelRefinement` (``label_refinement``): a step on the final label map, with what it keeps of each
  window's pass (CLIPtrase's clusters, ITACLIP's closing, CorrCLIP's map correction);
- :class:`ImageContext` (``image_context``): something computed once per image from its whole model input
  (CASS's global CLS embedding).

The engine asks for each piece and skips what is ``None``; the method module builds its pieces from its options.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..backbones.base import Attention, Backbone

__all__ = [
    "Trace",
    "WindowContext",
    "BlockChange",
    "ImageContext",
    "LabelRefinement",
    "SecondModelPass",
    "TextSide",
    "run_block",
]


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
    """What one forward pass of a batch of crops carries from the encoder to the features.

    Attributes:
        grid: ``(rows, cols)`` of patches.
        inputs: ``{block index: its input tokens}`` for the blocks whose :class:`BlockChange` keeps them.
        changes: the pass's :class:`BlockChange` per block (:meth:`Method.blocks`).
        extras: anything a method collects on the way (attention maps, features of other blocks ...).
        images: the ``(B, 3, H, W)`` normalised crops of the pass (for methods that look at pixels again).
        text: the ``(Q, E)`` unit query embeddings when the pass computes logits (``None`` for features alone).
    """

    grid: tuple[int, int]
    inputs: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    changes: Mapping[int, BlockChange] = dataclasses.field(default_factory=dict)
    extras: dict[str, Any] = dataclasses.field(default_factory=dict)
    images: torch.Tensor | None = None
    text: torch.Tensor | None = None


@dataclasses.dataclass(frozen=True)
class BlockChange:
    """What a method changes in one block (a block without one runs unchanged).

    Attributes:
        attention: ``(q, k, v) -> heads`` replacing the block's ``softmax(q kᵀ s) v``; ``None``: the block's own.
        residual: add the attention output to the block's input (``False``: the ClearCLIP form).
        ffn: run the FFN branch.
        weights: parameters used instead of the model's for this block, never written to it
            (``{"ffn_out_weight": w}``: GCLIP's Channel Suppression).
        keep: keep the block's input tokens in ``trace.inputs[index]`` (for a later block's attention).
        before: the tokens entering the block -> ``None`` (only read, e.g. collected into ``trace.extras``) or the
            tokens to use instead (e.g. extra image views appended to the batch).
    """

    attention: Attention | None = None
    residual: bool = True
    ffn: bool = True
    weights: Mapping[str, torch.Tensor] | None = None
    keep: bool = False
    before: Callable[[torch.Tensor], torch.Tensor | None] | None = None


def run_block(vit: Backbone, index: int, x: torch.Tensor, change: BlockChange | None, trace: Trace) -> torch.Tensor:
    """Block ``index`` of ``vit`` on tokens ``x`` with a method's :class:`BlockChange` (``None``: unchanged)."""
    if change is None:
        return vit.block(index, x)
    if change.before is not None:
        replaced = change.before(x)
        x = x if replaced is None else replaced
    if change.keep:
        trace.inputs[index] = x
    return vit.block(
        index, x, attention=change.attention, residual=change.residual, ffn=change.ffn, overrides=change.weights
    )


class SecondModelPass:
    """A second model run on every pass's crops (``trace.images``) before the method's features, its results kept in
    ``trace.extras``; the engine times it as the ``second_model`` stage and loads its weights before any image
    (:meth:`check`)."""

    def __call__(self, vit: Backbone, trace: Trace) -> None:
        raise NotImplementedError

    def multiple(self, vit: Backbone) -> int:
        """Windows are padded to a multiple of this so that the second model too sees whole patches."""
        return vit.patch_size

    def grid(self, vit: Backbone, size: tuple[int, int]) -> tuple[int, int]:
        """The patch grid of the method's features for an ``(H, W)`` crop (CLIP's unless the features are on the
        second model's grid)."""
        return int(size[0]) // vit.patch_size, int(size[1]) // vit.patch_size

    def warm(self, vit: Backbone, grid: tuple[int, int]) -> None:
        """Fill the second model's per-grid caches eagerly (before a compiled forward traces them)."""

    def check(self, device: Any, dtype: torch.dtype) -> None:
        """Load (into the per-process cache) or check its weights; a one-line error if they cannot be had."""


class TextSide:
    """The ``(Q, E)`` query embeddings of a :class:`~gclip.text.ClassList` with a :class:`~gclip.text.TextEncoder`
    (the default, without a text side: ``encoder.embed(classes.queries)``)."""

    def __call__(self, encoder: Any, classes: Any) -> torch.Tensor:
        raise NotImplementedError


class LabelRefinement:
    """A step on an image's final ``(H, W)`` label map (after the thresholds)."""

    def context(self, trace: Trace) -> torch.Tensor | None:
        """Per crop, ``(B, ...)`` tensors the step needs from the pass (computed inside the forward, so also under
        ``torch.compile``); ``None``: nothing."""
        return None

    def __call__(self, labels: torch.Tensor, windows: Sequence[WindowContext] = ()) -> torch.Tensor:
        """``windows``: the image's windows with their :meth:`context` (empty when it keeps none)."""
        raise NotImplementedError


class ImageContext:
    """Something computed once per image from its whole normalised model input ``(1, 3, H, W)``, stacked for the
    windows of a pass as ``trace.extras["image_context"]``."""

    def __call__(self, vit: Backbone, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def window_multiple(vit: Backbone, second: SecondModelPass | None) -> int:
    """The patch, or the least multiple of the patch and what the second model needs."""
    return vit.patch_size if second is None else math.lcm(vit.patch_size, second.multiple(vit))

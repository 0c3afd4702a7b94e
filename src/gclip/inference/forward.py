"""Dense features and logits for a batch of crops: embed -> blocks 0..L-2 -> the method's features -> logits.

The work is split in stages that the benchmark times separately: :func:`encode` (the image encoder: patch
embedding and blocks ``0..L-2``, each as the method's :class:`~gclip.methods.BlockChange` for it says),
:func:`second_model` (the method's second model on the crops, if it has one) and :func:`head` (the method's
:meth:`~gclip.methods.Method.features` and :meth:`~gclip.methods.Method.logits`).
On a GPU with a half-precision model both halves run under ``torch.autocast`` so that the few fp32
operations of the methods also use the tensor cores.
"""

from __future__ import annotations

import contextlib

import torch

from ..backbones.base import Backbone
from ..methods import Method, Trace
from ..methods.pieces import run_block

__all__ = [
    "dense_features",
    "dense_logits",
    "encode",
    "second_model",
    "head",
    "image_context",
    "label_context",
    "autocast_for",
    "end_pass",
    "warm",
]

Encoded = tuple[torch.Tensor, Trace]
"""The tokens entering the last block, and the pass's :class:`~gclip.methods.Trace`."""


def autocast_for(vit: Backbone) -> contextlib.AbstractContextManager:
    """``torch.autocast`` in the model's dtype on CUDA for fp16/bf16 models; a no-op otherwise."""
    if vit.device.type == "cuda" and vit.dtype in (torch.float16, torch.bfloat16):
        return torch.autocast(device_type="cuda", dtype=vit.dtype)
    return contextlib.nullcontext()


@torch.no_grad()
def encode(
    vit: Backbone,
    method: Method,
    crops: torch.Tensor,
    context: torch.Tensor | None = None,
    windows: list | None = None,
    extras: dict | None = None,
) -> Encoded:
    """The image encoder: ``(B, 3, H, W)`` normalised crops -> (tokens entering the last block, trace).

    ``context``: the crops' images' :func:`image_context`, stacked (``trace.extras["image_context"]``);
    ``windows``: for a ``window_mode = "cross"`` method, the crops' windows, all of one image
    (:class:`~gclip.inference.windows.Window`, ``trace.extras["windows"]``); ``extras``: anything else the method's
    block changes read from ``trace.extras`` (e.g. CorrCLIP's regions)."""
    with autocast_for(vit):
        x, grid = vit.embed(crops, method.pos_rule)
        trace = Trace(grid, images=crops, extras=dict(extras or {}))
        if context is not None:
            trace.extras["image_context"] = context
        if windows is not None:
            trace.extras["windows"] = windows
        trace.changes = method.blocks(vit, trace)
        for i in range(vit.depth - 1):
            x = run_block(vit, i, x, trace.changes.get(i), trace)
    return x, trace


def warm(vit: Backbone, method: Method, grid: tuple[int, int]) -> None:
    """Fill the per-grid caches of a pass eagerly (the position embedding, the method's :meth:`~gclip.methods.Method.
    blocks`, its second model's), so that ``torch.compile`` traces cache hits only."""
    vit.pos_embed(grid, method.pos_rule)
    method.blocks(vit, Trace(grid))
    if method.second_model is not None:
        method.second_model.warm(vit, grid)


@torch.no_grad()
def image_context(vit: Backbone, method: Method, image: torch.Tensor) -> torch.Tensor | None:
    """The method's ``image_context`` piece on one ``(1, 3, H, W)`` whole model input (``None`` without one)."""
    if method.image_context is None:
        return None
    with autocast_for(vit):
        return method.image_context(vit, image)


def label_context(method: Method, trace: Trace) -> torch.Tensor | None:
    """What the method's ``label_refinement`` piece keeps of a pass (``None`` without one)."""
    return None if method.label_refinement is None else method.label_refinement.context(trace)


@torch.no_grad()
def head(vit: Backbone, method: Method, encoded: Encoded, text: torch.Tensor | None = None) -> torch.Tensor:
    """The method's :meth:`~gclip.methods.Method.features`; with ``text`` ``(Q, E)`` unit vectors, its
    :meth:`~gclip.methods.Method.logits`.

    Returns:
        ``(B, gh, gw, E)`` float32 features (not normalised), or ``(B, Q, gh, gw)`` float32 logits.
    """
    x, trace = second_model(vit, method, encoded)
    trace.text = text
    try:
        with autocast_for(vit):
            feats = method.features(vit, x, trace).float()
            return feats if text is None else method.logits(vit, feats, text, trace).float()
    finally:
        end_pass(trace)


def end_pass(trace: Trace) -> None:
    """Drop the pass's block changes: their closures hold the trace, so until then the trace and its tensors
    (kept block inputs, crops) form a reference cycle that only the cyclic garbage collector would free."""
    trace.changes = {}


@torch.no_grad()
def second_model(vit: Backbone, method: Method, encoded: Encoded) -> Encoded:
    """The method's ``second_model`` piece (e.g. ProxyCLIP's DINO) on the pass's crops, once per pass."""
    _, trace = encoded
    if method.second_model is not None and not trace.extras.get("_second_pass_done"):
        with autocast_for(vit):
            method.second_model(vit, trace)
        trace.extras["_second_pass_done"] = True
    return encoded


@torch.no_grad()
def dense_features(vit: Backbone, method: Method, crops: torch.Tensor) -> torch.Tensor:
    """Projected patch features.

    Args:
        vit: the backbone view.
        method: the last-block variant.
        crops: ``(B, 3, H, W)`` normalised images; pixels past the last whole patch are ignored.

    Returns:
        ``(B, H // p, W // p, E)`` float32 features (not normalised).
    """
    return head(vit, method, encode(vit, method, crops))


@torch.no_grad()
def dense_logits(vit: Backbone, method: Method, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every query embedding.

    Args:
        text: ``(Q, E)`` unit query embeddings.

    Returns:
        ``(B, Q, H // p, W // p)`` float32 logits (before any logit scale).
    """
    return head(vit, method, encode(vit, method, crops), text)

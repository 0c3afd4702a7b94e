"""Dense features and logits for a batch of crops: embed -> blocks 0..L-2 -> method's last block -> proj.

The work is split in two halves that the benchmark times separately: :func:`encode` (the image encoder:
patch embedding and blocks ``0..L-2``, through the method's :meth:`~gclip.methods.Method.block`) and
:func:`head` (the method's last block, the projection, the cosine logits and the method's refinement).
On a GPU with a half-precision model both halves run under ``torch.autocast`` so that the few fp32
operations of the methods also use the tensor cores.
"""

from __future__ import annotations

import contextlib

import torch

from ..backbones.base import Backbone
from ..methods import Method, Trace

__all__ = ["dense_features", "dense_logits", "encode", "second_model", "head", "image_context", "autocast_for"]

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
) -> Encoded:
    """The image encoder: ``(B, 3, H, W)`` normalised crops -> (tokens entering the last block, trace).

    ``context``: the crops' images' :func:`image_context`, stacked (``trace.extras["image_context"]``);
    ``windows``: for a :attr:`~gclip.methods.Method.cross_window` method, the crops' windows, all of one image
    (:class:`~gclip.inference.windows.Window`, ``trace.extras["windows"]``)."""
    with autocast_for(vit):
        x, grid = vit.embed(crops, method.pos_rule)
        trace = Trace(grid, images=crops)
        if context is not None:
            trace.extras["image_context"] = context
        if windows is not None:
            trace.extras["windows"] = windows
        x = method.encode(vit, x, trace)
    return x, trace


@torch.no_grad()
def image_context(vit: Backbone, method: Method, image: torch.Tensor) -> torch.Tensor | None:
    """The method's :meth:`~gclip.methods.Method.image_context` of one ``(1, 3, H, W)`` whole model input."""
    with autocast_for(vit):
        return method.image_context(vit, image)


@torch.no_grad()
def head(vit: Backbone, method: Method, encoded: Encoded, text: torch.Tensor | None = None) -> torch.Tensor:
    """The method's last stage; with ``text`` ``(Q, E)`` unit vectors, the cosine logits (after its refinement).

    Returns:
        ``(B, gh, gw, E)`` float32 features (not normalised), or ``(B, Q, gh, gw)`` float32 logits.
    """
    x, trace = second_model(vit, method, encoded)
    with autocast_for(vit):
        return method.head(vit, x, trace, text).float()


@torch.no_grad()
def second_model(vit: Backbone, method: Method, encoded: Encoded) -> Encoded:
    """The method's :meth:`~gclip.methods.Method.second_pass` (e.g. ProxyCLIP's DINO), once per pass."""
    _, trace = encoded
    if not trace.extras.get("_second_pass_done"):
        with autocast_for(vit):
            method.second_pass(vit, trace)
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

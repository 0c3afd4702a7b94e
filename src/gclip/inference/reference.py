"""The peers' evaluation loop, written plainly: the yardstick for the engine's speed and its outputs.

One window at a time (batch 1); each window's logits are upsampled to the crop, zero-padded to the whole
canvas and added to it; the averaged canvas is resized to the original size for every class at once, then
softmax, synonym max, thresholds and argmax. GCLIP runs with its plain formulation (every attention map
materialised). Nothing here is tuned: the engine (``Segmenter.infer``) must give the same labels, faster
and in less memory.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import ImageInput
from ..methods import Method, WindowContext
from .forward import encode, head, image_context
from .postprocess import pamr
from .segmenter import Prepared, Segmenter
from .windows import plan_windows

__all__ = ["reference_method", "reference_merged_logits", "reference_labels"]


def reference_method(method: Method) -> Method:
    """The method in its plain formulation (for GCLIP: explicit attention maps instead of fused attention)."""
    names = {f.name for f in dataclasses.fields(method)} if dataclasses.is_dataclass(method) else set()
    return dataclasses.replace(method, _impl="maps") if "_impl" in names else method  # type: ignore[type-var]


@torch.no_grad()
def reference_merged_logits(segmenter: Segmenter, prepared: Prepared) -> torch.Tensor:
    """Window-averaged ``(Q, h, w)`` logits of one prepared image, one window per forward pass (at the original
    size in the whole-image mode)."""
    return _reference_pass(segmenter, prepared)[0]


def _reference_pass(segmenter: Segmenter, prepared: Prepared) -> tuple[torch.Tensor, list[WindowContext]]:
    s = segmenter.settings
    if segmenter.method.whole_image:  # the method runs the whole image itself: it is its own reference
        return segmenter.image_logits(prepared)
    vit, method = segmenter.vit, reference_method(segmenter.method)
    queries = segmenter._require_classes()
    image = prepared.image[None].to(segmenter.device)
    multiple = method.window_multiple(vit)
    size, windows = plan_windows(tuple(image.shape[-2:]), prepared.size, s.crop, s.stride, s.padding, multiple)
    h, w = size
    preds = torch.zeros((1, queries.shape[0], h, w), device=segmenter.device)
    count = torch.zeros((1, 1, h, w), device=segmenter.device)
    contexts: list[WindowContext] = []
    whole = image_context(vit, method, image)
    for win in windows:
        y1, y2, x1, x2 = win.box
        encoded = encode(vit, method, F.pad(image[:, :, y1:y2, x1:x2], win.pads), whole)
        logits = head(vit, method, encoded, queries)
        context = method.label_context(encoded[1])
        if context is not None:
            contexts.append(WindowContext(win, size, context[0]))
        top, ch, left, cw = win.keep
        logits = F.interpolate(logits, size=win.out_size, mode="bilinear")[:, :, top : top + ch, left : left + cw]
        y1, y2, x1, x2 = win.target
        preds += F.pad(logits, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return (preds / count)[0], contexts


@torch.no_grad()
def reference_labels(segmenter: Segmenter, image: ImageInput) -> np.ndarray:
    """``(H, W)`` int32 labels of one image, computed the plain way with the segmenter's settings."""
    s = segmenter.settings
    prepared = segmenter.prepare(image)
    merged, contexts = _reference_pass(segmenter, prepared)
    logits = merged[None]
    logits = F.interpolate(logits, size=prepared.size, mode="bilinear")
    if s.pamr_steps > 0:
        small = F.interpolate(prepared.image[None].to(segmenter.device), size=prepared.size, mode="bilinear")
        logits = pamr(small, logits, s.pamr_steps, s.pamr_dilations)
    probs = torch.softmax(logits[0] * s.logit_scale, dim=0)
    q2c = segmenter.classes.query_to_class  # type: ignore[union-attr]
    n_classes = max(q2c) + 1
    class_probs = torch.stack(
        [probs[[q for q, c in enumerate(q2c) if c == k]].max(dim=0).values for k in range(n_classes)]
    )
    if s.area_thd and n_classes > 1:
        counts = torch.bincount(class_probs.argmax(0).flatten(), minlength=n_classes).float()
        keep = torch.ones(n_classes, device=counts.device)
        keep[1:] = (counts[1:] > s.area_thd * counts[1:].sum()).float()
        class_probs = class_probs * keep[:, None, None]
    top, labels = class_probs.max(0)
    if s.prob_thd > 0:
        labels[top < s.prob_thd] = 0
    return segmenter.method.refine_labels(labels, contexts).to(torch.int32).cpu().numpy()

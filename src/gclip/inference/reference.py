"""The peers' evaluation loop, written plainly: the yardstick for the engine's speed and its outputs.

One window at a time (batch 1); each window's logits are upsampled to the crop, zero-padded to the whole
canvas and added to it; the averaged canvas is resized to the original size for every class at once, then
softmax, synonym max, thresholds and argmax. GCLIP runs with its plain formulation (every attention map
materialised). Nothing here is tuned: the engine (``Segmenter.infer``) must give the same labels, faster
and in less memory.
"""

from __future__ import annotations

import contextlib
import dataclasses

import numpy as np
import torch
import torch.nn.functional as F

from ..io.images import ImageInput
from ..methods import Method, WindowContext
from .forward import encode, head, image_context, label_context
from .postprocess import UNLABELED, pamr, refine_labels
from .segmenter import Prepared, Segmenter
from .windows import ImageWindows, plan_windows

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


class PlainWindows(ImageWindows):
    """The windows of one image cut, padded and merged the plain way, one window at a time (mmseg's
    ``slide_inference`` loop; the merge pads every window's output to the whole canvas and adds it): the yardstick
    of :func:`gclip.inference.windows.tile` for the methods that see all windows of an image together (cutting a
    per-image map, ``cut``, is the windows' own)."""

    def __init__(self, image: torch.Tensor, crop: int, stride: int, multiple: int) -> None:
        h, w = int(image.shape[-2]), int(image.shape[-1])
        boxes = []
        if crop <= 0:
            boxes.append((0, h, 0, w))
        else:
            for row in range(max(h - crop + stride - 1, 0) // stride + 1):
                for col in range(max(w - crop + stride - 1, 0) // stride + 1):
                    y2, x2 = min(row * stride + crop, h), min(col * stride + crop, w)
                    boxes.append((max(y2 - crop, 0), y2, max(x2 - crop, 0), x2))
        pads = []
        for y1, y2, x1, x2 in boxes:
            ph, pw = -(y2 - y1) % multiple, -(x2 - x1) % multiple
            pads.append((pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        crops = torch.cat([F.pad(image[:, :, y1:y2, x1:x2], pad) for (y1, y2, x1, x2), pad in zip(boxes, pads)])
        super().__init__(image, crop, stride, boxes, pads, crops)

    def merge(self, outputs: torch.Tensor) -> torch.Tensor:
        scale = outputs.shape[-1] / self.crops.shape[-1]
        h, w = int(self.size[0] * scale), int(self.size[1] * scale)
        total = outputs.new_zeros((1, outputs.shape[1], h, w))
        count = outputs.new_zeros((1, 1, h, w))
        for (y1, y2, x1, x2), (left, _, top, _), window in zip(self.boxes, self.pads, outputs):
            y1, y2, x1, x2, left, top = (int(v * scale) for v in (y1, y2, x1, x2, left, top))
            kept = window[None, :, top : top + y2 - y1, left : left + x2 - x1]
            total += F.pad(kept, (x1, w - x2, y1, h - y2))
            count += F.pad(torch.ones_like(kept[:, :1]), (x1, w - x2, y1, h - y2))
        return (total / count)[0]


def _reference_pass(segmenter: Segmenter, prepared: Prepared) -> tuple[torch.Tensor, list[WindowContext]]:
    s = segmenter.settings
    if segmenter.method.whole_image:
        return _reference_image_pass(segmenter, prepared)
    vit, method = segmenter.vit, reference_method(segmenter.method)
    queries = segmenter.query_embeddings()
    image = prepared.image[None].to(segmenter.device)
    multiple = method.window_multiple(vit)
    size, windows = plan_windows(tuple(image.shape[-2:]), prepared.size, s.crop, s.stride, s.padding, multiple)
    h, w = size
    preds = torch.zeros((1, queries.shape[0], h, w), device=segmenter.device)
    count = torch.zeros((1, 1, h, w), device=segmenter.device)
    contexts: list[WindowContext] = []
    whole = image_context(vit, method, image)

    def passes():  # (window, its logits, its label context): one pass a window, or one for all (cross-window)
        crops = [F.pad(image[:, :, win.box[0] : win.box[1], win.box[2] : win.box[3]], win.pads) for win in windows]
        if not method.cross_window:
            for win, crop in zip(windows, crops):
                encoded = encode(vit, method, crop, whole)
                context = label_context(method, encoded[1])
                yield win, head(vit, method, encoded, queries), None if context is None else context[0]
            return
        stacked = None if whole is None else torch.cat([whole] * len(windows))
        encoded = encode(vit, method, torch.cat(crops), stacked, list(windows))
        logits, context = head(vit, method, encoded, queries), label_context(method, encoded[1])
        for k, win in enumerate(windows):
            yield win, logits[k : k + 1], None if context is None else context[k]

    for win, logits, context in passes():
        if context is not None:
            contexts.append(WindowContext(win, size, context))
        top, ch, left, cw = win.keep
        logits = F.interpolate(logits, size=win.out_size, mode="bilinear")[:, :, top : top + ch, left : left + cw]
        y1, y2, x1, x2 = win.target
        preds += F.pad(logits, (x1, w - x2, y1, h - y2))
        count[:, :, y1:y2, x1:x2] += 1
    return (preds / count)[0], contexts


def _reference_image_pass(segmenter: Segmenter, prepared: Prepared) -> tuple[torch.Tensor, list[WindowContext]]:
    """A whole-image method's logits on :class:`PlainWindows` (the engine cuts its windows with
    :func:`~gclip.inference.windows.tile`)."""
    s, vit, method = segmenter.settings, segmenter.vit, segmenter.method
    image = prepared.image[None].to(segmenter.device)
    shape = method.input_shape(tuple(image.shape[-2:]), vit.patch_size, s.crop)
    if shape != tuple(image.shape[-2:]):
        image = F.interpolate(image, shape, mode="bilinear", align_corners=False)
    windows = PlainWindows(image, s.crop, s.stride, method.window_multiple(vit))
    out = method.image_logits(vit, windows, prepared, segmenter.query_embeddings(), lambda _: contextlib.nullcontext())
    if not isinstance(out, tuple):
        return out, []
    return out[0], [WindowContext(None, tuple(prepared.size), out[1])]


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
    first = 1 if segmenter.classes.background else 0  # type: ignore[union-attr]  # class 0 is the background
    if s.area_thd and n_classes > 1:
        counts = torch.bincount(class_probs.argmax(0).flatten(), minlength=n_classes).float()
        keep = torch.ones(n_classes, device=counts.device)
        keep[first:] = (counts[first:] > s.area_thd * counts[first:].sum()).float()
        if not keep.any():  # every class under the threshold (no background): keep the largest
            keep[counts.argmax()] = 1
        class_probs = class_probs * keep[:, None, None]
    top, labels = class_probs.max(0)
    if s.prob_thd > 0:
        labels[top < s.prob_thd] = 0 if first else UNLABELED
    return refine_labels(segmenter.method, labels, contexts, n_classes).to(torch.int32).cpu().numpy()

"""ITACLIP (m-arda-aydn/ITACLIP): image, text and architecture engineering on CLIP.

Architecture: blocks ``0..L-2`` unchanged; the last block attends with the mean of its own ``softmax(q qᵀ s) +
softmax(k kᵀ s)`` and that of three intermediate blocks, keeps the residual and drops the FFN. Image
engineering: each window is also seen in grey, blurred and flipped (all views share forward passes); the
logits of the window, grey and blurred views are averaged and blended with the flipped views' logits
(flipped back). Text: with a file of LLM-generated definitions or synonyms (the authors publish theirs),
each class's embedding is blended with its description's. The final label map is closed with a 3x3 square.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from ._purify import scaled_index
from .base import BlockChange, Method, Trace, WindowContext, attend, cosine_logits, register
from .pieces import LabelRefinement, TextSide

GREY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale


def grey_view(images: torch.Tensor) -> torch.Tensor:
    """``(B, 3, H, W)`` -> the luminance (ITU-R 601 weights) in all three channels, as torchvision's ``Grayscale``."""
    lum = GREY[0] * images[:, 0] + GREY[1] * images[:, 1] + GREY[2] * images[:, 2]
    return lum[:, None].expand(-1, 3, -1, -1)


def blur_view(images: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding, as torchvision's ``GaussianBlur(size, sigma)``."""
    half = (size - 1) * 0.5
    x = torch.linspace(-half, half, steps=size, dtype=images.dtype, device=images.device)
    pdf = torch.exp(-0.5 * (x / sigma).pow(2))
    k1 = pdf / pdf.sum()
    kernel = torch.mm(k1[:, None], k1[None, :]).expand(images.shape[1], 1, size, size)
    pad = size // 2
    return F.conv2d(F.pad(images, [pad, pad, pad, pad], mode="reflect"), kernel, groups=images.shape[1])


def read_definitions(path: str | Path) -> list[str]:
    """An ITACLIP description file: one ``<name> >=<text>`` line per class (background excluded or not)."""
    file = Path(path)
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"itaclip definitions {file}: cannot read it ({e.strerror or e})") from e
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        if ">=" not in line:
            raise ConfigError(f"itaclip definitions {file} line {n}: expected '<class name> >=<description>'")
        out.append(line.split(">=", 1)[1])
    if not out:
        raise ConfigError(f"itaclip definitions {file}: no description lines")
    return out


def mix_definitions(
    names: torch.Tensor, descriptions: torch.Tensor, query_to_class: list[int], beta: float, background: bool
) -> torch.Tensor:
    """``(1 - beta) e(name) + beta e(description of its class)`` per query, not renormalised (as the authors).

    With ``background`` class 0 has no description (its queries stay as they are) and description ``k``
    belongs to class ``k + 1``.
    """
    out = names.clone()
    for j, c in enumerate(query_to_class):
        if background and c == 0:
            continue
        out[j] = (1 - beta) * names[j] + beta * descriptions[c - 1 if background else c]
    return out


@register
@dataclass
class ItaClip(Method):
    """ITACLIP's options.

    Attributes:
        img_engineering: also run grey, blurred and flipped views of every window.
        img_eng_coefficient: weight of the (window, grey, blur) mean against the flipped views' mean.
        attn_self: ``softmax(q qᵀ s) + softmax(k kᵀ s)`` maps (``False``: the ordinary ``softmax(q kᵀ s)``).
        mid_blocks: blocks whose maps are averaged into the last block's (for 12 blocks; same relative depth else).
        definitions: a file of class descriptions (``<name> >=<text>`` per line, the authors' format);
            ``None``: class names only.
        def_coefficient: weight of a description's embedding.
        closing: close the label map with a 3x3 square (grey-level dilation then erosion of the label ids).
    """

    name = "itaclip"
    protocol = "itaclip"
    summary = "q-q + k-k maps of mid and last blocks, residual kept, FFN dropped; grey/blur/flip views; closing"
    table_row = (
        "last block; extra image views; text",
        "`½(A_last + mean(A_6, A_7, A_9))` with `A = softmax(q qᵀ s) + softmax(k kᵀ s)`",
        "residual kept, FFN dropped",
    )
    img_engineering: bool = True
    img_eng_coefficient: float = 0.75
    attn_self: bool = True
    mid_blocks: list[int] = field(default_factory=lambda: [6, 7, 9])
    definitions: str | None = None
    def_coefficient: float = 0.2
    closing: bool = True

    def _mid(self, vit: Backbone) -> list[int]:
        blocks = list(self.mid_blocks) if vit.depth == 12 else [scaled_index(b, vit.depth) for b in self.mid_blocks]
        if not blocks or any(not 0 <= b <= vit.depth - 2 for b in blocks):
            raise ConfigError(f"itaclip mid_blocks {self.mid_blocks} must be non-empty and within 0..{vit.depth - 2}")
        return blocks

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        """The mid blocks keep their inputs; with image engineering the views join the batch before block 0; the
        last block attends with its maps and the mid blocks' averaged, keeps its residual and drops its FFN."""
        changes = {b: BlockChange(keep=True) for b in self._mid(vit)}
        if self.img_engineering:

            def add_views(x: torch.Tensor) -> torch.Tensor:  # the views share the forward passes of the windows
                if trace.images is None:
                    raise ConfigError("itaclip's image engineering needs the crops (trace.images)")
                images = trace.images.float()
                views = torch.cat([grey_view(images), blur_view(images), images.flip(-2), images.flip(-1)])
                return torch.cat([x, vit.embed(views, self.pos_rule)[0]])

            changes[0] = dataclasses.replace(changes.get(0, BlockChange()), before=add_views)

        def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            mids = [vit.qkv(b, trace.inputs[b])[:2] for b in self._mid(vit)]
            mid = sum(self._attention(qb, kb, v) for qb, kb in mids) / len(mids)
            return 0.5 * self._attention(q, k, v) + 0.5 * mid

        changes[vit.depth - 1] = BlockChange(attention=attention, residual=True, ffn=False)
        return changes

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``A v`` for one block's ``A`` (q-q + k-k maps, or q-k), applied to the last block's ``v``."""
        return attend(q, q, v) + attend(k, k, v) if self.attn_self else attend(q, k, v)

    def _windows(self, trace: Trace, rows: int) -> int:
        """How many of the pass's ``rows`` are the windows themselves (the views follow them)."""
        return trace.images.shape[0] if self.img_engineering and trace.images is not None else rows

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        feats = super().features(vit, x, trace)
        return feats if trace.text is not None else feats[: self._windows(trace, feats.shape[0])]

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        logits = cosine_logits(feats, text)  # the mean of unit features' logits is the logits of their mean
        if not self.img_engineering:
            return logits
        window, grey, blur, vflip, hflip = logits.split(self._windows(trace, feats.shape[0]))
        flipped = 0.5 * (vflip.flip(-2) + hflip.flip(-1))
        c = self.img_eng_coefficient
        return c * (window + grey + blur) / 3 + (1 - c) * flipped

    @property
    def text_side(self) -> Definitions | None:  # type: ignore[override]
        return None if self.definitions is None else Definitions(self.definitions, self.def_coefficient)

    @property
    def label_refinement(self) -> Closing | None:  # type: ignore[override]
        return Closing() if self.closing else None


@dataclass(frozen=True)
class Definitions(TextSide):
    """ITACLIP's text side: each class's embedding blended with its description's (:func:`mix_definitions`), from a
    file of ``<name> >=<description>`` lines (one per class, or one per class but the first, background)."""

    path: str
    coefficient: float = 0.2

    def __call__(self, encoder: Any, classes: Any) -> torch.Tensor:
        names = encoder.embed(classes.queries)
        texts = read_definitions(self.path)
        n = len(classes)
        if len(texts) not in (n, n - 1):
            raise ConfigError(
                f"itaclip definitions {self.path}: {len(texts)} descriptions for {n} classes (give one per "
                f"class, or one per class but the first, background)"
            )
        background = len(texts) == n - 1
        return mix_definitions(names, encoder.embed(texts), classes.query_to_class, self.coefficient, background)


class Closing(LabelRefinement):
    """A morphological closing of the label map with a 3x3 square (grey-level dilation then erosion of the ids)."""

    def __call__(self, labels: torch.Tensor, windows: Sequence[WindowContext] = ()) -> torch.Tensor:
        import cv2

        array = labels.cpu().numpy()
        dtype = np.uint8 if array.max(initial=0) < 256 else np.uint16
        closed = cv2.morphologyEx(array.astype(dtype), cv2.MORPH_CLOSE, np.ones((3, 3), np.uint8))
        return torch.from_numpy(closed.astype(np.int64)).to(labels.device, labels.dtype)

"""FreeCP (ICCV 2025, chenqi1126/FreeCP): training-free class purification on top of MaskCLIP, SCLIP, ClearCLIP or GEM.

Per window: the base's patch features give class probabilities (``softmax(logit_scale · cos)`` over the queries),
min-max normalised over the whole window. Each class map is then refined by an affinity built from the ordinary
attention of blocks ``0..L-2`` (averaged; Sinkhorn-normalised three times, symmetrised, squared), restricted to the
boxes of the class's thresholded map, and min-max normalised again. Redundancy purification keeps the classes whose
refined map overlaps their probabilities (``Σ p r / (Σ p + Σ r) > rp_thres``); ambiguity purification groups the
kept classes whose refined maps overlap (soft IoU ``>= ap_thres``, connected components), and for each group of two
or more crops every box of the group's mean map out of the window, resizes it to ``crop_size`` and lets CLIP's own
CLS token choose one class of the group per box (against the class descriptions, when given). The other classes'
maps are set to zero. The output maps (in ``[0, 1]``) are what the windows average; FreeCP labels a pixel
background where ``1 - max`` of the class maps is at least their maximum, so with a background class its queries
are scored 0.5.

The bases as FreeCP's code runs them: ``maskclip`` (``out_proj(v)``, residual dropped, FFN kept on it), ``sclip``
(``softmax(q qᵀ s) + softmax(k kᵀ s)``, residual dropped, FFN kept), ``clearclip`` (``softmax(q qᵀ s)``, residual and
FFN dropped) and ``gem`` (GEM's parallel path, GEM's position-embedding resampling).
"""

from __future__ import annotations

import ast
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from .base import BlockChange, Method, Trace, attention_map, cosine_logits, register
from .clearclip import query_query
from .gem import Gem
from .pieces import TextSide
from .sclip import correlative

_BASES = ("maskclip", "sclip", "clearclip", "gem")


def boxes(score: np.ndarray, threshold: float) -> list[tuple[int, int, int, int]]:
    """FreeCP's boxes of a ``(h, w)`` map in ``[0, 1]``: the map as 8-bit grey levels (truncated), kept above
    ``int(threshold · its maximum level)``, one ``(x0, y0, x1, y1)`` per OpenCV contour (holes included, the right
    and bottom edges clipped to ``w - 1``, ``h - 1``); no contour: one empty box."""
    import cv2

    h, w = score.shape
    grey = (score.astype(np.float32) * 255).astype(np.uint8)
    _, binary = cv2.threshold(grey, int(threshold * np.max(grey)), 255, cv2.THRESH_BINARY)
    contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[-2]
    if len(contours) == 0:
        return [(0, 0, 0, 0)]
    out = []
    for contour in contours:
        x, y, bw, bh = cv2.boundingRect(contour)
        out.append((x, y, min(x + bw, w - 1), min(y + bh, h - 1)))
    return out


def box_mask(score: np.ndarray, threshold: float) -> torch.Tensor:
    """``(h, w)`` float mask, one inside any of :func:`boxes`."""
    mask = torch.zeros(score.shape)
    for x0, y0, x1, y1 in boxes(score, threshold):
        mask[y0:y1, x0:x1] = 1
    return mask


def transition(attention: torch.Tensor, rounds: int = 3) -> torch.Tensor:
    """``(N, N)`` attention -> FreeCP's affinity: ``rounds`` times columns then rows normalised to sum one, made
    symmetric, then squared."""
    t = attention
    for _ in range(rounds):
        t = t / t.sum(dim=0, keepdim=True)
        t = t / t.sum(dim=1, keepdim=True)
    t = (t + t.transpose(0, 1)) / 2
    return t @ t


def min_max(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each ``(C, h, w)`` map scaled to ``[0, 1]``: ``(x - min) / (max - min + eps)``."""
    lo = x.amin(dim=(-2, -1), keepdim=True)
    hi = x.amax(dim=(-2, -1), keepdim=True)
    return (x - lo) / (hi - lo + eps)


def components(adjacent: torch.Tensor) -> list[list[int]]:
    """Connected components of a boolean ``(n, n)`` matrix, each in depth-first order from its smallest node."""
    n = adjacent.shape[0]
    links = adjacent.tolist()
    seen = [False] * n
    out = []

    def visit(node: int, group: list[int]) -> None:
        seen[node] = True
        group.append(node)
        for other in range(n):
            if links[node][other] and not seen[other]:
                visit(other, group)

    for node in range(n):
        if not seen[node]:
            group: list[int] = []
            visit(node, group)
            out.append(group)
    return out


def read_descriptions(path: str | Path) -> dict[str, list[str]]:
    """FreeCP's class descriptions: a Python file assigning one dict, ``{class name: [sentences]}`` (the authors'
    ``prompts/vicuna13b/<set>.py``), read as data (nothing in it is run)."""
    file = Path(path)
    try:
        tree = ast.parse(file.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as e:
        raise ConfigError(f"freecp descriptions {file}: cannot read it ({getattr(e, 'strerror', None) or e})") from e
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            try:
                table = ast.literal_eval(node.value)
            except ValueError as e:
                raise ConfigError(f"freecp descriptions {file}: the dict is not plain data ({e})") from e
            if all(isinstance(k, str) and isinstance(v, list) and v for k, v in table.items()):
                return {k: [str(s) for s in v] for k, v in table.items()}
            break
    raise ConfigError(f"freecp descriptions {file}: expected NAME = {{'class name': ['sentence', ...], ...}}")


@dataclass(frozen=True, eq=False)
class ClassTexts(TextSide):
    """FreeCP's text side: the ordinary query embeddings, and what its purification needs beside them, kept in
    the method's ``store``: which queries are the background's, and per query the embedding that the
    ambiguity step's CLS token is compared with (the mean of its description sentences' unit embeddings, made
    unit, as the authors; without a description file, the query embedding itself)."""

    path: str | None
    store: dict

    def __call__(self, encoder: Any, classes: Any) -> torch.Tensor:
        text = encoder.embed(classes.queries)
        background = torch.tensor([classes.background and c == 0 for c in classes.query_to_class])
        described = text
        if self.path is not None:
            table = read_descriptions(self.path)
            missing = [q for q in classes.queries if q not in table]
            if missing:
                raise ConfigError(
                    f"freecp descriptions {self.path}: no entry for {missing[0]!r} (the file's names are the authors' "
                    "class names: use their class files, --classes-dir <FreeCP clone>/configs)"
                )
            # each sentence as a template without a name: the encoder's own mean of unit embeddings, made unit
            described = torch.cat(
                [type(encoder)(encoder.model, ["{c}" + s for s in table[q]]).embed([""]) for q in classes.queries]
            )
        self.store["text"] = (text.clone(), background, described)
        return text


@register
@dataclass
class FreeCP(Method):
    """FreeCP's options (the authors' names: ``rp_thres``, ``ap_thres``; the configs set them per dataset).

    Attributes:
        base: the method it purifies: ``"gem"`` (the authors' base config), ``"clearclip"``, ``"sclip"`` or
            ``"maskclip"``, each as FreeCP's own code runs it.
        rp_thres: redundancy purification: a class is kept when ``Σ p r / (Σ p + Σ r)`` of its probabilities ``p``
            and refined map ``r`` exceeds it.
        ap_thres: ambiguity purification: kept classes whose refined maps have a soft IoU of at least this are
            grouped, and CLIP's CLS token picks among them.
        logit_scale: the scale of the cosine logits before the softmax over the queries (CLIP's own,
            ``exp(logit_scale)``: 100 for OpenAI's and LAION's ViT-B/16).
        box_threshold: a map's boxes cover its 8-bit levels above this fraction of its maximum level.
        crop_size: the side the ambiguity step resizes each box's pixels to before CLIP classifies them.
        sinkhorn_rounds: column-then-row normalisations of the mean attention.
        affinity_heads: the heads whose attention builds the affinity: ``"base"`` as the authors' code for the base
            (the mean of all heads; with GEM, whose wrapper averages over the batch instead, the first head),
            ``"mean"`` or ``"first"``.
        descriptions: a file of class descriptions in the authors' format (``prompts/vicuna13b/<set>.py`` of their
            repository, read as data); ``None``: the ambiguity step compares with the class embeddings.
    """

    name = "freecp"
    protocol = "freecp"
    summary = (
        "class purification (affinity-refined maps, redundancy and ambiguity checks) on gem/clearclip/sclip/maskclip"
    )
    table_row = (
        "a base's last block; per-window class maps refined and purified; CLIP classifies ambiguous boxes",
        "a base (`gem`, `clearclip`, `sclip`, `maskclip`); maps refined by the blocks' mean attention",
        "as the base (FFN kept for `sclip`, `maskclip`)",
    )
    base: Literal["gem", "clearclip", "sclip", "maskclip"] = "gem"
    rp_thres: float = 0.15
    ap_thres: float = 0.7
    logit_scale: float = 100.0
    box_threshold: float = 0.4
    crop_size: int = 112
    sinkhorn_rounds: int = 3
    affinity_heads: Literal["base", "mean", "first"] = "base"
    descriptions: str | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.crop_size < 1 or self.sinkhorn_rounds < 0 or not 0 <= self.box_threshold <= 1:
            raise ConfigError(
                f"freecp crop_size must be >= 1, sinkhorn_rounds >= 0 and box_threshold within 0..1, got "
                f"{self.crop_size}, {self.sinkhorn_rounds} and {self.box_threshold}"
            )

    @property
    def _gem(self) -> Gem:
        return Gem()  # FreeCP builds GEM with its defaults (depth 7, one iteration, the token-norm temperature)

    @property
    def pos_rule(self) -> str:  # type: ignore[override]
        return self._gem.pos_rule if self.base == "gem" else "sclip"

    @property
    def text_side(self) -> ClassTexts:  # type: ignore[override]
        return ClassTexts(self.descriptions, self._cache)

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        """The base's changes, with every block but the last keeping its input (for the attention maps)."""
        if self.base == "gem":
            changes = dict(self._gem.blocks(vit, trace))
        else:
            attention = {"maskclip": lambda q, k, v: v, "sclip": correlative, "clearclip": query_query}[self.base]
            changes = {vit.depth - 1: BlockChange(attention=attention, residual=False, ffn=self.base != "clearclip")}
        for i in range(vit.depth - 1):
            changes[i] = dataclasses.replace(changes.get(i, BlockChange()), keep=True)
        return changes

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        return self._gem.features(vit, x, trace) if self.base == "gem" else super().features(vit, x, trace)

    def _affinity(self, vit: Backbone, trace: Trace) -> torch.Tensor:
        """``(B, N, N)`` patch-to-patch mean attention of blocks ``0..L-2`` (the ordinary path)."""
        first = self.affinity_heads == "first" or (self.affinity_heads == "base" and self.base == "gem")
        total = None
        for i in range(vit.depth - 1):
            q, k, _ = vit.qkv(i, trace.inputs[i])
            maps = attention_map(q, k)  # (B, H, T, T) in fp32
            maps = maps[:, 0] if first else maps.mean(dim=1)
            maps = vit.patches(vit.patches(maps).transpose(1, 2)).transpose(1, 2)
            total = maps if total is None else total + maps
        return total / (vit.depth - 1)

    def _texts(self, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(background mask ``(Q,)``, the ambiguity step's embeddings ``(Q, E)``) for these queries: the text
        side's when it made them, else no background and the queries themselves."""
        kept = self._cache.get("text")
        if kept is not None and kept[0].shape == text.shape and torch.equal(kept[0], text.detach().cpu().float()):
            return kept[1].to(text.device), kept[2].to(text.device, torch.float32)
        return torch.zeros(text.shape[0], dtype=torch.bool, device=text.device), text.float()

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        """``(B, Q, gh, gw)`` purified class maps in ``[0, 1]`` (background queries 0.5, removed classes 0)."""
        if trace.images is None:
            raise ConfigError("freecp's ambiguity step needs the crops (trace.images)")
        background, described = self._texts(text)
        probs = torch.softmax(self.logit_scale * cosine_logits(feats, text), dim=1)
        affinity = self._affinity(vit, trace)
        out = torch.zeros_like(probs)
        out[:, background] = 0.5
        classes = torch.nonzero(~background).flatten()
        for b in range(probs.shape[0]):
            out[b, classes] = self._purify(
                vit, probs[b], classes, transition(affinity[b], self.sinkhorn_rounds), trace.images[b], described
            )
        return out

    def _purify(
        self,
        vit: Backbone,
        probs: torch.Tensor,
        classes: torch.Tensor,
        trans: torch.Tensor,
        image: torch.Tensor,
        described: torch.Tensor,
    ) -> torch.Tensor:
        """One window: ``(Q, h, w)`` probabilities -> the ``(C, h, w)`` refined and purified maps of ``classes``."""
        q, h, w = probs.shape
        normalised = ((probs - probs.min()) / (probs.max() - probs.min()))[classes]
        scores = normalised.cpu().numpy()
        masks = torch.stack([box_mask(s, self.box_threshold) for s in scores]).to(probs.device).reshape(-1, h * w)
        refined = (masks * normalised.reshape(-1, h * w)) @ trans.transpose(0, 1)
        refined = min_max(refined.reshape(-1, h, w))
        p = probs[classes]
        overlap = (p * refined).sum(dim=(-2, -1)) / (p.sum(dim=(-2, -1)) + refined.sum(dim=(-2, -1)) + 1e-8)
        kept = torch.nonzero(overlap > self.rp_thres).flatten()
        if kept.numel() > 1:
            kept = self._ambiguity(vit, refined, classes, kept, image, described)
        keep = torch.zeros(len(classes), dtype=torch.bool, device=probs.device)
        keep[kept] = True
        return refined * keep[:, None, None]

    def _ambiguity(
        self,
        vit: Backbone,
        refined: torch.Tensor,
        classes: torch.Tensor,
        kept: torch.Tensor,
        image: torch.Tensor,
        described: torch.Tensor,
    ) -> torch.Tensor:
        """The kept classes after ambiguity purification (indices into ``classes``)."""
        maps = refined[kept]
        soft_iou = torch.minimum(maps[:, None], maps[None]).sum(dim=(2, 3)) / torch.maximum(
            maps[:, None], maps[None]
        ).sum(dim=(2, 3))
        valid: list[int] = []
        for group in components(soft_iou >= self.ap_thres):
            if len(group) == 1:
                valid.append(group[0])
                continue
            chosen = False
            fused = maps[group].mean(dim=0).cpu().numpy()
            options = described[classes[kept[group]]]
            for x0, y0, x1, y1 in boxes(fused, self.box_threshold):
                if y0 == y1 or x0 == x1:
                    valid.extend(group)
                    continue
                p = vit.patch_size
                pixels = image[None, :, y0 * p : y1 * p, x0 * p : x1 * p].to(vit.dtype)
                pixels = F.interpolate(pixels, size=(self.crop_size, self.crop_size), mode="bilinear")
                valid.append(group[int((self._cls(vit, pixels) @ options.t()).argmax())])
                chosen = True
            if not chosen:
                valid.extend(group)
        return kept[torch.tensor(sorted(set(valid)), device=kept.device)]

    def _cls(self, vit: Backbone, pixels: torch.Tensor) -> torch.Tensor:
        """CLIP's own unit ``(E,)`` image embedding of one ``(1, 3, s, s)`` image (every block unchanged): the CLS
        token's projection, or the tower's own pooling where it has no CLS token (:meth:`Backbone.pooled`)."""
        x, _ = vit.embed(pixels, self.pos_rule)
        for i in range(vit.depth):
            x = vit.block(i, x)
        return F.normalize(vit.pooled(x).float()[0], dim=-1)

"""The Segmenter: image + class names -> per-pixel labels, for every method, batched across windows and images.

Data flow: image -> resize -> sliding windows (all windows of all images batched by shape) -> backbone ->
method's last block -> cosine logits -> upsample into the image canvas / overlap count -> resize to the
original size -> softmax -> labels.

Memory: a window's logits are upsampled a few windows at a time (never the whole batch at once). The canvas
of an image is ``(Q, h, w)`` at the inference resolution; when that is large (e.g. ``short_side=0`` on a
4000x3000 photo with 150 classes: 7.2 GB) and only labels or probabilities are asked for (no ``area_thd``,
no PAMR, which need the whole canvas), the canvas is streamed instead (:class:`gclip.inference.canvas.BandCanvas`):
windows arrive top to bottom, rows that no pending window covers any more are averaged, resized and
reduced to labels at once (:class:`gclip.inference.postprocess.StreamingReduction`) and their memory is reused, so at
most about one window-row band of the canvas exists at a time. Landscape images are walked column by column
instead (the band is then one window width x the image height, the shorter side). Both paths give identical
results.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..backbones import backbone_for
from ..backbones.models import LoadedModel, load_model
from ..backbones.presets import preset_settings
from ..errors import ClassesError, ConfigError
from ..io.images import DEFAULT_MAX_PIXELS, ImageInput
from ..methods import Method, WindowContext, get_method
from ..text import ClassList, ClassSpec, TextEncoder, parse_classes
from .canvas import BandCanvas, Canvas, WindowUpsample
from .forward import encode, head, image_context, label_context, second_model, warm
from .postprocess import TILE_ELEMENTS, StreamingReduction, pamr, reduce_logits, refine_labels
from .preprocess import Prepared, Preprocessor
from .result import SegmentationResult
from .windows import Window, plan_windows, tile

__all__ = ["Settings", "Prepared", "Segmenter", "PresetNotice"]  # Prepared lives in gclip.inference.preprocess


@dataclass
class Settings:
    """Inference settings (the ClearCLIP protocol by default).

    Attributes:
        short_side: resize so the short side has this length (0: keep the image size).
        max_long_side: the long side's cap after that resize.
        crop: sliding-window size in pixels (0: the whole image in one window).
        stride: sliding-window stride.
        padding: ``"symmetric"`` zero-pads a window to a patch multiple and cuts the pad from its logits
            (ClearCLIP); ``"none"`` drops the remainder pixels and stretches the logits (SCLIP, NACLIP).
        logit_scale: multiplies cosine logits before the softmax over queries.
        prob_thd: pixels whose top probability is below this become the background class, or unlabeled (``-1``)
            when the class list has none (see :attr:`gclip.text.ClassList.background`).
        area_thd: classes (but the background) covering less than this fraction of their pixels are dropped
            (``None``: off).
        pamr_steps: PAMR refinement steps (0: off).
        pamr_dilations: PAMR's dilations.
        batch_size: windows per forward pass; ``None`` (the default): 16 on a GPU, 1 on a CPU, where the forward
            pass is compute-bound and one window at a time measured fastest (see benchmarks/RESULTS.md).
        max_pixels: images of more pixels than this are refused.
    """

    short_side: int = 448
    max_long_side: int = 2048
    crop: int = 448
    stride: int = 224
    padding: Literal["symmetric", "none"] = "symmetric"
    logit_scale: float = 50.0
    prob_thd: float = 0.0
    area_thd: float | None = None
    pamr_steps: int = 0
    pamr_dilations: tuple[int, ...] = (8, 16)
    batch_size: int | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def validate(self) -> Settings:
        problems = []
        if self.short_side < 0 or self.max_long_side <= 0:
            problems.append("short_side must be >= 0 and max_long_side > 0")
        if self.crop < 0 or (self.crop > 0 and not 0 < self.stride <= self.crop):
            problems.append(f"crop must be >= 0 and 0 < stride <= crop (got crop={self.crop}, stride={self.stride})")
        if self.padding not in ("symmetric", "none"):
            problems.append(f"padding must be 'symmetric' or 'none', got {self.padding!r}")
        if not 0 <= self.prob_thd <= 1 or (self.area_thd is not None and not 0 <= self.area_thd <= 1):
            problems.append("prob_thd and area_thd must be within 0..1")
        if (self.batch_size is not None and self.batch_size < 1) or self.pamr_steps < 0:
            problems.append("batch_size must be >= 1 and pamr_steps >= 0")
        if problems:
            raise ConfigError("; ".join(problems))
        self.pamr_dilations = tuple(int(d) for d in self.pamr_dilations)
        return self


_GEOMETRY = ("short_side", "max_long_side", "crop", "stride")
"""Settings a backbone preset may set (see :func:`gclip.backbones.presets.preset_settings`)."""


class PresetNotice(UserWarning):
    """A backbone preset's settings were applied because none were given."""


class Segmenter:
    """Open-vocabulary semantic segmentation with a CLIP ViT.

    Args:
        model: an open_clip model name or a :class:`~gclip.backbones.models.LoadedModel`.
        pretrained: pretrained tag or checkpoint path (ignored when ``model`` is already loaded).
        method: a registered method name (``gclip.list_methods()``) or a :class:`~gclip.methods.Method`.
        method_options: options of the method, e.g. ``{"emerging_blocks": [6, 7]}``.
        device, precision: see :func:`~gclip.backbones.models.load_model`.
        templates: prompt templates (bundled name, file, or list).
        text_embeddings: class embeddings made beforehand (:func:`gclip.text.write_text_embeddings`,
            ``gclip embed-text``): their names need no tokenizer.
        classes: optional class list, as for :meth:`set_classes`.
        **settings: fields of :class:`Settings`.

    >>> seg = Segmenter("ViT-B-16", pretrained="/path/to/ViT-B-16.pt", method="gclip")  # doctest: +SKIP
    >>> seg.set_classes(["cat", "dog", "grass"])  # doctest: +SKIP
    >>> result = seg.predict("photo.jpg")  # doctest: +SKIP
    >>> result.labels.shape == result.size  # doctest: +SKIP
    True
    """

    stream_min_elements: int = 1 << 26
    """Canvases of at least this many floats (Q x h x w) are streamed when the settings allow it."""

    def __init__(
        self,
        model: str | LoadedModel = "ViT-B-16",
        pretrained: str | None = "openai",
        method: str | Method = "gclip",
        method_options: dict[str, Any] | None = None,
        device: str | torch.device | None = None,
        precision: str = "fp32",
        templates: str | Sequence[str] = "openai_imagenet_80",
        classes: ClassSpec | None = None,
        text_embeddings: str | Path | None = None,
        **settings: Any,
    ) -> None:
        self.model = model if isinstance(model, LoadedModel) else load_model(model, pretrained, precision, device)
        self.vit = backbone_for(self.model.visual, self.model.mean, self.model.std, self.model.clip)
        self.method = get_method(method, **(method_options or {}))
        self.text = TextEncoder(self.model, templates, text_embeddings)
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(Settings)})
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}: see gclip.Settings for the settings")
        self.settings = Settings(**self._with_backbone_preset(settings)).validate()
        self.classes: ClassList | None = None
        self._queries: torch.Tensor | None = None
        self.timer: Any = (
            None  # an object with .stage(name) -> context manager (see gclip.diagnostics.bench.StageTimer)
        )
        self._compiled: Any = None
        if classes is not None:
            self.set_classes(classes)

    def _with_backbone_preset(self, settings: dict[str, Any]) -> dict[str, Any]:
        """The backbone preset's resize and window settings, when the caller sets none of them (with a notice)."""
        if any(key in settings for key in _GEOMETRY):
            return settings
        defaults = Settings()
        preset = {k: v for k, v in preset_settings(self.model.name).items() if getattr(defaults, k) != v}
        if preset:
            shown = ", ".join(f"{k}={v}" for k, v in preset.items())
            warnings.warn(
                f"{self.model.name}: using its backbone preset {shown} (pass short_side, crop or stride to choose)",
                PresetNotice,
                stacklevel=3,
            )
        return {**settings, **preset}

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def batch_size(self) -> int:
        """Windows per forward pass: the setting, or by default 16 on a GPU and 1 on a CPU."""
        if self.settings.batch_size is not None:
            return self.settings.batch_size
        return 16 if self.device.type == "cuda" else 1

    def describe(self) -> dict[str, Any]:
        """Everything that determines the output, as plain data."""
        return {
            "model": self.model.name,
            "pretrained": self.model.pretrained,
            "quick_gelu": self.model.quick_gelu,
            "precision": str(self.model.dtype).replace("torch.", ""),
            "method": self.method.name,
            "method_options": self.method.options(),
            "templates": len(self.text.templates),
            **dataclasses.asdict(self.settings),
            "batch_size": self.batch_size,
        }

    def set_classes(self, classes: ClassSpec | ClassList) -> ClassList:
        """Set the vocabulary and embed it (cached per name). See :func:`gclip.text.parse_classes`."""
        self.classes = parse_classes(classes)
        self._queries = self.method.text_queries(self.text, self.classes).to(self.device)
        return self.classes

    @property
    def preprocessor(self) -> Preprocessor:
        """The picklable, model-less preprocessing of the current settings (for workers, Ray tasks, loaders)."""
        s = self.settings
        mean, std = tuple(self.model.mean), tuple(self.model.std)
        return Preprocessor(s.short_side, s.max_long_side, s.max_pixels, mean, std, self.method.needs_original)

    def prepare(self, image: ImageInput, key: Any = None) -> Prepared:
        """Decode (``HWC uint8 RGB``), resize and normalise one image (see :attr:`preprocessor`)."""
        pre = self.preprocessor
        with self._stage("decode"):
            array = pre.decode(image)
        with self._stage("preprocess"):
            normalised = pre.transform(array)
        return pre.pack(array, normalised, image, key)

    def predict(self, image: ImageInput, return_probs: bool = False) -> SegmentationResult:
        """Segment one image (path, PIL image or ``HxWx3 uint8`` array) -> labels ``(H, W)`` at its size."""
        return self.predict_batch([image], return_probs)[0]

    def predict_batch(self, images: Iterable[ImageInput], return_probs: bool = False) -> list[SegmentationResult]:
        """Segment several images; the windows of all of them share forward passes."""
        return self.infer([self.prepare(img) for img in images], return_probs)

    def query_embeddings(self) -> torch.Tensor:
        """The ``(Q, E)`` unit text embeddings of the current classes (one per synonym); a one-line
        :class:`~gclip.errors.ClassesError` before :meth:`set_classes`."""
        if self._queries is None or self.classes is None:
            raise ClassesError("no classes set: call set_classes([...]) first")
        return self._queries

    def _stage(self, name: str) -> contextlib.AbstractContextManager:
        return self.timer.stage(name) if self.timer is not None else contextlib.nullcontext()

    def compile(self, **options: Any) -> None:
        """Run the per-window forward through ``torch.compile`` (``options`` go to it).

        Partial batches are zero-padded to ``batch_size`` windows so that each window shape compiles once.

        Compilation happens on the first forward; if it fails there (e.g. no C++ compiler on a CPU machine)
        a warning is issued and the plain forward is used from then on.
        """
        self._compiled = torch.compile(self._forward, **options)

    def _forward(
        self, crops: torch.Tensor, queries: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        encoded = encode(self.vit, self.method, crops, context)
        return head(self.vit, self.method, encoded, queries), label_context(self.method, encoded[1])

    def _window_logits(
        self,
        crops: torch.Tensor,
        queries: torch.Tensor,
        context: torch.Tensor | None = None,
        windows: list[Window] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(B, Q, gh, gw)`` cosine logits of a batch of crops (timed as encoder and head), and the method's
        :func:`~gclip.inference.forward.label_context` of the pass (``context``: the crops' image contexts;
        ``windows``: for a cross-window method, the crops' windows, all of one image, which it runs eagerly: a
        compiled batch is padded with blank windows that it would see)."""
        if self._compiled is not None and windows is None:
            n, bs, p = crops.shape[0], self.batch_size, self.vit.patch_size
            padded = crops  # one batch shape per window shape: a partial batch would trigger a recompilation
            if n < bs:
                padded = torch.cat([crops, crops.new_zeros((bs - n, *crops.shape[1:]))])
                if context is not None:
                    context = torch.cat([context, context.new_zeros((bs - n, *context.shape[1:]))])
            grid = (crops.shape[-2] // p, crops.shape[-1] // p)
            # caches filled eagerly: traced, a miss would break the graph or recompile
            warm(self.vit, self.method, grid)
            try:
                with self._stage("encoder"):
                    logits, labels_context = self._compiled(padded, queries, context)
                return logits[:n], None if labels_context is None else labels_context[:n]
            except Exception as e:  # noqa: BLE001 - any compiler failure: fall back to eager
                warnings.warn(f"torch.compile failed ({type(e).__name__}); running without it", stacklevel=2)
                self._compiled = None
        with self._stage("encoder"):
            encoded = encode(self.vit, self.method, crops, context, windows)
        with self._stage("second_model"):
            second_model(self.vit, self.method, encoded)
        with self._stage("head"):
            return head(self.vit, self.method, encoded, queries), label_context(self.method, encoded[1])

    def _plan(self, prepared: Sequence[Prepared]) -> tuple[list[tuple[int, int]], list[list[Window]], dict]:
        """Per image its canvas size and windows (:func:`~gclip.inference.windows.plan_windows`), and the (image,
        window) pairs grouped by window shape (for a cross-window method: by image), in window order."""
        s = self.settings
        sizes, plans, groups = [], [], defaultdict(list)
        multiple = self.method.window_multiple(self.vit)
        for i, item in enumerate(prepared):
            size, windows = plan_windows(tuple(item.image.shape[-2:]), item.size, s.crop, s.stride, s.padding, multiple)
            if self._stream_axis(size) == 1:  # column by column (see BandCanvas)
                windows = sorted(windows, key=lambda win: (win.target[2], win.target[0]))
            sizes.append(size)
            plans.append(windows)
            for j, win in enumerate(windows):
                groups[i if self.method.cross_window else win.shape].append((i, j))
        return sizes, plans, groups

    def _windows(self, prepared: Sequence[Prepared], plans: list[list[Window]], groups: dict) -> Iterator[tuple]:
        """``(image index, window, lazily upsampled logits, label context or None)`` for every window, batch by
        batch."""
        queries = self.query_embeddings()
        bs = self.batch_size
        images: dict[int, torch.Tensor] = {}  # each whole image crosses to the device once; windows are cut there
        contexts: dict[int, torch.Tensor | None] = {}

        def crop(i: int, win: Window) -> torch.Tensor:
            if i not in images:
                images[i] = prepared[i].image.to(self.device, non_blocking=True)
            y1, y2, x1, x2 = win.box
            part = images[i][:, y1:y2, x1:x2]
            return F.pad(part, win.pads) if any(win.pads) else part

        cross = self.method.cross_window  # all windows of an image in one pass, whatever the batch size
        for members in groups.values():
            for start in range(0, len(members), len(members) if cross else bs):
                chunk = members[start : start + (len(members) if cross else bs)]
                with self._stage("preprocess"):
                    batch = torch.stack([crop(i, plans[i][j]) for i, j in chunk])
                with self._stage("encoder"):  # the method's per-image pass (e.g. CASS's whole-image CLS), once each
                    for i, _ in chunk:
                        if i not in contexts:
                            contexts[i] = image_context(self.vit, self.method, images[i][None])
                given = [contexts[i] for i, _ in chunk]
                stacked = None if any(c is None for c in given) else torch.cat(given)  # type: ignore[arg-type]
                windows = [plans[i][j] for i, j in chunk] if cross else None
                logits, context = self._window_logits(batch, queries, stacked, windows)
                with self._stage("head"):
                    for k, ((i, j), window_logits) in enumerate(zip(chunk, logits)):
                        win = plans[i][j]
                        up = WindowUpsample(window_logits, win.out_size, win.keep, TILE_ELEMENTS // 4)
                        yield i, win, up, None if context is None else context[k]

    @torch.no_grad()
    def merged_logits(self, prepared: Sequence[Prepared]) -> list[torch.Tensor]:
        """Window-averaged cosine logits ``(Q, h, w)`` per image, at the inference resolution (at the original
        size for the whole-image mode, ``crop=0``)."""
        if self.method.whole_image:
            return [self.image_logits(item)[0] for item in prepared]
        n_queries = self.query_embeddings().shape[0]
        sizes, plans, groups = self._plan(prepared)
        canvases = [Canvas(n_queries, size, self.device) for size in sizes]
        for i, win, up, _ in self._windows(prepared, plans, groups):
            canvases[i].add(win.target, up)
        return [c.merged() for c in canvases]

    @staticmethod
    def _stream_axis(size: tuple[int, int]) -> int:
        """0: windows row by row (a streamed canvas keeps rows); 1 for landscape canvases: column by column.

        The order is that of the canvas's shape alone, whether or not it is streamed, so that both canvases
        add the same windows in the same order (identical sums).
        """
        h, w = size
        return 1 if w > h else 0

    def _streams(self, size: tuple[int, int], n_queries: int) -> bool:
        s = self.settings
        return s.pamr_steps == 0 and not s.area_thd and n_queries * size[0] * size[1] >= self.stream_min_elements

    @torch.no_grad()
    def infer(self, prepared: Sequence[Prepared], return_probs: bool = False) -> list[SegmentationResult]:
        """The model half of inference on already :meth:`prepare`-d images."""
        queries = self.query_embeddings()
        if self.method.whole_image:
            results = []
            for item in prepared:
                logits, contexts = self.image_logits(item)
                results.append(self._result(item, self._reduce(item, logits, return_probs), contexts))
            return results
        s = self.settings
        q2c = self.classes.query_to_class  # type: ignore[union-attr]
        sizes, plans, groups = self._plan(prepared)
        canvases: list[Canvas | BandCanvas] = []
        for item, size, windows in zip(prepared, sizes, plans):
            if self._streams(size, queries.shape[0]):
                axis = self._stream_axis(size)
                reducer = StreamingReduction(
                    size, item.size, q2c, s.logit_scale, s.prob_thd, return_probs, device=self.device, axis=axis,
                    background=self.classes.background,  # type: ignore[union-attr]
                )  # fmt: skip
                targets = [win.target for win in windows]
                canvases.append(BandCanvas(queries.shape[0], size, targets, reducer, self.device, axis=axis))
            else:
                canvases.append(Canvas(queries.shape[0], size, self.device))
        contexts: list[list[WindowContext]] = [[] for _ in prepared]
        for i, win, up, context in self._windows(prepared, plans, groups):
            canvases[i].add(win.target, up)
            if context is not None:
                contexts[i].append(WindowContext(win, sizes[i], context))
        results = []
        with self._stage("head"):
            for item, canvas, image_contexts in zip(prepared, canvases, contexts):
                if isinstance(canvas, BandCanvas):
                    reduced = canvas.reducer_result()
                else:
                    reduced = self._reduce(item, canvas.merged(), return_probs)
                results.append(self._result(item, reduced, image_contexts))
        return results

    def _result(self, item: Prepared, reduced: Any, contexts: list[WindowContext]) -> SegmentationResult:
        n_classes, background = len(self.classes), self.classes.background  # type: ignore[arg-type,union-attr]
        return SegmentationResult(
            labels=refine_labels(self.method, reduced.labels, contexts, n_classes).to(torch.int32).cpu().numpy(),
            class_names=self.classes.names,  # type: ignore[union-attr]
            background=background,
            probs=reduced.probs.cpu().numpy() if reduced.probs is not None else None,
            key=item.key,
        )

    @torch.no_grad()
    def image_logits(self, item: Prepared) -> tuple[torch.Tensor, list[WindowContext]]:
        """``(Q, h, w)`` logits of one image from a method that runs whole images itself
        (``window_mode = "image"``, e.g. Trident), at the resolution it chooses, and what the
        method keeps for its ``label_refinement`` (one whole-image context, or none)."""
        if self.method.needs_original and item.original is None:
            raise ConfigError(f"{self.method.name} needs the decoded pixels: prepare the image with this Segmenter")
        s = self.settings
        image = item.image[None].to(self.device)
        shape = self.method.input_shape(tuple(image.shape[-2:]), self.vit.patch_size, s.crop)
        if shape != tuple(image.shape[-2:]):
            image = F.interpolate(image, shape, mode="bilinear", align_corners=False)
        windows = tile(image, s.crop, s.stride, self.method.window_multiple(self.vit))
        out = self.method.image_logits(self.vit, windows, item, self.query_embeddings(), self._stage)
        if not isinstance(out, tuple):
            return out, []
        logits, context = out
        return logits, [WindowContext(None, tuple(item.size), context)]

    def _reduce(self, item: Prepared, logits: torch.Tensor, return_probs: bool):
        s = self.settings
        size = item.size
        if s.pamr_steps > 0:
            logits = F.interpolate(logits[None], size=size, mode="bilinear")
            image = F.interpolate(item.image[None].to(self.device), size=size, mode="bilinear")
            logits = pamr(image, logits, s.pamr_steps, s.pamr_dilations)[0]
        return reduce_logits(
            logits,
            size,
            self.classes.query_to_class,  # type: ignore[union-attr]
            logit_scale=s.logit_scale,
            prob_thd=s.prob_thd,
            area_thd=s.area_thd,
            return_probs=return_probs,
            background=self.classes.background,  # type: ignore[union-attr]
        )

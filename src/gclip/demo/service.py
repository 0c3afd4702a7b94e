"""The demo's engine, free of any web framework: one loaded model, one Segmenter per method, limits, outputs.

Every request goes through :meth:`DemoService.segment`, which holds a lock while it sets the vocabulary and
the settings on the shared Segmenter and runs it, so concurrent requests never see each other's state.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..backbones.models import LoadedModel
from ..engines.spec import SegmenterSpec
from ..errors import ClassesError, ConfigError, ImageError
from ..inference.result import SegmentationResult
from ..inference.segmenter import Segmenter, Settings
from ..io.images import load_image
from ..io.outputs import atomic_path, class_colours, write_label_png
from ..methods import list_methods

__all__ = ["Limits", "DemoSettings", "Outcome", "DemoService", "parse_vocabulary", "overlay"]

EXAMPLES_DIR = Path(__file__).parent / "examples"


@dataclass(frozen=True)
class Limits:
    """What one request may ask for.

    Attributes:
        max_upload_bytes: uploads larger than this are refused by the web server.
        max_pixels: images with more pixels are refused (checked before decoding).
        work_side: larger images are scaled down so their long side is this before segmenting.
        max_classes: most classes in one vocabulary.
        max_name_length: most characters in one class name.
        max_cached_names: text embeddings kept per method before the cache is dropped and rebuilt.
        keep_seconds: downloads older than this are deleted.
    """

    max_upload_bytes: int = 10 * 1024 * 1024
    max_pixels: int = 25_000_000
    work_side: int = 1024
    max_classes: int = 30
    max_name_length: int = 60
    max_cached_names: int = 5000
    keep_seconds: float = 3600.0


@dataclass(frozen=True)
class DemoSettings:
    """The settings the demo exposes (the rest keep the ClearCLIP protocol defaults).

    Attributes:
        short_side: resize the short side to this before windowing (0: keep the working size).
        crop: sliding-window size (0: the whole image in one window); the stride is half of it.
        prob_thd: pixels whose top probability is below this are left unlabeled (or get a first class named
            ``background``).
        pamr_steps: PAMR refinement steps (0: off).
    """

    short_side: int = 448
    crop: int = 448
    prob_thd: float = 0.0
    pamr_steps: int = 0

    def to_settings(self, max_pixels: int) -> Settings:
        crop = int(self.crop)
        return Settings(
            short_side=int(self.short_side),
            crop=crop,
            stride=max(1, crop // 2) if crop > 0 else Settings.stride,
            prob_thd=float(self.prob_thd),
            pamr_steps=int(self.pamr_steps),
            max_pixels=max_pixels,
        ).validate()


@dataclass
class Outcome:
    """One method's answer to one request.

    Attributes:
        method: the method's name.
        image: ``HxWx3 uint8 RGB`` image that was segmented (after any downscaling).
        result: labels ``(H, W)`` and class names.
        seconds: wall time of the segmentation.
        label_png: palettized label map (pixel value = class index).
        overlay_png: the image with the class colours blended in.
    """

    method: str
    image: np.ndarray
    result: SegmentationResult
    seconds: float
    label_png: Path
    overlay_png: Path


def parse_vocabulary(text: str, limits: Limits = Limits()) -> list[tuple[str, ...]]:
    """A typed vocabulary -> classes, each a tuple of synonyms.

    Classes are separated by ``,``; when the text contains a ``;``, classes are separated by ``;`` and
    ``,`` separates synonyms (``"person, people; car"``). The text is never read as a file name.

    Raises:
        ClassesError: empty, too many classes, a name too long, or a duplicate.

    >>> parse_vocabulary("cat, dog ,sky")
    [('cat',), ('dog',), ('sky',)]
    >>> parse_vocabulary("person, people; car")
    [('person', 'people'), ('car',)]
    """
    text = (text or "").strip()
    if ";" in text:
        classes = [tuple(n.strip() for n in part.split(",") if n.strip()) for part in text.split(";")]
    else:
        classes = [(n.strip(),) for n in text.split(",")]
    classes = [c for c in classes if c and c[0]]
    if not classes:
        raise ClassesError('type at least one class name, e.g. "cat, dog, grass, sky"')
    if len(classes) > limits.max_classes:
        raise ClassesError(f"{len(classes)} classes given: the demo takes at most {limits.max_classes}")
    for names in classes:
        for name in names:
            if len(name) > limits.max_name_length:
                raise ClassesError(f"class name {name[:20]!r}... is longer than {limits.max_name_length} characters")
    seen: set[str] = set()
    for names in classes:
        for name in names:
            if name.lower() in seen:
                raise ClassesError(f"{name!r} is named twice: remove the duplicate")
            seen.add(name.lower())
    return classes


def overlay(image: np.ndarray, labels: np.ndarray, alpha: float = 0.5, background: bool = False) -> np.ndarray:
    """Blend each pixel's class colour (:func:`~gclip.io.outputs.class_colours`) into ``image`` (``HxWx3 uint8``)
    -> ``HxWx3 uint8``; unlabeled pixels (``-1``) and a ``background`` class 0 keep the photo's colours."""
    colours = class_colours(256, background)[np.clip(labels, 0, 255)].astype(np.float32)
    mixed = np.clip(image.astype(np.float32) * (1 - alpha) + colours * alpha + 0.5, 0, 255).astype(np.uint8)
    return np.where((labels >= (1 if background else 0))[..., None], mixed, image)


def hex_colour(index: int, background: bool = False) -> str:
    """The colour of a class index as ``#rrggbb`` (as in :func:`overlay` and the label PNG)."""
    r, g, b = class_colours(256, background)[index % 256]
    return f"#{r:02x}{g:02x}{b:02x}"


class DemoService:
    """Segments uploaded images with one shared model, for every method.

    Args:
        model: the model, loaded once (:func:`gclip.load_model`).
        limits: request limits.
        workdir: folder owned by the app for its downloads and Gradio's cache (default: a new temp folder,
            removed by :meth:`close` or at the latest when the process exits).
        methods: methods offered (default: all registered).
        defaults: the settings the app starts with.

    >>> service = DemoService(gclip.load_model("ViT-B-16", "openai"))  # doctest: +SKIP
    >>> outcome = service.segment("photo.jpg", "cat, dog, sky", "gclip")  # doctest: +SKIP
    """

    def __init__(
        self,
        model: LoadedModel,
        limits: Limits = Limits(),
        workdir: str | Path | None = None,
        methods: list[str] | None = None,
        defaults: DemoSettings = DemoSettings(),
        method_options: dict[str, dict] | None = None,
    ) -> None:
        self.model = model
        self.method_options = dict(method_options or {})  # per method, e.g. {"proxyclip": {"proxy_checkpoint": ...}}
        self.limits = limits
        self.methods = list(methods or list_methods())
        self.defaults = defaults
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="gclip-demo-"))
        self._owned = None if workdir else self.workdir  # a temporary folder of ours: removed on close or exit
        if self._owned is not None:
            atexit.register(self.close)
        self.downloads = self.workdir / "downloads"
        self.downloads.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._segmenters: dict[str, Segmenter] = {}
        self._names_seen: dict[str, set[str]] = {}

    def close(self) -> None:
        """Remove the temporary work folder this service made (a ``workdir`` given to it is left alone)."""
        if self._owned is not None:
            shutil.rmtree(self._owned, ignore_errors=True)
            self._owned = None
            atexit.unregister(self.close)

    def describe_model(self) -> str:
        """A one-line description of the loaded model."""
        weights = self.model.pretrained or "random init"
        if Path(weights).suffix:  # a local checkpoint: its file name only, never the server's folders
            weights = Path(weights).name
        return f"{self.model.name} ({weights}, {self.model.device})"

    def load(self, image: str | Path | np.ndarray | Image.Image) -> tuple[np.ndarray, str]:
        """Decode an image within the pixel cap and scale it down to the working size.

        Returns:
            ``HxWx3 uint8 RGB`` and a note on any resizing ("" when none).

        Raises:
            ImageError: unreadable, or more pixels than ``limits.max_pixels``.
        """
        if image is None:
            raise ImageError("upload an image or pick one of the examples first")
        try:
            array = load_image(image, self.limits.max_pixels)
        except ImageError as e:
            message = str(e)
            if str(image) in message and not isinstance(image, np.ndarray):
                message = message.replace(str(image), "the image")  # never echo server paths
            raise ImageError(message) from None
        h, w = array.shape[:2]
        if h * w > self.limits.max_pixels:
            raise ImageError(f"the image has {h * w:,} pixels: the demo takes at most {self.limits.max_pixels:,}")
        side = self.limits.work_side
        if max(h, w) <= side:
            return array, ""
        scale = side / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        small = np.array(Image.fromarray(array).resize(size, Image.BICUBIC))
        return small, f"scaled down from {w}x{h} to {size[0]}x{size[1]}"

    def _segmenter(self, method: str, names: list[str]) -> Segmenter:
        if method not in self.methods:
            raise ConfigError(f"unknown method {method!r}: choose one of {', '.join(self.methods)}")
        seen = self._names_seen.setdefault(method, set())
        seen.update(names)
        if method not in self._segmenters or len(seen) > self.limits.max_cached_names:
            recipe = SegmenterSpec(
                self.model,
                method=method,
                method_options=self.method_options.get(method),
                settings={"max_pixels": self.limits.max_pixels},  # the rest is set per request
            )
            self._segmenters[method] = recipe.build()
            self._names_seen[method] = set(names)
        return self._segmenters[method]

    def segment(
        self,
        image: str | Path | np.ndarray | Image.Image,
        vocabulary: str,
        method: str = "gclip",
        settings: DemoSettings = DemoSettings(),
        stem: str = "image",
    ) -> Outcome:
        """Segment one image into the typed classes with one method and write the two downloads.

        Raises:
            GclipError: a bad image, vocabulary, method or setting (one-line message for the user).
        """
        classes = parse_vocabulary(vocabulary, self.limits)
        array, _ = self.load(image)
        full = settings.to_settings(self.limits.max_pixels)
        with self._lock:
            segmenter = self._segmenter(method, [n for names in classes for n in names])
            segmenter.settings = full
            segmenter.set_classes(classes)
            start = time.perf_counter()
            result = segmenter.predict(array)
            seconds = time.perf_counter() - start
        label_png, overlay_png = self._write(array, result, f"{stem}_{method}")
        return Outcome(method, array, result, seconds, label_png, overlay_png)

    def _write(self, image: np.ndarray, result: SegmentationResult, stem: str) -> tuple[Path, Path]:
        self._prune()
        folder = self.downloads / uuid.uuid4().hex
        label_png = write_label_png(result.labels, folder / f"{stem}_labels.png", result.background)
        overlay_png = folder / f"{stem}_overlay.png"
        with atomic_path(overlay_png) as tmp:
            Image.fromarray(overlay(image, result.labels, background=result.background)).save(tmp, format="PNG")
        return label_png, overlay_png

    def _prune(self) -> None:
        cutoff = time.time() - self.limits.keep_seconds
        for folder in self.downloads.iterdir():
            try:
                if folder.stat().st_mtime < cutoff:
                    shutil.rmtree(folder, ignore_errors=True)
            except OSError:
                continue

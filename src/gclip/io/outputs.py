"""Writing results: palettized label PNGs and JSON, always through a temporary name and a rename."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import OutputError
from ..inference.result import SegmentationResult

__all__ = [
    "palette",
    "class_colours",
    "UNLABELED_PNG",
    "atomic_path",
    "output_error",
    "write_label_png",
    "write_json",
    "write_text",
    "read_label_png",
    "result_record",
    "rle_encode",
    "rle_decode",
    "rle_records",
    "write_rle_json",
    "overlay_image",
    "write_overlay",
    "legend_font",
    "legend_entries",
    "legend_text",
    "legend_image",
    "write_legend",
]


def palette(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 colours: the PASCAL VOC bit-interleaving colour map (0 is black, no other is)."""
    colours = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colours[i] = (r, g, b)
    return colours


def class_colours(n: int, background: bool = False) -> np.ndarray:
    """``(n, 3)`` uint8 colours of ``n`` classes: black is kept for unlabeled pixels and a background class.

    With a ``background`` class 0, the VOC colour map as is (class 0 black, as in the benchmarks' label files);
    otherwise class ``i`` gets VOC colour ``i + 1``, so no class is drawn black.
    """
    return palette(n) if background else palette(n + 1)[1:]


UNLABELED_PNG = (255, 65535)
"""The value of unlabeled pixels in 8-bit (palettized) and in 16-bit label PNGs."""


def output_error(path: str | Path, e: OSError) -> OutputError:
    """``e``, met while writing ``path``, as a one-line :class:`~gclip.errors.OutputError` (same ``errno``)."""
    if isinstance(e, OutputError):
        return e
    error = OutputError(f"cannot write {path} ({e.strerror or e})")
    error.errno = e.errno
    return error


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Raises:
        OutputError: the folder cannot be created or written, or the block raised an :class:`OSError` (a full
            disk, ...); the temporary file is removed and ``path`` is left as it was.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise output_error(path, e) from e
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise output_error(path, e) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_label_png(labels: np.ndarray, path: str | Path, background: bool = False) -> Path:
    """Save ``(H, W)`` labels as a PNG: palettized (mode ``P``) when they fit in 0..254, else 16-bit grayscale.

    Unlabeled pixels (``-1``) are stored as 255 (8-bit, drawn black) or 65535 (16-bit). The palette is
    :func:`class_colours`: ``background`` draws class 0 black (the VOC colours), otherwise no class is black.
    """
    labels = np.asarray(labels)
    if labels.min(initial=0) < -1 or labels.max(initial=0) > 65534:
        raise ValueError("labels must be within 0..65534 (or -1: unlabeled)")
    if labels.max(initial=0) < UNLABELED_PNG[0]:
        img = Image.fromarray(np.where(labels < 0, UNLABELED_PNG[0], labels).astype(np.uint8), mode="P")
        colours = np.zeros((256, 3), dtype=np.uint8)  # 255 (unlabeled) stays black
        colours[:255] = class_colours(255, background)
        img.putpalette(colours.flatten().tolist())
    else:
        img = Image.fromarray(np.where(labels < 0, UNLABELED_PNG[1], labels).astype(np.uint16))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def read_label_png(path: str | Path) -> np.ndarray:
    """Labels back from :func:`write_label_png` (palette indices, not colours; unlabeled pixels as ``-1``)."""
    with Image.open(path) as img:
        palettized = img.mode == "P"
        labels = np.asarray(img).astype(np.int32)
    labels[labels == UNLABELED_PNG[0 if palettized else 1]] = -1
    return labels


def write_text(text: str, path: str | Path) -> Path:
    """Write UTF-8 text atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(data: Any, path: str | Path) -> Path:
    """Write JSON atomically (UTF-8, indented)."""
    return write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", path)


def result_record(result: SegmentationResult) -> dict[str, Any]:
    """The JSON written beside a label PNG."""
    record = {
        "size": list(result.size),
        "class_names": result.class_names,
        "present": {k: round(v, 6) for k, v in result.class_fractions().items()},
    }
    if result.unlabeled_fraction:
        record["unlabeled"] = round(result.unlabeled_fraction, 6)
    return record


# --- COCO run-length encoding ---------------------------------------------------------------------------------


def rle_counts(mask: np.ndarray) -> list[int]:
    """Run lengths of a ``(H, W)`` bool mask in column-major order, starting with a run of zeros (COCO RLE)."""
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    if flat.size == 0:
        return []
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate(([0], changes, [flat.size]))).tolist()
    return [0, *counts] if flat[0] else counts


def _counts_to_string(counts: list[int]) -> str:
    """COCO's compact RLE string: deltas against the run two back, 5 bits per character from ``'0'``."""
    chars = []
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = x != -1 if c & 0x10 else x != 0
            chars.append(chr((c | 0x20 if more else c) + 48))
    return "".join(chars)


def _string_to_counts(text: str) -> list[int]:
    counts: list[int] = []
    p = 0
    while p < len(text):
        x, k, more = 0, 0, True
        while more:
            c = ord(text[p]) - 48
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        counts.append(x + counts[-2] if len(counts) > 2 else x)
    return counts


def rle_encode(mask: np.ndarray) -> dict[str, Any]:
    """``(H, W)`` bool mask -> COCO compressed RLE ``{"size": [H, W], "counts": str}``.

    Uses pycocotools when installed (``pip install gclip[coco]``), otherwise an equivalent numpy encoder;
    both give the same string, which ``pycocotools.mask.decode`` reads back.

    >>> rle_encode(np.array([[0, 1], [1, 1]], dtype=bool))
    {'size': [2, 2], 'counts': '13'}
    """
    mask = np.asarray(mask, dtype=bool)
    try:
        from pycocotools import mask as mask_utils
    except ImportError:
        return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": _counts_to_string(rle_counts(mask))}
    rle = mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def rle_decode(rle: dict[str, Any]) -> np.ndarray:
    """COCO RLE (compressed string or uncompressed list of counts) -> ``(H, W)`` bool mask."""
    h, w = (int(v) for v in rle["size"])
    counts = rle["counts"]
    if isinstance(counts, bytes):
        counts = counts.decode("ascii")
    if isinstance(counts, str):
        counts = _string_to_counts(counts)
    values = np.zeros(len(counts), dtype=bool)
    values[1::2] = True
    flat = np.repeat(values, counts)
    if flat.size != h * w:
        raise ValueError(f"RLE counts cover {flat.size} pixels, expected {h}x{w}")
    return flat.reshape((h, w), order="F")


def rle_records(result: SegmentationResult) -> list[dict[str, Any]]:
    """One COCO-style record per class present: id (= label index), name, RLE, area, XYWH bbox, mean probability.

    ``mean_probability`` is the class's mean probability over its pixels when ``result.probs`` is set, else
    ``None``.
    """
    records = []
    labels = result.labels
    flat = labels.ravel()
    counts = np.bincount(flat[flat >= 0], minlength=len(result.class_names))  # unlabeled pixels: no record
    for index in np.flatnonzero(counts):
        mask = labels == index
        ys, xs = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        mean_prob = None
        if result.probs is not None:
            mean_prob = round(float(result.probs[index][mask].mean(dtype=np.float64)), 4)
        records.append(
            {
                "category_id": int(index),
                "category_name": result.class_names[index],
                "segmentation": rle_encode(mask),
                "area": int(counts[index]),
                "bbox": [int(xs[0]), int(ys[0]), int(xs[-1] - xs[0] + 1), int(ys[-1] - ys[0] + 1)],
                "mean_probability": mean_prob,
            }
        )
    return records


def write_rle_json(result: SegmentationResult, path: str | Path, image: str | None = None) -> Path:
    """Write ``{"image", "height", "width", "categories", "annotations"}`` with :func:`rle_records` (atomic)."""
    h, w = result.size
    data = {
        "image": image,
        "height": h,
        "width": w,
        "categories": [{"id": i, "name": n} for i, n in enumerate(result.class_names)],
        "annotations": rle_records(result),
    }
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")) + "\n", encoding="utf-8")
    return Path(path)


# --- colour overlay and its legend ------------------------------------------------------------------------------

#: Fonts tried for legends, first found wins: ``GCLIP_FONT``, then DejaVu Sans (matplotlib's copy, then the
#: system's), which draws Latin, Greek and Cyrillic names; names in other scripts need ``GCLIP_FONT`` set to a
#: font that has them (e.g. a Noto CJK file). Without any, Pillow's own font is used.
FONT_CANDIDATES = (
    "mpl-data/fonts/ttf/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/Library/Fonts/DejaVuSans.ttf",
    "C:/Windows/Fonts/DejaVuSans.ttf",
)


def legend_font(size: int = 14) -> Any:
    """The legend's font (see :data:`FONT_CANDIDATES`) at ``size`` pixels."""
    import importlib.util

    from PIL import ImageFont

    paths = [os.environ.get("GCLIP_FONT", "")]
    spec = importlib.util.find_spec("matplotlib")
    for candidate in FONT_CANDIDATES:
        if candidate.startswith("mpl-data/"):
            if spec is not None and spec.origin is not None:
                paths.append(str(Path(spec.origin).parent / candidate))
        else:
            paths.append(candidate)
    for path in paths:
        if path and Path(path).is_file():
            try:
                return ImageFont.truetype(path, size)
            except OSError:
                continue
    return ImageFont.load_default(size)


def legend_entries(
    labels: np.ndarray, class_names: list[str], background: bool = False
) -> list[tuple[str, tuple[int, int, int], float]]:
    """``(name, colour, fraction of the pixels)`` of each class present, largest first, then ``unlabeled``."""
    colours = class_colours(len(class_names), background)
    flat = np.asarray(labels).ravel()
    counts = np.bincount(flat[flat >= 0], minlength=len(class_names))
    total = max(1, flat.size)
    order = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    entries = [(class_names[i], tuple(int(v) for v in colours[i]), counts[i] / total) for i in order]
    unlabeled = int((flat < 0).sum())
    if unlabeled:
        entries.append(("unlabeled", (0, 0, 0), unlabeled / total))
    return entries  # type: ignore[return-value]


def legend_text(name: str, fraction: float) -> str:
    """A legend row's text: ``"cat 12.3%"``."""
    return f"{name} {fraction:.1%}"


def legend_image(labels: np.ndarray, class_names: list[str], background: bool = False) -> Image.Image:
    """The legend of a label map: per class present a swatch and ``name 12.3%``, largest first."""
    from PIL import ImageDraw

    entries = legend_entries(labels, class_names, background)
    font = legend_font()
    pad, swatch = 6, 16
    texts = [legend_text(name, fraction) for name, _, fraction in entries]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    widths = [probe.textbbox((0, 0), t, font=font)[2] for t in texts] or [0]
    line = swatch + pad
    canvas = Image.new("RGB", (3 * pad + swatch + max(widths), pad + line * max(1, len(entries))), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for row, ((_, colour, _), text) in enumerate(zip(entries, texts)):
        y = pad + row * line
        draw.rectangle((pad, y, pad + swatch - 1, y + swatch - 1), fill=colour, outline=(0, 0, 0))
        draw.text((2 * pad + swatch, y), text, fill=(0, 0, 0), font=font)
    return canvas


def _blend(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float, drawn: np.ndarray) -> np.ndarray:
    """``image`` with ``colours[labels]`` blended in where ``drawn``."""
    try:
        import supervision as sv
    except ImportError:
        mixed = image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha
        mixed = np.where(drawn[..., None], mixed, image.astype(np.float32))
        return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    present = np.flatnonzero(np.bincount(labels[drawn], minlength=1))
    if not len(present):
        return image.copy()
    masks = np.stack([(labels == i) & drawn for i in present])
    detections = sv.Detections(xyxy=sv.mask_to_xyxy(masks), mask=masks, class_id=present.astype(int))
    palette_ = sv.ColorPalette([sv.Color(*(int(v) for v in colours[i])) for i in range(int(present.max()) + 1)])
    annotator = sv.MaskAnnotator(color=palette_, opacity=alpha, color_lookup=sv.ColorLookup.CLASS)
    # A PIL scene is taken as RGB (a numpy scene would be read as OpenCV's BGR).
    return np.asarray(annotator.annotate(scene=Image.fromarray(image), detections=detections).convert("RGB"))


def overlay_image(
    image: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.5, background: bool = False
) -> Image.Image:
    """Colour ``(H, W)`` labels over an ``HxWx3 uint8 RGB`` image -> an image of the photo's size.

    Colours are :func:`class_colours`; unlabeled pixels (``-1``) and a ``background`` class 0 are left
    uncoloured. The blend is drawn with supervision's ``MaskAnnotator`` when supervision is installed, else as
    a plain alpha blend. The legend is its own image (:func:`legend_image`).
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = class_colours(len(class_names), background)
    drawn = labels >= (1 if background else 0)
    blended = _blend(np.ascontiguousarray(image[..., :3]), np.where(drawn, labels, 0), colours, alpha, drawn)
    return Image.fromarray(blended)


def write_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    class_names: list[str],
    path: str | Path,
    alpha: float = 0.5,
    background: bool = False,
) -> Path:
    """Save :func:`overlay_image` as a PNG (atomic)."""
    img = overlay_image(image, labels, class_names, alpha, background)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def write_legend(labels: np.ndarray, class_names: list[str], path: str | Path, background: bool = False) -> Path:
    """Save :func:`legend_image` as a PNG (atomic)."""
    img = legend_image(labels, class_names, background)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)

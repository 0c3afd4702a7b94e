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
]


def palette(n: int = 256) -> np.ndarray:
    """``(n, 3)`` uint8 colours: the PASCAL VOC bit-interleaving colour map (0 is black)."""
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


def write_label_png(labels: np.ndarray, path: str | Path) -> Path:
    """Save ``(H, W)`` labels as a PNG: palettized (mode ``P``) when they fit 8 bits, else 16-bit grayscale."""
    labels = np.asarray(labels)
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 65535:
        raise ValueError("labels must be within 0..65535")
    if labels.max(initial=0) < 256:
        img = Image.fromarray(labels.astype(np.uint8), mode="P")
        img.putpalette(palette(256).flatten().tolist())
    else:
        img = Image.fromarray(labels.astype(np.uint16))
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)


def read_label_png(path: str | Path) -> np.ndarray:
    """Labels back from :func:`write_label_png` (palette indices, not colours)."""
    with Image.open(path) as img:
        return np.asarray(img).astype(np.int32)


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
    return {
        "size": list(result.size),
        "class_names": result.class_names,
        "present": {k: round(v, 6) for k, v in result.class_fractions().items()},
    }


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
    counts = np.bincount(labels.ravel(), minlength=len(result.class_names))
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


# --- colour overlay with a legend --------------------------------------------------------------------------------


def _legend(img: Image.Image, entries: list[tuple[str, tuple[int, int, int], float]]) -> Image.Image:
    """Append a legend strip below ``img``: a swatch, the class name and its share of the pixels per row."""
    from PIL import ImageDraw, ImageFont

    font = ImageFont.load_default()
    pad, swatch = 4, 12
    texts = [f"{name} {fraction:.1%}" for name, _, fraction in entries]
    probe = ImageDraw.Draw(img)
    widths = [probe.textbbox((0, 0), t, font=font)[2] for t in texts] or [0]
    line = swatch + pad
    width = max(img.width, 3 * pad + swatch + max(widths))
    canvas = Image.new("RGB", (width, img.height + pad + line * len(entries)), (255, 255, 255))
    canvas.paste(img, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for row, ((_, colour, _), text) in enumerate(zip(entries, texts)):
        y = img.height + pad + row * line
        draw.rectangle((pad, y, pad + swatch - 1, y + swatch - 1), fill=colour, outline=(0, 0, 0))
        draw.text((2 * pad + swatch, y), text, fill=(0, 0, 0), font=font)
    return canvas


def _blend(image: np.ndarray, labels: np.ndarray, colours: np.ndarray, alpha: float) -> np.ndarray:
    try:
        import supervision as sv
    except ImportError:
        mixed = image.astype(np.float32) * (1 - alpha) + colours[labels].astype(np.float32) * alpha
        return np.clip(np.round(mixed), 0, 255).astype(np.uint8)
    present = np.flatnonzero(np.bincount(labels.ravel()))
    masks = np.stack([labels == i for i in present])
    detections = sv.Detections(xyxy=sv.mask_to_xyxy(masks), mask=masks, class_id=present.astype(int))
    palette_ = sv.ColorPalette([sv.Color(*(int(v) for v in colours[i])) for i in range(int(present.max()) + 1)])
    annotator = sv.MaskAnnotator(color=palette_, opacity=alpha, color_lookup=sv.ColorLookup.CLASS)
    # A PIL scene is taken as RGB (a numpy scene would be read as OpenCV's BGR).
    return np.asarray(annotator.annotate(scene=Image.fromarray(image), detections=detections).convert("RGB"))


def overlay_image(image: np.ndarray, labels: np.ndarray, class_names: list[str], alpha: float = 0.5) -> Image.Image:
    """Colour ``(H, W)`` labels over an ``HxWx3 uint8 RGB`` image and add a legend of the classes present.

    The blend is drawn with supervision's ``MaskAnnotator`` when supervision is installed, else as a plain
    alpha blend; colours are :func:`palette` (class 0 is black).
    """
    if image.shape[:2] != labels.shape:
        raise ValueError(f"image {image.shape[:2]} and labels {labels.shape} differ in size")
    colours = palette(max(256, len(class_names)))
    blended = _blend(np.ascontiguousarray(image[..., :3]), labels, colours, alpha)
    counts = np.bincount(labels.ravel(), minlength=len(class_names))
    order = sorted(np.flatnonzero(counts), key=lambda i: (-counts[i], i))
    total = max(1, labels.size)
    entries = [(class_names[i], tuple(int(v) for v in colours[i]), counts[i] / total) for i in order]
    return _legend(Image.fromarray(blended), entries)


def write_overlay(
    image: np.ndarray, labels: np.ndarray, class_names: list[str], path: str | Path, alpha: float = 0.5
) -> Path:
    """Save :func:`overlay_image` as a PNG (atomic)."""
    img = overlay_image(image, labels, class_names, alpha)
    with atomic_path(path) as tmp:
        img.save(tmp, format="PNG")
    return Path(path)

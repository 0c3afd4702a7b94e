"""The batch loop of every bulk run: several prepared images per model call, one failure never sinks the others."""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import ImageError
from ..inference.preprocess import Prepared
from ..inference.result import SegmentationResult
from ..inference.segmenter import Segmenter

__all__ = ["infer_batch", "one_line_error"]


def one_line_error(e: BaseException, name: str, path: str | None = None) -> str:
    """The one-line report of an image that failed: ``<name>: <what went wrong>``.

    Args:
        e: the exception.
        name: how the image is named in reports (a file, or ``shard.tar:member``).
        path: its file, when an :class:`~gclip.errors.ImageError` naming that file is already a full report
            (default: ``name``).

    >>> one_line_error(RuntimeError("out of memory\\nmore"), "a.jpg")
    'a.jpg: RuntimeError: out of memory'
    """
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    if isinstance(e, ImageError):
        return text if (path or name) in text else f"{name}: {text}"
    return f"{name}: {type(e).__name__}: {text}"


def infer_batch(
    segmenter: Segmenter, prepared: Sequence[Prepared], names: Sequence[str], return_probs: bool = False
) -> list[SegmentationResult | str]:
    """Segment prepared images in one :meth:`Segmenter.infer` call; when that call fails, each image alone.

    Args:
        segmenter: a Segmenter with classes set.
        prepared: the images (:meth:`Segmenter.prepare` or its preprocessor in a worker).
        names: one per image, for the reports (see :func:`one_line_error`).
        return_probs: compute ``(C, H, W)`` probabilities.

    Returns:
        One entry per image, in order: its result, or the one-line reason it failed.
    """
    if not prepared:
        return []
    try:
        return list(segmenter.infer(list(prepared), return_probs))
    except Exception as e:  # noqa: BLE001 - isolate the image that breaks the batch
        if len(prepared) == 1:
            return [one_line_error(e, names[0])]
    out: list[SegmentationResult | str] = []
    for p, name in zip(prepared, names):
        try:
            out.extend(segmenter.infer([p], return_probs))
        except Exception as e:  # noqa: BLE001
            out.append(one_line_error(e, name))
    return out

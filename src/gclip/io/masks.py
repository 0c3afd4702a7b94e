"""Instance and region masks for the methods that need class-agnostic regions of an image (CorrCLIP, TextRegion).

An instance mask is an ``(H, W)`` integer map at the image's size: each region one value, the smallest value the
union of the unsegmented pixels. It comes from a folder of pre-generated masks (``<stem>.npz`` with an
``instance_mask`` array, CorrCLIP's published SAM2 masks, or ``<stem>.png`` with the ids as grey levels) or from
SAM's automatic mask generator (Meta's ``segment-anything`` package, extra ``sam``), its masks painted from the
smallest area up, as CorrCLIP paints SAM2's.

Region masks are an ``(R, H, W)`` float stack that may overlap and be soft (TextRegion's SAM 2 masks): a
``<stem>.npz`` with a ``region_masks`` array, or any instance-mask file (one 0/1 mask per region but the
unsegmented one); or the generator's masks, most confident first, overlapping ones fused (:func:`fuse_masks`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..backbones.models import resolve_device
from ..backbones.weights import check_sidecar, find_weights, read_checkpoint
from ..errors import ConfigError, ImageError, WeightsError

__all__ = [
    "MASK_MODELS",
    "register_mask_model",
    "mask_folder",
    "read_instance_mask",
    "paint_masks",
    "load_sam",
    "generate_instance_mask",
    "read_region_masks",
    "generate_region_masks",
    "fuse_masks",
]

MASK_MODELS: dict[str, str | Callable[[], nn.Module]] = {"sam_vitb": "vit_b", "sam_vitl": "vit_l", "sam_vith": "vit_h"}
"""Mask generators by name: a ``segment_anything.sam_model_registry`` entry, or a builder of a whole ``Sam``."""


def register_mask_model(name: str, build: str | Callable[[], nn.Module]) -> None:
    """Make a SAM model available as a mask generator (``build``: a registry name or a ``() -> Sam`` builder)."""
    MASK_MODELS[name] = build
    load_sam.cache_clear()


def read_instance_mask(folder: str | Path, key: Any, size: tuple[int, int]) -> np.ndarray:
    """The pre-generated mask of the image ``key`` (a path or a name: its stem is looked up) in ``folder``.

    Raises:
        ImageError: no file for the image, an unreadable file, or a mask of another size than ``size`` (one line).
    """
    mask = _read_mask_file(folder, key, size, "instance_mask")
    if mask.ndim != 2:
        raise ImageError(f"instance mask of {key} has {mask.ndim} axes: expected an (H, W) map")
    return mask.astype(np.int64)


def read_region_masks(folder: str | Path, key: Any, size: tuple[int, int]) -> np.ndarray:
    """The pre-generated ``(R, H, W)`` float32 region masks of the image ``key`` in ``folder``: a ``region_masks``
    array, or an instance mask split into one 0/1 mask per region (the unsegmented, smallest value, left out).

    Raises:
        ImageError: as :func:`read_instance_mask`.
    """
    masks = _read_mask_file(folder, key, size, "region_masks", "instance_mask")
    if masks.ndim == 3:
        return masks.astype(np.float32)
    values = np.unique(masks)[1:]
    return (masks[None] == values[:, None, None]).astype(np.float32)


def _read_mask_file(folder: str | Path, key: Any, size: tuple[int, int], *arrays: str) -> np.ndarray:
    """The first of ``arrays`` in the image's ``<stem>.npz`` (or its ``.png``), checked to be at ``size``."""
    folder = mask_folder(folder)
    if key is None or not isinstance(key, (str, Path, int)):
        raise ImageError(
            f"no instance mask for an in-memory image: segment files (their stems name the masks in {folder})"
        )
    stem = Path(str(key)).stem if not isinstance(key, int) else str(key)
    path = _find_mask(folder, stem)
    if path is None:
        raise ImageError(
            f"no instance mask for {stem} in {folder}: expected {stem}.npz (array {' or '.join(map(repr, arrays))}) "
            "or .png"
        )
    try:
        if path.suffix == ".npz":
            with np.load(path) as data:
                name = next((a for a in arrays if a in data.files), arrays[0])
                mask = np.asarray(data[name])
        else:
            from PIL import Image

            with Image.open(path) as im:
                mask = np.asarray(im)
    except Exception as e:  # noqa: BLE001 - any unreadable file: one line
        raise ImageError(f"instance mask {path} is unreadable ({type(e).__name__}: {e})") from None
    if mask.ndim not in (2, 3) or tuple(mask.shape[-2:]) != tuple(size):
        raise ImageError(f"instance mask {path} is {'x'.join(map(str, mask.shape))}, its image {size[0]}x{size[1]}")
    return mask


def mask_folder(folder: str | Path) -> Path:
    """``folder`` as a path, checked to be a folder (one-line :class:`~gclip.errors.ConfigError` otherwise)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"masks folder {folder} does not exist: pass the folder of pre-generated <stem>.npz masks")
    return folder


def _find_mask(folder: Path, stem: str) -> Path | None:
    """``<folder>/<stem>.npz`` (or ``.png``), else the same in its subfolders (sorted; e.g. CorrCLIP's region_masks
    root with voc, context, coco, city, ade), which are listed once per folder."""
    for where in _places(folder):
        for suffix in (".npz", ".png"):
            if (where / f"{stem}{suffix}").is_file():
                return where / f"{stem}{suffix}"
    return None


def _places(folder: Path) -> Iterator[Path]:
    yield folder  # first, before any listing
    yield from _subfolders(folder)


@functools.lru_cache(maxsize=8)
def _subfolders(folder: Path) -> tuple[Path, ...]:
    return tuple(sorted(p for p in folder.iterdir() if p.is_dir()))


def paint_masks(masks: list[dict[str, Any]], size: tuple[int, int]) -> np.ndarray:
    """Generator records (``segmentation`` bool arrays, ``area``) -> an instance mask: 0 unsegmented, the masks
    numbered 1.. from the smallest area up, each painted over the ones before it."""
    out = np.zeros(size, dtype=np.int64)
    for number, record in enumerate(sorted(masks, key=lambda r: r["area"]), start=1):
        out[np.asarray(record["segmentation"], dtype=bool)] = number
    return out


@functools.lru_cache(maxsize=2)
def load_sam(
    name: str, checkpoint: str | None, device: str | torch.device | None = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """A whole SAM (image encoder, prompt encoder, mask decoder) for the automatic mask generator, built by
    ``segment-anything`` and loaded from ``checkpoint`` (e.g. ``sam_vit_b_01ec64.pth``), else from gclip's weights
    folder (``gclip download NAME``); found, read and refused as every weights file is
    (:mod:`gclip.backbones.weights`); cached per process."""
    if name not in MASK_MODELS:
        raise ConfigError(f"unknown mask generator {name!r}: choose one of {', '.join(MASK_MODELS)}")
    if not checkpoint:
        checkpoint = find_weights(
            f"mask generator {name}", name, "sam_checkpoint", example="SAM's sam_vit_b_01ec64.pth"
        )
    check_sidecar(
        checkpoint,
        f"mask generator {name}",
        lambda s: (s.get("kind"), s.get("name")) == ("sam", name),
        f"pass {name}'s file to sam_checkpoint (`gclip download {name}` fetches it)",
    )
    build = MASK_MODELS[name]
    if isinstance(build, str):
        try:
            from segment_anything import sam_model_registry
        except ImportError:
            raise ConfigError(f"mask generator {name} needs SAM's package: pip install 'gclip[sam]'") from None
        model = sam_model_registry[build](checkpoint=None)
    else:
        model = build()
    state, _ = read_checkpoint(checkpoint, "sam_checkpoint")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0].strip()[:160]
        raise WeightsError(f"checkpoint {checkpoint} does not fit mask generator {name}: {first}") from e
    return model.to(device=resolve_device(device), dtype=dtype).eval().requires_grad_(False)


def generate_instance_mask(
    sam: nn.Module, pixels: np.ndarray, points_per_side: int, pred_iou_thresh: float, stability_score_thresh: float
) -> np.ndarray:
    """``HxWx3 uint8`` pixels -> an instance mask from ``SamAutomaticMaskGenerator`` (its points in one batch)."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=points_per_side,
        points_per_batch=points_per_side * points_per_side,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
    )
    with torch.no_grad():
        masks = generator.generate(np.ascontiguousarray(pixels))
    return paint_masks(masks, pixels.shape[:2])


def generate_region_masks(
    sam: nn.Module,
    pixels: np.ndarray,
    points_per_side: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    box_nms_thresh: float,
    fuse_threshold: float | None,
) -> np.ndarray:
    """``HxWx3 uint8`` pixels -> ``(R, H, W)`` float32 0/1 region masks from ``SamAutomaticMaskGenerator``, the most
    confident (predicted IoU) first, overlapping ones fused (:func:`fuse_masks`) unless ``fuse_threshold`` is
    ``None``."""
    from segment_anything import SamAutomaticMaskGenerator

    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=points_per_side,
        points_per_batch=points_per_side * points_per_side,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        box_nms_thresh=box_nms_thresh,
    )
    with torch.no_grad():
        records = generator.generate(np.ascontiguousarray(pixels))
    records = sorted(records, key=lambda r: -r["predicted_iou"])
    if not records:
        return np.zeros((0, *pixels.shape[:2]), np.float32)
    masks = torch.from_numpy(np.stack([np.asarray(r["segmentation"], np.float32) for r in records]))
    if fuse_threshold is not None:
        masks = fuse_masks(masks, torch.tensor([r["bbox"] for r in records], dtype=torch.float32), fuse_threshold)
    return masks.numpy()


def fuse_masks(masks: torch.Tensor, boxes: torch.Tensor, threshold: float) -> torch.Tensor:
    """TextRegion's fusion of overlapping masks: in order, each mask not yet taken takes the later ones whose box
    overlaps its own (IoU > 0.2) and which it contains, or is contained in, by more than ``threshold`` (the
    intersection over the smaller area), and becomes their pixel-wise maximum. Empty masks are dropped.

    Args:
        masks: ``(R, H, W)`` masks, in order of preference.
        boxes: ``(R, 4)`` their boxes, ``(x, y, w, h)``.
    """
    keep = masks.abs().sum(dim=(1, 2)) > 0
    masks, boxes = masks[keep], boxes[keep]
    corners = torch.cat([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], dim=1)
    low = torch.maximum(corners[:, None, :2], corners[None, :, :2])
    high = torch.minimum(corners[:, None, 2:], corners[None, :, 2:])
    inter = (high - low).clamp(min=0).prod(dim=-1)
    area = (corners[:, 2:] - corners[:, :2]).clamp(min=0).prod(dim=-1)
    iou = inter / (area[:, None] + area[None, :] - inter + 1e-8)
    sizes = masks.sum(dim=(1, 2))
    free = torch.ones(len(masks), dtype=torch.bool)
    fused = []
    for i in range(len(masks)):
        if not free[i]:
            continue
        free[i] = False
        group = [i]
        for j in torch.nonzero((iou[i] > 0.2) & free).flatten().tolist():
            smaller = torch.minimum(sizes[i], sizes[j])
            if smaller >= 1e-8 and torch.minimum(masks[i], masks[j]).sum() / smaller > threshold:
                group.append(j)
        free[group] = False
        fused.append(masks[group].amax(dim=0))
    return torch.stack(fused) if fused else masks

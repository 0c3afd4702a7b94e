"""Instance and region masks for the methods that need class-agnostic regions of an image (CorrCLIP, TextRegion).

An instance mask is an ``(H, W)`` integer map at the image's size: each region one value, the smallest value the
union of the unsegmented pixels. It comes from a folder of pre-generated masks (``<stem>.npz`` with an
``instance_mask`` array, CorrCLIP's published SAM2 masks, or ``<stem>.png`` with the ids as grey levels) or from an
automatic mask generator, its masks painted from the smallest area up, as CorrCLIP paints SAM2's: SAM's
(``segment-anything``, extra ``sam``: ``sam_vitb``, ...) or SAM 2's (``sam2``, extra ``sam2``: ``sam2_hiera_l``,
``sam2.1_hiera_l``, ...; one mask per point prompt, as CorrCLIP's code asks SAM 2 for).

Region masks are an ``(R, H, W)`` float stack that may overlap and be soft (TextRegion's SAM 2 masks): a
``<stem>.npz`` with a ``region_masks`` array, or any instance-mask file (one 0/1 mask per region but the
unsegmented one); or the generator's masks, most confident first, overlapping ones fused (:func:`fuse_masks`). With a
SAM 2 model they are made as TextRegion's own generator makes them (:func:`sam2_region_masks`): soft, from the
decoder's low-resolution logits.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
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
    "is_sam2",
    "sam2_region_masks",
]

SAM2_CONFIGS = {
    **{f"sam2_hiera_{s}": f"configs/sam2/sam2_hiera_{s}.yaml" for s in ("t", "s", "b+", "l")},
    **{f"sam2.1_hiera_{s}": f"configs/sam2.1/sam2.1_hiera_{s}.yaml" for s in ("t", "s", "b+", "l")},
}
"""SAM 2 (July 2024) and SAM 2.1 (September 2024) models by gclip's name: their config in the ``sam2`` package
(Hiera tiny, small, base+ and large)."""

MASK_MODELS: dict[str, str | Callable[[], nn.Module]] = {
    "sam_vitb": "vit_b",
    "sam_vitl": "vit_l",
    "sam_vith": "vit_h",
    **SAM2_CONFIGS,
}
"""Mask generators by name: a ``segment_anything.sam_model_registry`` entry, a ``sam2`` config (``.yaml``), or a
builder of a whole ``Sam`` or ``SAM2Base``."""

SAM2_MIN_AREA = 100
"""TextRegion's generator drops the masks of at most this many pixels on the decoder's 256 x 256 logit grid."""
SAM2_POINTS_PER_BATCH = 64
"""Point prompts decoded at once by the SAM 2 generators (memory and speed: TextRegion's code decodes all of them at
once, CorrCLIP's 64; its masks equal the authors' within one fp16 step, tests/test_sam2_masks.py)."""


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
    """A whole SAM or SAM 2 (image encoder, prompt encoder, mask decoder) for the automatic mask generator, built by
    ``segment-anything`` or ``sam2`` (its config, no post-processing, as TextRegion and CorrCLIP build it) and loaded
    strictly from ``checkpoint`` (e.g. ``sam_vit_b_01ec64.pth``, ``sam2.1_hiera_large.pt``), else from gclip's
    weights folder (``gclip download NAME``); found, read and refused as every weights file is
    (:mod:`gclip.backbones.weights`); cached per process.

    Raises:
        ConfigError: an unknown name, or its package missing (one line naming the extra).
        WeightsError: no file, an unreadable one, or one that does not fit the model (one line naming the flag).
    """
    if name not in MASK_MODELS:
        raise ConfigError(f"unknown mask generator {name!r}: choose one of {', '.join(MASK_MODELS)}")
    build = MASK_MODELS[name]
    sam2 = isinstance(build, str) and build.endswith(".yaml")
    if not checkpoint:
        usual = f"SAM 2's {_SAM2_FILES[name]}" if sam2 else "SAM's sam_vit_b_01ec64.pth"
        checkpoint = find_weights(f"mask generator {name}", name, "sam_checkpoint", example=usual)
    check_sidecar(
        checkpoint,
        f"mask generator {name}",
        lambda s: (s.get("kind"), s.get("name")) == ("sam", name),
        f"pass {name}'s file to sam_checkpoint (`gclip download {name}` fetches it)",
    )
    if sam2:
        try:
            from sam2.build_sam import build_sam2
        except ImportError:
            raise ConfigError(f"mask generator {name} needs SAM 2's package: pip install 'gclip[sam2]'") from None
        model = build_sam2(build, None, device="cpu", apply_postprocessing=False)
    elif isinstance(build, str):
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
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        first = " ".join(lines[:2])[:200]  # torch's heading, then the first missing or unexpected keys
        raise WeightsError(f"checkpoint {checkpoint} does not fit mask generator {name}: {first}") from e
    return model.to(device=resolve_device(device), dtype=dtype).eval().requires_grad_(False)


_SAM2_FILES = {
    name: name.replace("_hiera_t", "_hiera_tiny")
    .replace("_hiera_s", "_hiera_small")
    .replace("_hiera_b+", "_hiera_base_plus")
    .replace("_hiera_l", "_hiera_large")
    + ".pt"
    for name in SAM2_CONFIGS
}
"""The published file of each SAM 2 model (``sam2.1_hiera_l`` -> ``sam2.1_hiera_large.pt``)."""


def is_sam2(model: nn.Module) -> bool:
    """Whether ``model`` is a SAM 2 (``sam2``'s ``SAM2Base``: a prompt encoder and mask decoder named ``sam_*``)."""
    return hasattr(model, "sam_mask_decoder") and hasattr(model, "forward_image")


def generate_instance_mask(
    sam: nn.Module, pixels: np.ndarray, points_per_side: int, pred_iou_thresh: float, stability_score_thresh: float
) -> np.ndarray:
    """``HxWx3 uint8`` pixels -> an instance mask from ``SamAutomaticMaskGenerator`` (its points in one batch), or
    for a SAM 2 from ``SAM2AutomaticMaskGenerator`` with one mask per point (``multimask_output=False``, CorrCLIP's
    setting; its other settings sam2's defaults)."""
    if is_sam2(sam):
        from sam2.automatic_mask_generator import SAM2AutomaticMaskGenerator

        generator = SAM2AutomaticMaskGenerator(
            sam,
            points_per_side=points_per_side,
            points_per_batch=SAM2_POINTS_PER_BATCH,
            pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
            multimask_output=False,
        )
        side = int(sam.image_size)  # its predictor's feature sizes are a 1024 px input's: those of this model's
        generator.predictor._bb_feat_sizes = [(side // s, side // s) for s in (4, 8, 16)]
    else:
        generator = _sam_generator(sam, points_per_side, pred_iou_thresh, stability_score_thresh)
    with torch.no_grad():
        masks = generator.generate(np.ascontiguousarray(pixels))
    return paint_masks(masks, pixels.shape[:2])


def _sam_generator(sam: nn.Module, points_per_side: int, pred_iou_thresh: float, stability_score_thresh: float, **more):
    """segment-anything's ``SamAutomaticMaskGenerator`` with all its points in one batch (``more``: its other
    settings)."""
    from segment_anything import SamAutomaticMaskGenerator

    return SamAutomaticMaskGenerator(
        sam,
        points_per_side=points_per_side,
        points_per_batch=points_per_side * points_per_side,
        pred_iou_thresh=pred_iou_thresh,
        stability_score_thresh=stability_score_thresh,
        **more,
    )


def generate_region_masks(
    sam: nn.Module,
    pixels: np.ndarray,
    points_per_side: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    box_nms_thresh: float,
    fuse_threshold: float | None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """``HxWx3 uint8`` pixels -> ``(R, H, W)`` float32 0/1 region masks from ``SamAutomaticMaskGenerator``, the most
    confident (predicted IoU) first, overlapping ones fused (:func:`fuse_masks`) unless ``fuse_threshold`` is
    ``None``. A SAM 2 makes them with :func:`sam2_region_masks` (soft, at ``size``, default the pixels' size)."""
    if is_sam2(sam):
        return sam2_region_masks(
            sam,
            pixels,
            size or tuple(pixels.shape[:2]),
            points_per_side,
            pred_iou_thresh,
            stability_score_thresh,
            box_nms_thresh,
            fuse_threshold,
        ).numpy()
    generator = _sam_generator(
        sam, points_per_side, pred_iou_thresh, stability_score_thresh, box_nms_thresh=box_nms_thresh
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


@torch.no_grad()
def sam2_region_masks(
    sam: nn.Module,
    pixels: np.ndarray | torch.Tensor,
    size: tuple[int, int],
    points_per_side: int,
    pred_iou_thresh: float,
    stability_score_thresh: float,
    box_nms_thresh: float,
    fuse_threshold: float | None,
) -> torch.Tensor:
    """TextRegion's SAM 2 region masks: ``HxWx3`` pixels (0..255, the image SAM 2 sees) -> ``(R, *size)`` float32
    soft masks at the image's ``size`` (TextRegion: the model input, its masks at the original size).

    The pixels /255, resized (bilinear, no antialias) to SAM 2's square input and normalised with ImageNet's
    constants; a ``points_per_side`` grid of single-point prompts over the image, three masks each
    (``multimask_output``); kept on the decoder's 256 x 256 logits (clamped to +-32, in fp16): predicted IoU above
    ``pred_iou_thresh``, stability score (sam2's, offset 1) at least ``stability_score_thresh``, box NMS at
    ``box_nms_thresh`` (scores: the predicted IoU), more than :data:`SAM2_MIN_AREA` positive logits. The kept
    logits, clamped to 0..3, are resized (bilinear) to ``size``; they are ordered by the decoder's mask slot (whole
    objects, parts, sub-parts) and by predicted IoU within one, and fused (:func:`fuse_masks`, boxes on the
    logit grid) unless ``fuse_threshold`` is ``None``, which keeps the NMS order (by predicted IoU).
    """
    from sam2.utils.amg import batched_mask_to_box, build_point_grid, calculate_stability_score
    from sam2.utils.transforms import SAM2Transforms
    from torchvision.ops import batched_nms

    device = next(sam.parameters()).device
    h, w = int(size[0]), int(size[1])
    side = int(sam.image_size)
    transforms = SAM2Transforms(resolution=side, mask_threshold=0.0)
    image = torch.as_tensor(np.array(pixels, dtype=np.float32), device=device).permute(2, 0, 1)[None] / 255.0
    image = F.interpolate(image, size=(side, side), mode="bilinear", align_corners=False)
    mean = torch.tensor(transforms.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(transforms.std, device=device).view(1, 3, 1, 1)
    _, feats, _, _ = sam._prepare_backbone_features(sam.forward_image((image - mean) / std))
    if sam.directly_add_no_mem_embed:
        feats[-1] = feats[-1] + sam.no_mem_embed
    grids = [(side // s, side // s) for s in (4, 8, 16)]
    maps = [f.permute(1, 2, 0).reshape(1, -1, *g) for f, g in zip(feats, grids)]
    points = torch.as_tensor(build_point_grid(points_per_side) * np.array([w, h])[None], dtype=torch.float32)
    coords = transforms.transform_coords(points.to(device), normalize=True, orig_hw=(h, w))
    logits, scores = [], []
    for start in range(0, len(coords), SAM2_POINTS_PER_BATCH):
        batch = coords[start : start + SAM2_POINTS_PER_BATCH, None]
        labels = torch.ones(batch.shape[:2], dtype=torch.int, device=device)
        sparse, dense = sam.sam_prompt_encoder(points=(batch, labels), boxes=None, masks=None)
        low, iou, _, _ = sam.sam_mask_decoder(
            image_embeddings=maps[-1],
            image_pe=sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,
            repeat_image=len(batch) > 1,
            high_res_features=maps[:-1],
        )
        logits.append(low.clamp(-32.0, 32.0).half())
        scores.append(iou)
    slot_first = [2, 1, 0]  # the decoder's third mask (the whole object) first, as TextRegion orders them
    masks = torch.cat(logits).transpose(0, 1)[slot_first].flatten(0, 1)  # (3P, 256, 256): by slot, then point
    iou = torch.cat(scores).T[slot_first].flatten()
    slot = torch.tensor(slot_first, device=device).repeat_interleave(len(coords))
    keep = iou > pred_iou_thresh if pred_iou_thresh > 0 else torch.ones_like(iou, dtype=torch.bool)
    masks, iou, slot = masks[keep], iou[keep], slot[keep]
    if stability_score_thresh > 0:
        keep = calculate_stability_score(masks, 0.0, 1.0) >= stability_score_thresh
        masks, iou, slot = masks[keep], iou[keep], slot[keep]
    boxes = batched_mask_to_box(masks > 0)
    keep = batched_nms(boxes.float(), iou, torch.zeros_like(boxes[:, 0]), iou_threshold=box_nms_thresh)
    masks, iou, slot, boxes = masks[keep], iou[keep], slot[keep], boxes[keep]
    keep = (masks > 0).sum(dim=(1, 2)) > SAM2_MIN_AREA
    masks, iou, slot, boxes = masks[keep], iou[keep], slot[keep], boxes[keep]
    if not len(masks):
        return torch.zeros((0, h, w), dtype=torch.float32, device=device)
    masks = transforms.postprocess_masks(masks.clamp(0, 3)[:, None], (h, w))[:, 0].half().float()
    if fuse_threshold is None:
        return masks
    order = sorted(range(len(masks)), key=lambda i: (-int(slot[i]), -float(iou[i])))
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1)[order].float()
    return fuse_masks(masks[order], xywh, fuse_threshold)


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

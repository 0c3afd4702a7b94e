"""Measuring a backbone: where high-norm (global) tokens emerge and which FFN channel is abnormal.

The rules (also in the README, "Backbones and auto-configuration"):

- **High-norm token.** At the output of block ``i``, a patch token whose L2 norm is more than
  :data:`HIGH_NORM_RATIO` (4) times the median patch-token norm of the same image at the same block. The
  threshold is relative, so it does not depend on the scale of the residual stream (which grows with depth
  and differs between models); on random weights no token passes it.
- **Emerging block.** The first block ``b`` at whose output at least half of the calibration images hold a
  high-norm token, and where they are still there at the output of ``b + 1`` (registers persist once they
  appear; a one-block blip is not emergence). GCLIP fuses the attention of ``b`` and ``b + 1`` (at most
  ``L-2``). If no block qualifies, the default ({6, 7} of 12, same relative depth otherwise) is used.
- **Abnormal channel** (the weight rule of method.md). In block ``i`` it is the row of ``mlp.c_proj.weight``
  with the largest L2 norm; its ratio is that norm over the mean norm of the other rows. Channel
  Suppression is applied, in auto mode, in the blocks from the last emerging block to ``L-2`` whose ratio
  is at least :data:`CHANNEL_RATIO` (2). As a cross-check, the report also gives the channel with the
  largest mean absolute FFN output on the calibration images (activation rule).

The auto choice is cached per set of weights (a hash of the architecture and of a few weight tensors,
:func:`gclip.backbones.fingerprint`) in memory and on disk (``$GCLIP_CACHE_DIR/auto`` or ``~/.cache/gclip/auto``).
"""

from __future__ import annotations

import hashlib
import json
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..cache import cache_dir as shared_cache_dir
from ..inference.preprocess import OPENAI_MEAN, OPENAI_STD, pixel_constants
from ..inference.windows import resize_image
from ..io.images import ImageInput, load_image
from .base import FFN_OUT_WEIGHT, Backbone, fingerprint

__all__ = [
    "HIGH_NORM_RATIO",
    "CHANNEL_RATIO",
    "Measurement",
    "AutoSettings",
    "native_size",
    "calibration_images",
    "measure",
    "high_norm_mask",
    "first_emerging_block",
    "choose",
    "auto_settings",
    "cache_dir",
    "clear_auto_cache",
]

HIGH_NORM_RATIO = 4.0
MIN_IMAGE_FRACTION = 0.5
CHANNEL_RATIO = 2.0
RULE_VERSION = 1
_MEMORY: weakref.WeakKeyDictionary[nn.Module, dict[str, AutoSettings]] = weakref.WeakKeyDictionary()


CS_WEIGHT = FFN_OUT_WEIGHT
"""The FFN output weight whose abnormal row Channel Suppression removes."""


def default_emerging_blocks(depth: int) -> list[int]:
    """Blocks {6, 7} of a 12-block ViT, at the same relative depth for other depths (at most L-2)."""
    first = min(round(depth * 6 / 12), depth - 2)
    first = max(first, 0)
    return sorted({first, min(first + 1, depth - 2)})


def abnormal_channel(weight: torch.Tensor, rule: str = "mean") -> tuple[int, float]:
    """The residual channel whose FFN output row has the largest L2 norm, and that norm over the others'.

    Args:
        weight: ``mlp.c_proj.weight``, shape ``(width, hidden)``.
        rule: ``"mean"`` or ``"median"`` of the other rows' norms as the reference.

    Returns:
        ``(channel, ratio)``; a ratio near 1 means no channel stands out.
    """
    norms = weight.detach().float().norm(dim=1)
    channel = int(norms.argmax())
    others = torch.cat([norms[:channel], norms[channel + 1 :]])
    target = others.mean() if rule == "mean" else others.median()
    return channel, float(norms[channel] / target)


@dataclass
class Measurement:
    """What a calibration run records.

    Attributes:
        norms: ``(L-1, B, N)`` fp32 L2 norms of the patch tokens at the output of blocks ``0..L-2``.
        ffn_abs: ``(L-1, width)`` mean absolute FFN output per residual channel (all tokens, all images).
        grid: ``(rows, cols)`` of the patch grid.
    """

    norms: torch.Tensor
    ffn_abs: torch.Tensor
    grid: tuple[int, int]


@dataclass
class AutoSettings:
    """GCLIP's measured configuration of one backbone.

    Attributes:
        emerging_blocks: blocks whose attention is fused.
        cs_blocks: blocks whose abnormal FFN channel is suppressed.
        channels: ``{block: channel}`` of the suppressed channels (weight rule).
        first_emerging: the detected emerging block, ``None`` when nothing was detected (defaults used).
        fingerprint: the weights hash the choice was cached under.
    """

    emerging_blocks: list[int]
    cs_blocks: list[int]
    channels: dict[int, int] = field(default_factory=dict)
    first_emerging: int | None = None
    fingerprint: str = ""

    @property
    def detected(self) -> bool:
        return self.first_emerging is not None


def native_size(vit: Backbone) -> int:
    """The image side the model was trained at (its position-embedding grid times the patch size)."""
    return int(vit.native_grid[0]) * vit.patch_size


def _norm_constants(vit: Backbone) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The tower's own normalisation (open_clip's ``preprocess_cfg`` on it), else the adapter's."""
    cfg = getattr(vit.module, "preprocess_cfg", None) or {}
    mean, std = getattr(vit, "mean", OPENAI_MEAN), getattr(vit, "std", OPENAI_STD)
    return tuple(cfg.get("mean", mean)), tuple(cfg.get("std", std))


def bundled_calibration_files() -> list[Path]:
    """The four small natural photos shipped with gclip (sources in ``data/calibration/README.md``)."""
    root = resources.files("gclip") / "data" / "calibration"
    return sorted(Path(str(p)) for p in root.iterdir() if p.name.endswith(".jpg"))


def calibration_rgb(images: Sequence[ImageInput] | None, size: int) -> torch.Tensor:
    """Images (paths, PIL images, ``HxWx3 uint8`` arrays; ``None``: the bundled ones) as ``(B, 3, size, size)``.

    Each image's centre square is resized (bilinear) to ``size``; values stay in 0..255 (float32).
    """
    sources: Sequence[ImageInput] = list(images) if images is not None else bundled_calibration_files()
    out = []
    for image in sources:
        array = load_image(image)
        h, w = array.shape[:2]
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        square = resize_image(array[top : top + side, left : left + side], (size, size))
        out.append(torch.from_numpy(square).permute(2, 0, 1).float())
    return torch.stack(out)


def calibration_images(
    vit: Backbone,
    images: Sequence[ImageInput] | None = None,
    size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> torch.Tensor:
    """Normalised calibration inputs ``(B, 3, S, S)`` on the model's device and dtype.

    Args:
        vit: the backbone (its native size and its preprocess config's mean/std are the defaults).
        images: the inputs; ``None`` uses the bundled photos.
        size: the side ``S``; ``None``: :func:`native_size`.
        mean, std: normalisation in 0..1 units; ``None``: the model's own.
    """
    size = size or native_size(vit)
    default_mean, default_std = _norm_constants(vit)
    mean_255, std_255 = pixel_constants(mean or default_mean, std or default_std)  # as the Preprocessor
    rgb = calibration_rgb(images, size)
    x = (rgb - torch.tensor(mean_255).view(1, 3, 1, 1)) / torch.tensor(std_255).view(1, 3, 1, 1)
    return x.to(device=vit.device, dtype=vit.dtype)


@torch.no_grad()
def measure(vit: Backbone, images: torch.Tensor) -> Measurement:
    """Patch-token norms at the output of blocks ``0..L-2`` and the mean |FFN output| per channel."""
    x, grid = vit.embed(images)
    ffn_abs: list[torch.Tensor] = []

    def record(_module: nn.Module, _inputs: Any, output: torch.Tensor) -> None:
        ffn_abs.append(output.detach().float().abs().flatten(0, -2).mean(dim=0))

    norms = []
    for i in range(vit.depth - 1):
        handle = vit.ffn_module(i).register_forward_hook(record)
        try:
            x = vit.run_block(i, x)
        finally:
            handle.remove()
        norms.append(vit.patches(x).float().norm(dim=-1))
    return Measurement(torch.stack(norms), torch.stack(ffn_abs), grid)


def high_norm_mask(norms: torch.Tensor, ratio: float = HIGH_NORM_RATIO) -> torch.Tensor:
    """``norms (..., N)`` -> bool mask of tokens above ``ratio`` x the median of their last axis."""
    median = norms.median(dim=-1, keepdim=True).values
    return norms > ratio * median


def first_emerging_block(
    norms: torch.Tensor, ratio: float = HIGH_NORM_RATIO, min_fraction: float = MIN_IMAGE_FRACTION
) -> int | None:
    """The emerging block of ``norms (L-1, B, N)`` (see the module docstring), or ``None``."""
    frac = high_norm_mask(norms, ratio).any(dim=-1).float().mean(dim=1)  # (L-1,)
    hit = (frac >= min_fraction).tolist()
    for b, h in enumerate(hit):
        if h and (b + 1 >= len(hit) or hit[b + 1]):
            return b
    return None


def weight_channels(vit: Backbone) -> list[tuple[int, float]]:
    """``(channel, ratio)`` of the weight rule for blocks ``0..L-2``."""

    return [abnormal_channel(vit.ffn_out_weight(i)) for i in range(vit.depth - 1)]


def choose(
    vit: Backbone, measurement: Measurement, ratio: float = HIGH_NORM_RATIO, channel_ratio: float = CHANNEL_RATIO
) -> AutoSettings:
    """GCLIP's settings from a measurement: emerging blocks, suppressed blocks and their channels."""

    first = first_emerging_block(measurement.norms, ratio)
    if first is None:
        blocks = default_emerging_blocks(vit.depth)
        warnings.warn(
            f"no high-norm tokens found in any block; using the default emerging blocks {blocks}", stacklevel=3
        )
    else:
        blocks = sorted({first, min(first + 1, vit.depth - 2)})
    channels = weight_channels(vit)
    cs = [i for i in range(max(blocks), vit.depth - 1) if channels[i][1] >= channel_ratio]
    return AutoSettings(blocks, cs, {i: channels[i][0] for i in cs}, first)


def cache_dir() -> Path | None:
    """Where auto choices are stored on disk (:func:`gclip.cache.cache_dir` ``"auto"``)."""
    return shared_cache_dir("auto")


def clear_auto_cache() -> None:
    """Forget the in-memory auto choices (call it after changing a model's weights in place)."""
    _MEMORY.clear()


def _read_disk(path: Path) -> AutoSettings | None:
    try:
        data = json.loads(path.read_text())
        return AutoSettings(
            emerging_blocks=[int(b) for b in data["emerging_blocks"]],
            cs_blocks=[int(b) for b in data["cs_blocks"]],
            channels={int(k): int(v) for k, v in data["channels"].items()},
            first_emerging=data["first_emerging"],
            fingerprint=str(data["fingerprint"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _write_disk(path: Path, settings: AutoSettings, info: dict[str, Any]) -> None:
    from ..io.outputs import atomic_path

    try:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({**asdict(settings), **info}, indent=1))
    except OSError:
        pass  # a read-only cache only costs a re-measurement


def auto_settings(vit: Backbone, images: Sequence[ImageInput] | None = None) -> AutoSettings:
    """GCLIP's ``"auto"`` configuration of a backbone, measured on calibration images and cached.

    Args:
        vit: the backbone view.
        images: calibration inputs; ``None``: the bundled natural photos.

    Returns:
        The :class:`AutoSettings`, from memory, from the disk cache, or measured now.
    """
    inputs = None if images is None else calibration_images(vit, images)
    calib = "bundled" if inputs is None else hashlib.sha1(inputs.float().cpu().numpy().tobytes()).hexdigest()[:12]
    memo = _MEMORY.setdefault(vit.module, {})
    mkey = f"{calib}/{vit.dtype}"
    if mkey in memo:
        return memo[mkey]
    if inputs is None:
        inputs = calibration_images(vit)
    weights = fingerprint(vit.module)
    params = f"v{RULE_VERSION}-r{HIGH_NORM_RATIO}-f{MIN_IMAGE_FRACTION}-c{CHANNEL_RATIO}-{vit.dtype}-{calib}"
    name = hashlib.sha1(f"{weights}/{params}".encode()).hexdigest()[:20]
    folder = cache_dir()
    path = None if folder is None else folder / f"{name}.json"
    found = None if path is None else _read_disk(path)
    if found is None or found.fingerprint != weights:
        found = choose(vit, measure(vit, inputs))
        found.fingerprint = weights
        arch = f"{vit.depth} blocks, width {vit.width}, patch {vit.patch_size}"
        if path is not None:
            _write_disk(path, found, {"architecture": arch, "rule": params})
    memo[mkey] = found
    return found

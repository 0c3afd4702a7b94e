"""``inspect_backbone``: per-block token-norm statistics, emerging blocks, abnormal FFN channels, GCLIP's auto choice.

>>> import gclip
>>> report = gclip.inspect_backbone(gclip.load_model("ViT-B-16", "openai"))  # doctest: +SKIP
>>> report.emerging_blocks, report.cs_blocks  # doctest: +SKIP
([6, 7], [7, 8, 9, 10])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..backbones import auto as diag
from ..backbones import backbone_for, fingerprint, weights_used
from ..backbones.base import Backbone
from ..backbones.models import LoadedModel, load_model
from ..io.images import ImageInput

__all__ = ["BlockReport", "BackboneReport", "inspect_backbone", "fused_attention"]


@dataclass
class BlockReport:
    """What was measured at one block (0-indexed; the last block is not measured: every method replaces it).

    Attributes:
        index: the block.
        median_norm: median patch-token norm of the block output (median over the images of each image's median).
        max_norm: largest patch-token norm over all images.
        max_ratio: largest ``norm / median`` of the image, over all images.
        high_norm_tokens: patch tokens above the high-norm threshold, summed over the images.
        images_with_high_norm: images holding at least one such token.
        channel: the FFN output channel with the largest ``mlp.c_proj.weight`` row norm (weight rule).
        channel_ratio: its row norm over the mean of the other rows.
        channel_abnormal: ``channel_ratio >= CHANNEL_RATIO``.
        activation_channel: the channel with the largest mean |FFN output| on the calibration images.
        activation_ratio: that mean over the mean of the other channels.
        emerging: GCLIP fuses this block's attention.
        suppressed: GCLIP suppresses ``channel`` in this block.
    """

    index: int
    median_norm: float
    max_norm: float
    max_ratio: float
    high_norm_tokens: int
    images_with_high_norm: int
    channel: int
    channel_ratio: float
    channel_abnormal: bool
    activation_channel: int
    activation_ratio: float
    emerging: bool = False
    suppressed: bool = False


@dataclass
class BackboneReport:
    """The result of :func:`inspect_backbone` (plain data; :meth:`to_dict` for JSON).

    Attributes:
        model, pretrained, fingerprint: what was inspected (``fingerprint``: see ``gclip.backbones.fingerprint``).
        depth, width, heads, patch_size: the image tower.
        image_size, n_images, calibration: calibration inputs (side in pixels, count, ``"bundled"`` or ``"given"``).
        high_norm_ratio, channel_ratio: the thresholds used.
        blocks: one :class:`BlockReport` per block ``0..L-2``.
        first_emerging: the detected emerging block (``None``: none found, defaults used).
        emerging_blocks, cs_blocks, channels: what GCLIP's ``"auto"`` chooses on these inputs.
        high_norm_positions: per image, the ``(row, col)`` of the high-norm patches at ``first_emerging``.
        weights: the weights file's path and SHA-256 (:func:`gclip.backbones.weights_used`; ``None``: random).
    """

    model: str
    pretrained: str | None
    fingerprint: str
    depth: int
    width: int
    heads: int
    patch_size: int
    image_size: int
    n_images: int
    calibration: str
    high_norm_ratio: float
    channel_ratio: float
    blocks: list[BlockReport]
    first_emerging: int | None
    emerging_blocks: list[int]
    cs_blocks: list[int]
    channels: dict[int, int]
    high_norm_positions: list[list[tuple[int, int]]]
    weights: dict[str, Any] | None = None
    norms: torch.Tensor | None = field(default=None, repr=False, compare=False)
    rgb: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """Everything but the tensors, as JSON-ready data."""
        out = {k: v for k, v in asdict(self).items() if k not in ("norms", "rgb")}
        out["channels"] = {str(k): v for k, v in self.channels.items()}
        return out

    def format(self) -> str:
        """A fixed-width table with a summary line, as ``gclip inspect`` prints it."""
        head = (
            f"{self.model} ({self.pretrained or 'random weights'}): {self.depth} blocks, width {self.width}, "
            f"patch {self.patch_size}; {self.n_images} {self.calibration} calibration images at {self.image_size} px\n"
            f"high-norm token: norm > {self.high_norm_ratio:g} x median patch norm of its image; "
            f"abnormal channel: c_proj row norm >= {self.channel_ratio:g} x mean of the others\n"
        )
        cols = "block  median     max  max/med  high(imgs)  channel  ratio  act.ch  act.ratio  gclip"
        lines = [head, cols]
        for b in self.blocks:
            flags = ",".join(f for f, on in (("fused", b.emerging), ("cs", b.suppressed)) if on)
            mark = "*" if b.channel_abnormal else " "
            lines.append(
                f"{b.index:5d} {b.median_norm:7.2f} {b.max_norm:7.2f} {b.max_ratio:8.2f} "
                f"{b.high_norm_tokens:6d}({b.images_with_high_norm:2d}) {b.channel:8d} {b.channel_ratio:5.2f}{mark}"
                f" {b.activation_channel:6d} {b.activation_ratio:10.2f}  {flags}"
            )
        found = (
            f"high-norm tokens emerge at block {self.first_emerging}"
            if self.first_emerging is not None
            else "no high-norm tokens found: the default blocks are used"
        )
        chans = ", ".join(f"{b}:{c}" for b, c in self.channels.items()) or "none"
        lines.append(
            f"\n{found}\ngclip auto: emerging_blocks={self.emerging_blocks}, cs_blocks={self.cs_blocks} "
            f"(block:channel {chans})"
        )
        return "\n".join(lines)


def _ratio_to_others(values: torch.Tensor) -> tuple[int, float]:
    index = int(values.argmax())
    others = torch.cat([values[:index], values[index + 1 :]])
    return index, float(values[index] / others.mean().clamp_min(1e-12))


def inspect_backbone(
    model: LoadedModel | str,
    images: Sequence[ImageInput] | None = None,
    pretrained: str | None = "openai",
    size: int | None = None,
    high_norm_ratio: float = diag.HIGH_NORM_RATIO,
    channel_ratio: float = diag.CHANNEL_RATIO,
) -> BackboneReport:
    """Measure a backbone on calibration images and report what GCLIP's ``"auto"`` settings choose.

    Args:
        model: a :class:`~gclip.backbones.models.LoadedModel`, or an open_clip model name (loaded with ``pretrained``).
        images: calibration inputs (paths, PIL images, ``HxWx3 uint8`` arrays); ``None``: four bundled photos.
        pretrained: tag or checkpoint when ``model`` is a name.
        size: calibration side in pixels (centre square, resized); ``None``: the model's native size.
        high_norm_ratio, channel_ratio: the thresholds (defaults: those of ``emerging_blocks="auto"``).

    Returns:
        A :class:`BackboneReport`.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model, pretrained)
    vit = backbone_for(loaded.visual)
    size = size or diag.native_size(vit)
    rgb = diag.calibration_rgb(images, size)
    inputs = diag.calibration_images(vit, images, size, loaded.mean, loaded.std)
    measurement = diag.measure(vit, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = diag.choose(vit, measurement, high_norm_ratio, channel_ratio)
    norms = measurement.norms
    median = norms.median(dim=-1).values  # (L-1, B)
    mask = diag.high_norm_mask(norms, high_norm_ratio)
    weights = diag.weight_channels(vit)
    blocks = []
    for i in range(vit.depth - 1):
        act_channel, act_ratio = _ratio_to_others(measurement.ffn_abs[i])
        blocks.append(
            BlockReport(
                index=i,
                median_norm=float(median[i].median()),
                max_norm=float(norms[i].max()),
                max_ratio=float((norms[i].max(dim=-1).values / median[i]).max()),
                high_norm_tokens=int(mask[i].sum()),
                images_with_high_norm=int(mask[i].any(dim=-1).sum()),
                channel=weights[i][0],
                channel_ratio=weights[i][1],
                channel_abnormal=weights[i][1] >= channel_ratio,
                activation_channel=act_channel,
                activation_ratio=act_ratio,
                emerging=i in auto.emerging_blocks,
                suppressed=i in auto.cs_blocks,
            )
        )
    cols = measurement.grid[1]
    positions = []
    if auto.first_emerging is not None:
        for image_mask in mask[auto.first_emerging]:
            positions.append([(int(p) // cols, int(p) % cols) for p in torch.nonzero(image_mask).flatten()])
    return BackboneReport(
        model=loaded.name,
        pretrained=loaded.pretrained,
        fingerprint=fingerprint(loaded.visual),
        weights=weights_used(loaded)["clip"],
        depth=vit.depth,
        width=vit.width,
        heads=vit.heads,
        patch_size=vit.patch_size,
        image_size=size,
        n_images=int(inputs.shape[0]),
        calibration="bundled" if images is None else "given",
        high_norm_ratio=high_norm_ratio,
        channel_ratio=channel_ratio,
        blocks=blocks,
        first_emerging=auto.first_emerging,
        emerging_blocks=auto.emerging_blocks,
        cs_blocks=auto.cs_blocks,
        channels=auto.channels,
        high_norm_positions=positions,
        norms=norms,
        rgb=rgb,
    )


@torch.no_grad()
def fused_attention(vit: Backbone, method: Any, image: torch.Tensor) -> torch.Tensor:
    """GCLIP's fused, head-averaged last-block attention for one normalised image ``(3, H, W)`` -> ``(1+N, 1+N)``."""
    from ..inference.forward import encode
    from ..methods.base import attention_map

    x, trace = encode(vit, method, image[None])
    q, _, _ = vit.qkv(vit.depth - 1, x)
    maps = [attention_map(q, q)]
    for i in method.blocks_for(vit):
        qi, ki, _ = vit.qkv(i, trace.inputs[i])
        maps.append(attention_map(qi, ki))
    weights = method.weights(len(maps))
    return sum(w * m.mean(dim=1) for w, m in zip(weights, maps))[0]

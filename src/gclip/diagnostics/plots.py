"""Figures of a :class:`~gclip.diagnostics.inspect.BackboneReport` (needs matplotlib: ``pip install gclip[plot]``).

Four figures, each one PNG: token norms per block, high-norm token positions on the images, GCLIP's fused
attention of one patch, and per-class similarity maps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..backbones import backbone_for
from ..backbones.models import LoadedModel
from ..errors import ConfigError
from ..io.outputs import atomic_path
from .inspect import BackboneReport, fused_attention

__all__ = ["save_figures", "plot_token_norms", "plot_high_norm_tokens", "plot_attention", "plot_similarity"]


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install 'gclip[plot]' (or pip install matplotlib)") from e
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def _image(report: BackboneReport, i: int) -> np.ndarray:
    assert report.rgb is not None
    return report.rgb[i].permute(1, 2, 0).clamp(0, 255).byte().numpy()


def plot_token_norms(report: BackboneReport, path: Path, ax: Any = None) -> Path | None:
    """Median, threshold and maximum patch-token norm per block; fused blocks shaded, abnormal channels marked."""
    plt = _pyplot()
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
    idx = [b.index for b in report.blocks]
    med = np.array([b.median_norm for b in report.blocks])
    ax.plot(idx, med, "o-", label="median patch norm")
    ax.plot(
        idx, med * report.high_norm_ratio, "--", color="grey", label=f"threshold ({report.high_norm_ratio:g}x median)"
    )
    ax.plot(idx, [b.max_norm for b in report.blocks], "s-", color="crimson", label="max patch norm")
    for b in report.emerging_blocks:
        ax.axvspan(b - 0.4, b + 0.4, color="gold", alpha=0.3, lw=0)
    cs = [b.index for b in report.blocks if b.suppressed]
    if cs:
        ax.plot(cs, [report.blocks[i].max_norm for i in cs], "v", ms=9, color="black", label="channel suppressed")
    ax.set_yscale("log")
    ax.set_xlabel("block (output)")
    ax.set_ylabel("token L2 norm")
    ax.set_xticks(idx)
    ax.set_title(f"{report.model}: token norms (shaded: fused blocks {report.emerging_blocks})", fontsize=9)
    ax.legend(fontsize=7)
    return _save(fig, path) if fig is not None else None


def plot_high_norm_tokens(
    report: BackboneReport, path: Path, block: int | None = None, axes: Any = None
) -> Path | None:
    """Each calibration image, its patch-norm map at ``block`` (default: the emerging block), the high-norm patches."""
    plt = _pyplot()
    assert report.norms is not None
    block = report.first_emerging if block is None else block
    block = max(report.emerging_blocks) if block is None else block
    n = report.n_images
    fig = None
    if axes is None:
        fig, axes = plt.subplots(1, n, figsize=(2.4 * n, 2.6), squeeze=False)
        axes = axes[0]
    side = report.image_size
    grid = int(round(report.norms.shape[-1] ** 0.5))
    for i, ax in enumerate(axes[:n]):
        norms = report.norms[block, i].reshape(grid, grid).numpy()
        ax.imshow(_image(report, i))
        ax.imshow(norms, cmap="magma", alpha=0.55, extent=(0, side, side, 0), interpolation="nearest")
        high = np.argwhere(norms > report.high_norm_ratio * np.median(norms))
        cell = side / grid
        ax.scatter((high[:, 1] + 0.5) * cell, (high[:, 0] + 0.5) * cell, s=40, facecolors="none", edgecolors="cyan")
        ax.set_title(f"block {block}: {len(high)} high-norm", fontsize=8)
        ax.axis("off")
    return _save(fig, path) if fig is not None else None


def _gclip_method(report: BackboneReport) -> Any:
    from ..methods import get_method

    return get_method("gclip", emerging_blocks=report.emerging_blocks, cs_blocks=report.cs_blocks)


def plot_attention(
    model: LoadedModel, report: BackboneReport, path: Path, patch: tuple[int, int] | None = None, ax: Any = None
) -> Path | None:
    """GCLIP's fused attention of one patch (``(row, col)``; default: the centre) on the first calibration image."""
    from ..backbones.auto import calibration_images

    plt = _pyplot()
    vit = backbone_for(model.visual)
    grid = report.image_size // report.patch_size
    row, col = patch if patch is not None else (grid // 2, grid // 2)
    if not (0 <= row < grid and 0 <= col < grid):
        raise ConfigError(f"--patch {row},{col} is outside the {grid}x{grid} patch grid")
    rgb = _image(report, 0)
    image = calibration_images(vit, [rgb], report.image_size, model.mean, model.std)[0]
    attn = fused_attention(vit, _gclip_method(report), image)[1 + row * grid + col, 1:].reshape(grid, grid)
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(3.4, 3.4))
    side = report.image_size
    ax.imshow(rgb)
    ax.imshow(attn.cpu().numpy(), cmap="viridis", alpha=0.6, extent=(0, side, side, 0), interpolation="nearest")
    cell = side / grid
    ax.add_patch(plt.Rectangle((col * cell, row * cell), cell, cell, fill=False, ec="red", lw=2))
    ax.set_title(f"fused attention of patch ({row},{col})", fontsize=8)
    ax.axis("off")
    return _save(fig, path) if fig is not None else None


def plot_similarity(model: LoadedModel, report: BackboneReport, classes: Any, path: Path) -> Path:
    """Cosine similarity of every patch with each class (GCLIP with the auto settings), first calibration image."""
    from ..engines.spec import SegmenterSpec

    plt = _pyplot()
    recipe = SegmenterSpec(model, method=_gclip_method(report), classes=classes, settings={"short_side": 0, "crop": 0})
    seg = recipe.build()
    prepared = seg.prepare(_image(report, 0))
    logits = seg.merged_logits([prepared])[0].cpu()  # (Q, h, w)
    index = torch.tensor(seg.classes.query_to_class)  # type: ignore[union-attr]
    names = seg.classes.names  # type: ignore[union-attr]
    maps = torch.stack([logits[index == c].max(dim=0).values for c in range(len(names))])
    n = len(names)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.4 * (n + 1), 2.6), squeeze=False)
    axes[0][0].imshow(_image(report, 0))
    axes[0][0].set_title("image", fontsize=8)
    low, high = float(maps.min()), float(maps.max())
    for ax, name, sim in zip(axes[0][1:], names, maps):
        shown = ax.imshow(sim.numpy(), cmap="jet", vmin=low, vmax=high)
        ax.set_title(name, fontsize=8)
    for ax in axes[0]:
        ax.axis("off")
    fig.colorbar(shown, ax=list(axes[0]), shrink=0.7, label="cosine similarity")
    return _save(fig, path)


def save_figures(
    model: LoadedModel,
    report: BackboneReport,
    out_dir: str | Path,
    patch: tuple[int, int] | None = None,
    classes: Any = None,
) -> list[Path]:
    """Write ``token_norms.png``, ``high_norm_tokens.png``, ``attention.png`` (and ``similarity.png`` with classes)."""
    out = Path(out_dir)
    paths = [
        plot_token_norms(report, out / "token_norms.png"),
        plot_high_norm_tokens(report, out / "high_norm_tokens.png"),
        plot_attention(model, report, out / "attention.png", patch),
    ]
    if classes is not None:
        paths.append(plot_similarity(model, report, classes, out / "similarity.png"))
    return [p for p in paths if p is not None]


def summary_figure(
    model: LoadedModel, report: BackboneReport, path: str | Path, patch: tuple[int, int] | None = None
) -> Path:
    """One figure with the token norms, the high-norm tokens of the first image and a fused attention map."""
    plt = _pyplot()
    fig = plt.figure(figsize=(11, 3.6))
    grid = fig.add_gridspec(1, 4, width_ratios=[2.2, 1, 1, 1])
    plot_token_norms(report, Path(path), ax=fig.add_subplot(grid[0]))
    plot_high_norm_tokens(
        report, Path(path), axes=[fig.add_subplot(grid[1]), fig.add_subplot(grid[2])][: report.n_images]
    )
    plot_attention(model, report, Path(path), patch, ax=fig.add_subplot(grid[3]))
    return _save(fig, Path(path))

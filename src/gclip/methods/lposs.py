"""LPOSS and LPOSS+ (CVPR 2025, vladan-stojnic/LPOSS): label propagation over the patches of all windows of an image,
then (LPOSS+) over its pixels.

The initial predictions are the cosine logits of CLIP-DINOiser's MaskCLIP: the last block's attention is the
identity (``out_proj(v)``, as gclip's ``maskclip``) but its residual and FFN are kept. Every window of the image
also goes through DINO (``proxy``, ViT-B/16): its last block's values (``proxy_features``), all heads
concatenated and L2-normalised, give the patch affinities.

LPOSS joins the patches of all windows in one graph: each patch is linked to its ``k`` nearest patches by DINO
inner product (over every window, itself included), weighted ``max(s, 0) ** gamma * exp(-sigma * d ** pix_dist_pow)``
with ``d`` the pixel distance of the two patch centres on the image; the graph is symmetrised (``W + Wᵀ``), its
diagonal dropped and normalised (``D^-1/2 W D^-1/2``), and ``(I - alpha W) X = Y`` is solved per class by
conjugate gradient from zero, at most ``cg_iters`` steps, stopping a class early when its residual falls to
``cg_tol`` times the norm of its ``Y`` (cupy's ``cg``, as the authors call it). ``Y`` are the patch logits; each
window's solution is upsampled (bilinear) to the window and the windows averaged over the image.

LPOSS+ (``pixel_refine``) then propagates those per-pixel logits over the pixels of the model input: each pixel is
linked to the ``r x r`` square around it with weight ``exp(-|Lab_p - Lab_q| / tau)`` (CIELAB with L/100, a/128,
b/128), the graph normalised and solved the same way. The result is resized to the original image by the engine.

The graph sees every window at once, so the method runs whole images (``window_mode = "image"``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.second_models import second_model_for
from ..errors import ConfigError
from ..inference.windows import ImageWindows
from .base import BlockChange, Method, Trace, register


def rgb_to_lab(image: torch.Tensor) -> torch.Tensor:
    """``(..., 3, H, W)`` sRGB in 0..1 -> CIELAB (L 0..100; D65 white, the sRGB/XYZ matrix of Rec. 709)."""
    linear = torch.where(image > 0.04045, ((image + 0.055) / 1.055) ** 2.4, image / 12.92)
    r, g, b = linear.unbind(-3)
    xyz = torch.stack(
        [
            (0.412453 * r + 0.357580 * g + 0.180423 * b) / 0.95047,
            0.212671 * r + 0.715160 * g + 0.072169 * b,
            (0.019334 * r + 0.119193 * g + 0.950227 * b) / 1.08883,
        ],
        dim=-3,
    )
    eps = 0.008856
    f = torch.where(xyz > eps, xyz.clamp(min=eps) ** (1 / 3.0), 7.787 * xyz + 4.0 / 29.0)
    fx, fy, fz = f.unbind(-3)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=-3)


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, iters: int, tol: float
) -> torch.Tensor:
    """Solve ``apply(x) = b`` for each column of the ``(N, C)`` ``b`` in float64 by conjugate gradient from zero
    (``apply`` acts on each column alone): at most ``iters`` steps, a column stopping once its residual norm is at
    most ``tol`` times its norm of ``b``, as cupy's ``cg`` does; a zero column stays zero."""
    b = b.double()
    norm = b.norm(dim=0)
    active = norm > 0
    atol = tol * norm
    x, r = torch.zeros_like(b), b.clone()
    p, rho = torch.zeros_like(b), torch.ones_like(norm)
    for step in range(iters):
        if not bool(active.any()):
            break
        rho_old, rho = rho, (r * r).sum(dim=0)
        p = r if step == 0 else r + (rho / torch.where(active, rho_old, 1.0)) * p
        q = apply(p)
        alpha = rho / torch.where(active, (p * q).sum(dim=0), 1.0)
        x = torch.where(active, x + alpha * p, x)
        r = torch.where(active, r - alpha * q, r)
        active = active & (r.norm(dim=0) > atol)
    return x


def patch_graph(
    feats: torch.Tensor, centres: torch.Tensor, k: int, gamma: float, sigma: float, power: float, alpha: float
) -> torch.Tensor:
    """``alpha D^-1/2 W D^-1/2`` as a sparse ``(N, N)`` float64 matrix (values rounded to float32 as the authors'
    float32 graph is): ``W`` the symmetrised kNN graph of the ``(N, C)`` unit features (inner product, ``k``
    neighbours, itself included) weighted ``max(s, 0) ** gamma * exp(-sigma * d ** power)``, ``d`` the distance of the
    ``(N, 2)`` pixel ``centres``; its diagonal dropped."""
    n = feats.shape[0]
    k = min(k, n)
    feats, centres = feats.float(), centres.float()
    weights, idx = [], []
    for start in range(0, n, 4096):  # the similarity and distance matrices in row blocks
        top = (feats[start : start + 4096] @ feats.T).topk(k, dim=1)
        dist = torch.cdist(centres[None, start : start + 4096], centres[None])[0] ** power
        weights.append(top.values.clamp(min=0) ** gamma * torch.exp(-sigma * dist).gather(1, top.indices))
        idx.append(top.indices)
    weights, cols = torch.cat(weights).flatten(), torch.cat(idx)
    rows = torch.arange(n, device=feats.device).repeat_interleave(k)
    cols = cols.flatten()
    graph = torch.sparse_coo_tensor(
        torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])]),
        torch.cat([weights, weights]),
        (n, n),
        check_invariants=False,  # built from valid indices; said explicitly, so torch does not warn
    ).coalesce()
    (rows, cols), values = graph.indices(), graph.values()
    off = rows != cols
    rows, cols, values = rows[off], cols[off], values[off]
    return _normalised(rows, cols, values, n, alpha)


def _normalised(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n: int, alpha: float) -> torch.Tensor:
    degree = torch.zeros(n, device=values.device, dtype=values.dtype).index_add_(0, rows, values)
    inv = _inverse_sqrt(degree)
    scaled = alpha * (inv[rows] * values * inv[cols])
    graph = torch.sparse_coo_tensor(torch.stack([rows, cols]), scaled.double(), (n, n), check_invariants=False)
    with warnings.catch_warnings():  # torch calls its CSR support beta, once per process, on every user's run
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return graph.coalesce().to_sparse_csr()


def _inverse_sqrt(degree: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(degree)`` with a zero degree taken as 1, and non-finite results as 0 (the authors' rule)."""
    inv = 1.0 / torch.sqrt(torch.where(degree == 0, torch.ones_like(degree), degree))
    return torch.where(torch.isfinite(inv), inv, torch.zeros_like(inv))


def pixel_graph(image: torch.Tensor, radius: int, tau: float, alpha: float) -> tuple[torch.Tensor, list]:
    """LPOSS+'s pixel graph of a ``(3, H, W)`` 0..1 RGB image: ``alpha D^-1/2 W D^-1/2`` as float32 ``(K, H, W)`` maps,
    one per offset ``(dy, dx)`` of the ``(2 radius + 1)²`` square but the centre (the edge from each pixel to its
    neighbour at that offset; 0 past the border), ``W = exp(-|Lab_p - Lab_q| / tau)``, Lab scaled by 100, 128, 128."""
    lab = rgb_to_lab(image.float()) / torch.tensor([100.0, 128.0, 128.0], device=image.device).view(3, 1, 1)
    h, w = lab.shape[-2:]
    offsets = [o for o in itertools.product(range(-radius, radius + 1), repeat=2) if o != (0, 0)]
    index = {o: i for i, o in enumerate(offsets)}
    maps = torch.zeros((len(offsets), h, w), device=image.device)
    for dy, dx in offsets[len(offsets) // 2 :]:  # an edge's two directions share one weight
        ys, yt = slice(max(0, -dy), h - max(0, dy)), slice(max(0, dy), h - max(0, -dy))
        xs, xt = slice(max(0, -dx), w - max(0, dx)), slice(max(0, dx), w - max(0, -dx))
        weight = torch.exp(-torch.sqrt(((lab[:, ys, xs] - lab[:, yt, xt]) ** 2).sum(dim=0)) / tau)
        maps[index[(dy, dx)], ys, xs] = weight
        maps[index[(-dy, -dx)], yt, xt] = weight
    inv = _inverse_sqrt(maps.sum(dim=0))
    inv_padded = F.pad(inv, (radius,) * 4)
    for i, (dy, dx) in enumerate(offsets):
        maps[i] = alpha * (inv * maps[i] * inv_padded[radius + dy : radius + dy + h, radius + dx : radius + dx + w])
    return maps, offsets


def pixel_propagation(
    image: torch.Tensor, logits: torch.Tensor, r: int, tau: float, alpha: float, iters: int, tol: float
) -> torch.Tensor:
    """LPOSS+: ``(Q, H, W)`` logits propagated over the pixels of the ``(3, H, W)`` 0..1 RGB image (module doc) ->
    float64 ``(Q, H, W)``; the classes in chunks (each is solved on its own)."""
    radius = r // 2
    maps, offsets = pixel_graph(image, radius, tau, alpha)
    maps = maps.double()
    h, w = logits.shape[-2:]

    def apply(x: torch.Tensor) -> torch.Tensor:  # (H * W, q) -> (I - alpha Wn) x
        grid = x.T.reshape(-1, h, w)
        padded = F.pad(grid, (radius,) * 4)
        out = grid.clone()
        for m, (dy, dx) in zip(maps, offsets):
            out.addcmul_(padded[:, radius + dy : radius + dy + h, radius + dx : radius + dx + w], m, value=-1.0)
        return out.reshape(-1, h * w).T

    flat = logits.reshape(logits.shape[0], -1).T
    chunks = [conjugate_gradient(apply, flat[:, c : c + 32], iters, tol) for c in range(0, flat.shape[1], 32)]
    return torch.cat(chunks, dim=1).T.reshape(logits.shape)


def patch_propagation(feats: torch.Tensor, centres: torch.Tensor, logits: torch.Tensor, method: Lposs) -> torch.Tensor:
    """LPOSS over patches: ``(N, C)`` unit DINO features, ``(N, 2)`` pixel centres and ``(N, Q)`` initial logits ->
    float64 ``(N, Q)`` propagated logits, with the method's graph and solver options."""
    m = method
    graph = patch_graph(feats, centres, m.k, m.gamma, m.sigma, m.pix_dist_pow, m.alpha)
    return conjugate_gradient(lambda x: x - graph @ x, logits, m.cg_iters, m.cg_tol)


@register
@dataclass
class Lposs(Method):
    """LPOSS's options (the authors' defaults, configs/lposs.yaml; configs/lposs_plus.yaml differs only in
    ``pixel_refine``).

    Attributes:
        proxy: the DINO whose last-block features give the affinities (the authors' ``dino_vitb16``).
        proxy_checkpoint: its weights file (``None``: timm's cached pretrained weights).
        proxy_features: which of DINO's last-block ``q``, ``k``, ``v`` (``enc_type_feats``).
        k: neighbours per patch in the kNN graph (fewer when the image has fewer patches).
        gamma: the power of the (non-negative) DINO similarities.
        sigma, pix_dist_pow: the geometric weight ``exp(-sigma * d ** pix_dist_pow)``, ``d`` in pixels.
        alpha: the propagation's ``alpha`` (both graphs).
        cg_iters, cg_tol: conjugate-gradient steps at most, and the relative residual that stops a class early.
        pixel_refine: LPOSS+: propagate the merged logits over the pixels too.
        tau: the pixel graph's colour scale ``exp(-|Lab_p - Lab_q| / tau)``.
        r: the pixel graph's window side (each pixel's ``r x r`` square, ``r // 2`` on each side).
    """

    name = "lposs"
    protocol = "lposs"
    summary = (
        "MaskCLIP logits (residual and FFN kept) propagated over a DINO kNN graph of all windows' patches; "
        "LPOSS+ (pixel_refine) then over the pixels"
    )
    table_row = (
        "last block; DINO on every window; then the image's patch logits (label propagation across all windows), "
        "LPOSS+ also its pixels",
        "identity: `out_proj(v)`",
        "kept",
    )
    window_mode = "image"
    pos_rule = "size"
    proxy: str = "dino_vitb16"
    proxy_checkpoint: str | None = None
    proxy_features: Literal["q", "k", "v"] = "v"
    k: int = 400
    gamma: float = 3.0
    sigma: float = 0.01
    pix_dist_pow: float = 1.0
    alpha: float = 0.95
    cg_iters: int = 10
    cg_tol: float = 1e-6
    pixel_refine: bool = False
    tau: float = 0.01
    r: int = 13

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or self.cg_iters < 0 or self.r < 1 or self.tau <= 0:
            raise ConfigError("lposs k and r must be >= 1, cg_iters >= 0, tau > 0")

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        return {vit.depth - 1: BlockChange(attention=lambda q, k, v: v)}  # residual and FFN kept

    def window_multiple(self, vit: Backbone) -> int:
        return math.lcm(vit.patch_size, second_model_for(vit, self.proxy, self.proxy_checkpoint).patch_size)

    def initial_logits(
        self,
        vit: Backbone,
        crops: torch.Tensor,
        text: torch.Tensor,
        stage: Callable = lambda name: contextlib.nullcontext(),
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B, 3, h, w)`` normalised windows -> ``(B, gh, gw, C)`` unit DINO features and ``(B, Q, gh, gw)`` cosine
        logits of the CLIP features (resized to DINO's grid, bilinearly, where the grids differ)."""
        from ..inference.forward import encode, head

        dino = second_model_for(vit, self.proxy, self.proxy_checkpoint)
        feats, logits = [], []
        for start in range(0, crops.shape[0], 16):
            chunk = crops[start : start + 16]
            with stage("encoder"):
                encoded = encode(vit, self, chunk)
            with stage("head"):
                clip = F.normalize(head(vit, self, encoded).float(), dim=-1)
            with stage("second_model"):
                q, k, v, grid = dino.last_qkv(dino.renormalise(chunk.to(dino.dtype), vit.mean, vit.std))
                chosen = {"q": q, "k": k, "v": v}[self.proxy_features]
                unit = F.normalize(chosen.transpose(1, 2).flatten(2).float(), dim=-1)
                feats.append(unit.reshape(unit.shape[0], grid[0], grid[1], -1))
            with stage("head"):
                if tuple(clip.shape[1:3]) != tuple(grid):
                    resized = F.interpolate(clip.permute(0, 3, 1, 2), size=grid, mode="bilinear", align_corners=False)
                    clip = F.normalize(resized.permute(0, 2, 3, 1), dim=-1)
                logits.append(torch.einsum("bhwe,qe->bqhw", clip, text.to(clip.device, torch.float32)))
        return torch.cat(feats), torch.cat(logits)

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """The joint propagation over all windows' patches, each window's result upsampled to it and averaged;
        with ``pixel_refine`` the pixel propagation on the model input. ``(Q, H, W)`` logits on the model input."""
        feats, logits = self.initial_logits(vit, windows.crops, text, stage)
        b, q, gh, gw = logits.shape
        with stage("head"):
            p = windows.crops.shape[-1] // gw  # the DINO patch, in pixels of the window
            rows = torch.arange(gh, device=feats.device) * p + p // 2
            cols = torch.arange(gw, device=feats.device) * p + p // 2
            centres = []
            for (y1, _, x1, _), (left, _, top, _) in zip(windows.boxes, windows.pads):
                yy, xx = torch.meshgrid(rows + (y1 - top), cols + (x1 - left), indexing="ij")
                centres.append(torch.stack([yy.flatten(), xx.flatten()], dim=1))
            flat = logits.permute(0, 2, 3, 1).reshape(-1, q)
            out = patch_propagation(feats.reshape(b * gh * gw, -1), torch.cat(centres), flat, self)
            out = out.float().reshape(b, gh, gw, q).permute(0, 3, 1, 2)
            out = F.interpolate(out, size=tuple(windows.crops.shape[-2:]), mode="bilinear", align_corners=False)
            merged = windows.merge(out)
            if not self.pixel_refine:
                return merged
            mean = torch.tensor(vit.mean, device=merged.device).view(3, 1, 1)
            std = torch.tensor(vit.std, device=merged.device).view(3, 1, 1)
            rgb = windows.image[0].float() * std + mean
            return pixel_propagation(rgb, merged, self.r, self.tau, self.alpha, self.cg_iters, self.cg_tol).float()

"""PEARL (CVPR 2026, PGSmall/PEARL): Procrustes-aligned keys in the last block, then text-aware Laplacian propagation.

Procrustes alignment (PA), in the last block of NACLIP's reduced form (no residual, no FFN): per head, the queries and
keys are centred on their means weighted by the query norms (the CLS token weighted 0); the rotation ``R`` that best
maps the centred keys onto the centred queries is the orthogonal polar factor of ``M = k_cᵀ q_c``, computed by a
few Newton-Schulz iterations for ``(MᵀM)^-1/2`` (or by an SVD). The attention is
``softmax(q (k R)ᵀ s + alpha k_c k_cᵀ s)``.

Text-aware Laplacian propagation (TLP) runs once per image, on the window-averaged logits resized to the original
image, with the model input resized alike: image and logits are average-pooled by ``round(side / grid)`` per side;
on that grid, ``(C + L) X = C Z`` is solved by a fixed number of conjugate-gradient steps started at the logits
``Z``, where ``C`` is a per-pixel confidence (the squared top softmax probability of the logits, floored, times one
plus its text agreement) and ``L`` the 4-neighbour Laplacian with edge weights ``exp(-edge |grey gradient| /
mean)`` times one plus the neighbours' text agreement, clipped to 1. The text agreement of two probability vectors
``p``, ``r`` is ``sum_c p_c s_c r_c``, with ``s_c`` the diagonal of the row-softmax of the queries' cosine
similarities (temperature ``prop_text_temperature``) with ``prop_diag_boost`` added to the diagonal, rows
renormalised: the authors' code contracts that matrix as ``einsum('cc,bcij->bcij')``, which reads its diagonal only.
The solution is upsampled back (bilinear) and reduced to labels as usual.

The propagation sees the whole image, so with it the method runs whole images (``window_mode = "image"``): the
windows are cut as the authors' sliding window does (not padded: pixels past the last whole patch are dropped and
the window's logits stretched to it). Without it (``propagation=False``) it is an ordinary per-crop method.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError
from ..inference.windows import ImageWindows
from .base import BlockChange, Method, Trace, attention_map, register


def polar_factor(m: torch.Tensor, iters: int = 5, eps: float = 1e-6) -> torch.Tensor:
    """``M (MᵀM)^-1/2`` for ``(..., d, d)`` matrices: Newton-Schulz iterations on ``MᵀM / |MᵀM|_F + eps I``."""
    eye = torch.eye(m.shape[-1], device=m.device, dtype=m.dtype).expand_as(m)
    a = m.transpose(-1, -2) @ m
    norm = a.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]
    y, z = a / norm + eps * eye, eye
    for _ in range(iters):
        t = 0.5 * (3.0 * eye - z @ y)
        y, z = y @ t, t @ z
    return m @ (z / norm.sqrt())


def procrustes_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int = 1,
    use_kk: bool = True,
    alpha_kk: float = 0.08,
    solver: str = "polar",
    polar_iters: int = 5,
) -> torch.Tensor:
    """PEARL's attention on ``(B, H, N, d)`` q, k, v: keys rotated toward the queries (module doc), plus
    ``alpha_kk`` times the centred key-key scores; the ``prefix`` tokens weigh 0 in the means. Computed in fp32, as
    the authors do in their fp16 model (also under a half-precision autocast)."""
    with torch.autocast(q.device.type, enabled=False):
        return _procrustes_attention(q, k, v, prefix, use_kk, alpha_kk, solver, polar_iters)


def _procrustes_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    prefix: int,
    use_kk: bool,
    alpha_kk: float,
    solver: str,
    polar_iters: int,
) -> torch.Tensor:
    dtype = q.dtype
    q, k, v = q.float(), k.float(), v.float()
    scale = q.shape[-1] ** -0.5
    w = q.norm(dim=-1, keepdim=True)
    w = torch.cat([torch.zeros_like(w[..., :prefix, :]), w[..., prefix:, :]], dim=-2)
    w = w / (w.sum(dim=-2, keepdim=True) + 1e-6)
    q_c = q - (w * q).sum(dim=-2, keepdim=True)
    k_c = k - (w * k).sum(dim=-2, keepdim=True)
    m = k_c.transpose(-1, -2) @ q_c
    if solver == "polar":
        r = polar_factor(m, polar_iters)
    else:
        u, _, vh = torch.linalg.svd(m, full_matrices=False)
        r = u @ vh
    scores = (q * scale) @ (k @ r).transpose(-1, -2)
    if use_kk:
        scores = scores + alpha_kk * ((k_c @ k_c.transpose(-1, -2)) * scale)
    return (torch.softmax(scores, dim=-1) @ v).to(dtype)


def text_agreement(text: torch.Tensor, temperature: float = 0.5, diag_boost: float = 10.0) -> torch.Tensor:
    """``(Q,)`` per-query weights of TLP's text agreement: the diagonal of the row-softmax of the ``(Q, E)`` queries'
    cosine similarities over ``temperature``, ``diag_boost`` added on the diagonal and rows renormalised."""
    eps = 1e-6
    unit = F.normalize(text.float(), dim=-1)
    s = torch.softmax(unit @ unit.T / max(temperature, eps), dim=1)
    if diag_boost > 0:
        s = s + diag_boost * torch.eye(s.shape[0], device=s.device, dtype=s.dtype)
        s = s / (s.sum(dim=1, keepdim=True) + eps)
    return s.diagonal()


def laplacian(x: torch.Tensor, w_h: torch.Tensor, w_v: torch.Tensor) -> torch.Tensor:
    """The 4-neighbour graph Laplacian of ``(B, C, H, W)`` maps with horizontal ``(B, 1, H, W-1)`` and vertical
    ``(B, 1, H-1, W)`` edge weights."""
    dh = w_h * (x[..., :, 1:] - x[..., :, :-1])
    dv = w_v * (x[..., 1:, :] - x[..., :-1, :])
    return F.pad(dh, (1, 0)) - F.pad(dh, (0, 1)) + F.pad(dv, (0, 0, 1, 0)) - F.pad(dv, (0, 0, 0, 1))


def conjugate_gradient(
    apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, x: torch.Tensor, iters: int
) -> torch.Tensor:
    """``iters`` conjugate-gradient steps on ``apply(x) = b`` from ``x`` (per batch item; no early stop)."""
    r = b - apply(x)
    p = r
    rs = (r * r).sum(dim=(1, 2, 3), keepdim=True)
    for _ in range(iters):
        ap = apply(p)
        alpha = rs / ((p * ap).sum(dim=(1, 2, 3), keepdim=True) + 1e-12)
        x = x + alpha * p
        r = r - alpha * ap
        new = (r * r).sum(dim=(1, 2, 3), keepdim=True)
        p = r + (new / (rs + 1e-12)) * p
        rs = new
    return x


def laplacian_propagation(
    image: torch.Tensor,
    logits: torch.Tensor,
    text: torch.Tensor,
    grid: int = 80,
    iters: int = 25,
    edge: float = 5.0,
    smoothness: float = 1.0,
    conf_floor: float = 0.05,
    text_temperature: float = 0.5,
    diag_boost: float = 10.0,
) -> torch.Tensor:
    """TLP (module doc): ``(B, 3, H, W)`` normalised RGB image and ``(B, Q, H, W)`` logits -> refined float32
    logits."""
    with torch.autocast(logits.device.type, enabled=False):
        return _propagation(
            image, logits, text, grid, iters, edge, smoothness, conf_floor, text_temperature, diag_boost
        )


def _propagation(
    image: torch.Tensor,
    logits: torch.Tensor,
    text: torch.Tensor,
    grid: int,
    iters: int,
    edge: float,
    smoothness: float,
    conf_floor: float,
    text_temperature: float,
    diag_boost: float,
) -> torch.Tensor:
    eps = 1e-6
    h, w = logits.shape[-2:]
    sh, sw = max(1, round(h / float(grid))), max(1, round(w / float(grid)))
    img, z = image.float(), logits.float()
    if sh > 1 or sw > 1:
        img = F.avg_pool2d(img, (sh, sw), (sh, sw))
        z = F.avg_pool2d(z, (sh, sw), (sh, sw))
    s = text_agreement(text.to(z.device), text_temperature, diag_boost)[None, :, None, None]
    probs = torch.softmax(z, dim=1)
    agree = (probs * (s * probs)).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    confidence = probs.max(dim=1, keepdim=True).values.clamp_min(conf_floor) ** 2 * (1.0 + agree)
    grey = 0.299 * img[:, 0:1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:3]
    gx = (grey[..., :, 1:] - grey[..., :, :-1]).abs()
    gy = (grey[..., 1:, :] - grey[..., :-1, :]).abs()
    gain_h = 1.0 + (probs[..., :, 1:] * (s * probs[..., :, :-1])).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    gain_v = 1.0 + (probs[..., 1:, :] * (s * probs[..., :-1, :])).sum(dim=1, keepdim=True).clamp(0.0, 1.0)
    w_h = (torch.exp(-edge * (gx / (gx.mean() + eps))) * gain_h).clamp(0.0, 1.0)
    w_v = (torch.exp(-edge * (gy / (gy.mean() + eps))) * gain_v).clamp(0.0, 1.0)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return confidence * x + smoothness * laplacian(x, w_h, w_v)

    out = conjugate_gradient(apply, confidence * z, z, iters)
    if sh > 1 or sw > 1:
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
    return out


@register
@dataclass
class Pearl(Method):
    """PEARL's options (the authors' defaults; cfg_ade20k and cfg_city_scapes set ``alpha_kk=0.3``, cfg_city_scapes
    ``prop_grid=224``: the preset's method options).

    Attributes:
        attention: ``"pearl"``: the Procrustes-aligned attention; ``"vanilla"``: ``softmax(q kᵀ s)`` (the authors'
            ablation).
        arch: ``"reduced"``: the last block without residual and FFN; ``"vanilla"``: with both.
        use_kk, alpha_kk: add ``alpha_kk`` times the centred key-key scores.
        align_solver: the rotation by Newton-Schulz polar iterations (``"polar"``) or an SVD.
        polar_iters: Newton-Schulz iterations.
        propagation: run the text-aware Laplacian propagation on the image's logits (the authors' ``use_prop``).
        prop_grid: the propagation's grid: the image is pooled by ``round(side / prop_grid)`` per side.
        prop_iters: conjugate-gradient steps.
        prop_edge: the image-edge sharpness ``k`` in ``exp(-k |gradient| / mean)``.
        prop_smoothness: the Laplacian's weight against the confidence term.
        prop_conf_floor: the top probability's floor in the confidence.
        prop_text_temperature, prop_diag_boost: the text-similarity softmax's temperature and its diagonal boost.
    """

    name = "pearl"
    protocol = "pearl"
    summary = (
        "softmax(q (k R)ᵀ s + α k_c k_cᵀ s), R rotating the keys to the queries; residual and FFN dropped; then "
        "text-aware Laplacian propagation of the image's logits"
    )
    table_row = (
        "last block; then the image's logits (text-aware Laplacian propagation, a few CG steps)",
        "`softmax(q (k R)ᵀ s + α k_c k_cᵀ s)`, R the polar factor of `k_cᵀ q_c` (centred keys rotated to the queries)",
        "dropped",
    )
    attention: Literal["pearl", "vanilla"] = "pearl"
    arch: Literal["reduced", "vanilla"] = "reduced"
    use_kk: bool = True
    alpha_kk: float = 0.08
    align_solver: Literal["polar", "svd"] = "polar"
    polar_iters: int = 5
    propagation: bool = True
    prop_grid: int = 80
    prop_iters: int = 25
    prop_edge: float = 5.0
    prop_smoothness: float = 1.0
    prop_conf_floor: float = 0.05
    prop_text_temperature: float = 0.5
    prop_diag_boost: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.polar_iters < 0 or self.prop_grid < 1 or self.prop_iters < 0:
            raise ConfigError("pearl polar_iters and prop_iters must be >= 0, prop_grid >= 1")

    @property
    def window_mode(self) -> str:  # type: ignore[override]
        return "image" if self.propagation else "crop"

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        if self.attention == "pearl":
            prefix = vit.prefix_tokens

            def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return procrustes_attention(
                    q, k, v, prefix, self.use_kk, self.alpha_kk, self.align_solver, self.polar_iters
                )

        else:

            def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return (attention_map(q, k) @ v.float()).to(v.dtype)

        reduced = self.arch == "reduced"
        return {vit.depth - 1: BlockChange(attention=attention, residual=not reduced, ffn=not reduced)}

    def propagate(self, image: torch.Tensor, logits: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """TLP with this method's options: ``(B, 3, H, W)`` normalised image, ``(B, Q, H, W)`` logits and ``(Q, E)``
        queries -> refined ``(B, Q, H, W)`` float32 logits."""
        return laplacian_propagation(
            image,
            logits,
            text,
            self.prop_grid,
            self.prop_iters,
            self.prop_edge,
            self.prop_smoothness,
            self.prop_conf_floor,
            self.prop_text_temperature,
            self.prop_diag_boost,
        )

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> torch.Tensor:
        """The authors' sliding window (unpadded windows, each window's patch logits stretched to it, averaged),
        resized to the original image, then :meth:`propagate` with the model input resized alike."""
        from ..inference.forward import encode, head

        image = windows.image
        h, w = windows.size
        boxes = windows.boxes
        merged = torch.zeros((1, text.shape[0], h, w), device=image.device)
        count = torch.zeros((1, 1, h, w), device=image.device)
        for start in range(0, len(boxes), 16):
            chunk = boxes[start : start + 16]
            crops = torch.cat([image[..., y1:y2, x1:x2] for y1, y2, x1, x2 in chunk])
            with stage("encoder"):
                encoded = encode(vit, self, crops)
            with stage("head"):
                logits = head(vit, self, encoded, text)
                logits = F.interpolate(logits, size=tuple(crops.shape[-2:]), mode="bilinear", align_corners=False)
                for (y1, y2, x1, x2), window in zip(chunk, logits):
                    merged[..., y1:y2, x1:x2] += window
                    count[..., y1:y2, x1:x2] += 1
        with stage("head"):
            size = tuple(int(s) for s in item.size)
            logits = F.interpolate(merged / count, size=size, mode="bilinear", align_corners=False)
            resized = F.interpolate(image.float(), size=size, mode="bilinear", align_corners=False)
            return self.propagate(resized, logits, text)[0]

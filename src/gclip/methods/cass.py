"""CASS (CVPR 2025, MICV-yonsei/CASS): DINO's attention spectrum matched to CLIP's, plus object-level text.

The last block (residual and FFN dropped, patch tokens only) attends with CLIP's key-key map mixed, head by head,
with a low-rank DINO key-key map: DINO's last-block keys (of the crop sent through PIL as the authors do, resized
to a square) are bilinearly resized to CLIP's grid and rescaled to the range of CLIP's keys; the heads are paired
by the Wasserstein distance of their normalised top eigenvalues (Hungarian assignment), each DINO map is replaced
by its rank-``q`` randomised SVD (singular values optionally stretched), its diagonal zeroed, rescaled to the
CLIP map's range and averaged with it by that distance; NACLIP's Gaussian prior is added before the softmax.
The text embeddings are grouped by Ward clustering; per crop the class of each group closest to the global (CLS)
embedding is moved towards the mean of its two most similar patches, and the global similarity is mixed into
every patch's logits.

The randomised SVD draws its test matrix from a generator seeded with ``seed`` for every crop (the authors draw
from the global stream, so their output depends on how many crops ran before).
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..backbones.second_models import IMAGENET_MEAN, IMAGENET_STD, SecondModel, second_model_for
from ..errors import ConfigError
from ..io.pilresize import pil_bicubic_resize
from .base import BlockChange, Method, Trace, grid_features, register
from .naclip import cached_prior
from .pieces import ImageContext, SecondModelPass

_STRATEGIES = ("spectral", "sequential", "vanilla")
INV_STD = (0.229, 0.224, 0.255)  # the authors' inverse normalisation (sic: 0.255), kept for parity


def _scipy():
    try:
        from scipy.cluster.hierarchy import fcluster, linkage
        from scipy.optimize import linear_sum_assignment
        from scipy.spatial.distance import squareform
    except ImportError:
        raise ConfigError("cass needs scipy: pip install 'gclip[cluster]'") from None
    return linkage, fcluster, squareform, linear_sum_assignment


@functools.lru_cache(maxsize=32)
def _clusters(digest: str, distances: bytes, n: int, threshold: float, method: str) -> tuple[int, ...]:
    linkage, fcluster, squareform, _ = _scipy()
    d = np.frombuffer(distances, dtype=np.float64).reshape(n, n)
    return tuple(int(c) for c in fcluster(linkage(squareform(d), method=method), t=threshold, criterion="distance") - 1)


@torch.compiler.disable  # scipy on the CPU: a graph break, not traced
def text_clusters(text: torch.Tensor, threshold: float, method: str = "ward") -> torch.Tensor:
    """``(Q,)`` cluster ids (from 0) of ``(Q, E)`` embeddings by cosine distance: scipy's hierarchical clustering
    with the linkage ``method`` (CASS: Ward; RF-CLIP: complete), cut at ``threshold``."""
    if text.shape[0] < 2:
        return torch.zeros(text.shape[0], dtype=torch.long)
    unit = F.normalize(text.detach().double().cpu(), dim=-1)
    d = (1.0 - unit @ unit.T).clamp_(0.0, 2.0)
    d = (d + d.T) / 2
    d.fill_diagonal_(0.0)
    raw = d.numpy().tobytes()
    return torch.tensor(_clusters(hashlib.sha1(raw).hexdigest(), raw, text.shape[0], float(threshold), method))


def crop_pixels(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """CLIP-normalised crops -> the 8-bit pixels the authors hand to PIL: undone with ImageNet's mean and their
    std ``(0.229, 0.224, 0.255)`` (not CLIP's), times 255, truncated (as ``astype('uint8')``)."""
    del mean, std  # the authors undo ImageNet's normalisation whatever the crop was normalised with
    inv_mean = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, INV_STD)], dtype=torch.float32)
    inv_std = torch.tensor([1 / s for s in INV_STD], dtype=torch.float32)
    x = (images.float() - inv_mean.to(images.device).view(1, 3, 1, 1)) / inv_std.to(images.device).view(1, 3, 1, 1)
    return torch.trunc(x * 255).clamp_(0, 255)


def dino_input(images: torch.Tensor, patch: int) -> torch.Tensor:
    """CLIP-normalised ``(B, 3, H, W)`` crops -> DINO's input as CASS builds it: the PIL round trip, a bicubic resize
    to ``min(H, W)`` square, ``ToTensor`` and ImageNet normalisation, cut to a multiple of ``patch``."""
    side = min(images.shape[-2:])
    pixels = crop_pixels(images, (), ())
    if tuple(images.shape[-2:]) != (side, side):
        pixels = pil_bicubic_resize(pixels, (side, side))
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=torch.float32, device=images.device).view(1, 3, 1, 1)
    x = (pixels / 255 - mean) / std
    keep = side // patch * patch
    return x[..., :keep, :keep]


def _range_like(source: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Min-max rescale of each ``(..., N, N)`` map of ``source`` to the range of the matching ``target`` map."""
    s_min, s_max = source.amin(dim=(-2, -1), keepdim=True), source.amax(dim=(-2, -1), keepdim=True)
    t_min, t_max = target.amin(dim=(-2, -1), keepdim=True), target.amax(dim=(-2, -1), keepdim=True)
    return (source - s_min) / (s_max - s_min) * (t_max - t_min) + t_min


def top_eigenvalues(maps: torch.Tensor, k: int) -> torch.Tensor:
    """``(..., N, N)`` symmetric maps -> their ``k`` largest eigenvalues (float64, descending), unit L2 norm."""
    vals = torch.linalg.eigvalsh(maps.double()).flip(-1)[..., :k]
    return F.normalize(vals, p=2, dim=-1)


def spectral_distance(dino: torch.Tensor, clip: torch.Tensor) -> torch.Tensor:
    """``(B, H, k)`` spectra -> ``(B, H, H)`` 1-D Wasserstein distances ``[dino head, clip head]`` of the L1-normalised,
    sorted spectra."""
    d = torch.sort(F.normalize(dino, p=1, dim=-1), dim=-1).values
    c = torch.sort(F.normalize(clip, p=1, dim=-1), dim=-1).values
    return (d[:, :, None] - c[:, None]).abs().sum(-1)


def low_rank(maps: torch.Tensor, probes: torch.Tensor, niter: int = 2) -> tuple[torch.Tensor, ...]:
    """``torch.svd_lowrank`` of each ``(..., N, N)`` map with the given ``(..., N, q)`` Gaussian test matrices ->
    ``U, S, Vᵀ`` (Halko et al. 2009, Algorithm 5.1 with ``niter`` subspace iterations), in float64."""
    a = maps.double()
    q_basis = torch.linalg.qr(a @ probes).Q
    for _ in range(niter):
        q_basis = torch.linalg.qr(a.mT @ q_basis).Q
        q_basis = torch.linalg.qr(a @ q_basis).Q
    u, s, vh = torch.linalg.svd(q_basis.mT @ a, full_matrices=False)
    return q_basis @ u, s, vh


def stretch_singular(s: torch.Tensor) -> torch.Tensor:
    """The authors' rescaling of ``(..., q)`` singular values from ``[min, max]`` to ``[0.5 min, 1.5 max]``."""
    lo, hi = s.amin(dim=-1, keepdim=True), s.amax(dim=-1, keepdim=True)
    return (s - lo) / (hi - lo) * (1.5 * hi - 0.5 * lo) + 0.5 * lo


@register
@dataclass
class Cass(Method):
    """CASS's options (the authors' names; defaults: their VOC21 config with DINO ViT-B/8).

    Attributes:
        proxy, proxy_checkpoint: the DINO model (:func:`gclip.backbones.second_models.list_second_models`) and its
            weights file.
        attention: ``"spectral"`` (matched heads), ``"sequential"`` (head i with head i, no stretching) or
            ``"vanilla"`` (CLIP's own q-k attention of the patches).
        global_source: whose CLS embedding is the global one: ``"image"`` (the whole model input's, the authors'
            sliding-window default) or ``"crop"`` (each window's own: their Cityscapes and whole-image settings).
        global_semantics_weight: share of the global (CLS) similarity mixed into each patch's logits.
        mean_vector_weight: how far each group's chosen class moves towards its two closest patches.
        h_threshold: the Ward distance at which the text clusters are cut.
        stretch_singular: stretch the DINO singular values (the authors: on for every dataset but VOC20, Cityscapes).
        gaussian_std: NACLIP's prior (patches).
        scale_factor: DINO's weight (times the spectral distance).
        k_eigen: eigenvalues compared per head.
        rank: the randomised SVD's rank.
        seed: the seed of the randomised SVD's test matrix, drawn afresh for every crop.
    """

    name = "cass"
    protocol = "cass"
    summary = "DINO key-key maps matched to CLIP heads by their spectra (low rank) + object-level text prompts"
    table_row = (
        "last block; DINO's last-block keys of the same crop; text per crop",
        (
            "per head `softmax(M + Ω)`, `M` CLIP's `k kᵀ s` averaged with a spectrally matched, low-rank DINO `k "
            "kᵀ s`; Ω NACLIP's prior; patches only"
        ),
        "dropped",
    )
    proxy: str = "dino_vitb8"
    proxy_checkpoint: str | None = None
    attention: str = "spectral"
    global_source: str = "image"
    global_semantics_weight: float = 0.1
    mean_vector_weight: float = 0.03
    h_threshold: float = 0.1
    stretch_singular: bool = True
    gaussian_std: float = 5.0
    scale_factor: float = 10.0
    k_eigen: int = 20
    rank: int = 10
    seed: int = 0
    _pairing: tuple[int, ...] | None = None  # tests only: a fixed DINO head per CLIP head instead of the assignment
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attention not in _STRATEGIES:
            raise ConfigError(f"cass attention must be one of {', '.join(_STRATEGIES)}, got {self.attention!r}")
        if self.global_source not in ("image", "crop"):
            raise ConfigError(f"cass global_source must be 'image' or 'crop', got {self.global_source!r}")
        if self.rank < 1 or self.k_eigen < 1:
            raise ConfigError(f"cass rank and k_eigen must be >= 1, got {self.rank} and {self.k_eigen}")

    @property
    def second_model(self) -> DinoKeys | None:  # type: ignore[override]
        return None if self.attention == "vanilla" else DinoKeys(self.proxy, self.proxy_checkpoint)

    @property
    def image_context(self) -> GlobalCls | None:  # type: ignore[override]
        return GlobalCls(self.pos_rule) if self.global_source == "image" else None

    def blocks(self, vit: Backbone, trace: Trace) -> dict[int, BlockChange]:
        cached_prior(self._cache, trace.grid, self.gaussian_std, vit.device)  # per grid, before a compiled pass
        return {}

    def _probes(self, heads: int, n: int, device: torch.device) -> torch.Tensor:
        """``(H, N, rank)`` float64 test matrices, head i's the i-th draw after seeding (as the authors' loop draws
        them, one ``randn(N, rank)`` a head); drawn on the CPU, so every device gets the same."""
        key = ("probes", heads, n, self.rank, self.seed, device)
        if key not in self._cache:
            gen = torch.Generator().manual_seed(self.seed)
            draws = [torch.randn(n, self.rank, dtype=torch.float64, generator=gen) for _ in range(heads)]
            self._cache[key] = torch.stack(draws).to(device)
        return self._cache[key]

    def _mixed_maps(self, k: torch.Tensor, dino: torch.Tensor) -> torch.Tensor:
        """``(B, H, N, d)`` CLIP and DINO patch keys -> ``(B, H, N, N)`` attention logits before the prior."""
        b, h, n, d = k.shape
        scale = d**-0.5
        lo, hi = k.amin(dim=(1, 2, 3), keepdim=True), k.amax(dim=(1, 2, 3), keepdim=True)
        d_lo, d_hi = dino.amin(dim=(1, 2, 3), keepdim=True), dino.amax(dim=(1, 2, 3), keepdim=True)
        dino = (dino - d_lo) / (d_hi - d_lo) * (hi - lo) + lo
        clip_maps = (k @ k.transpose(-1, -2)) * scale
        dino_maps = (dino @ dino.transpose(-1, -2)) * scale
        if self.attention == "spectral":
            dist = spectral_distance(top_eigenvalues(dino_maps, self.k_eigen), top_eigenvalues(clip_maps, self.k_eigen))
            weight = 1 - (1 - dist).float()  # the authors keep the costs in float32
            cols = self._assignment((1 - dist).float()).to(k.device)  # (B, H): the DINO head of each CLIP head
            rows = torch.arange(h, device=k.device).expand(b, h)
            w = weight[torch.arange(b, device=k.device)[:, None], rows, cols]  # (B, H)
            dino_maps = dino_maps[torch.arange(b, device=k.device)[:, None], cols]
        probes = self._probes(h, n, k.device)
        u, s, vh = low_rank(dino_maps, probes.expand(b, *probes.shape))
        if self.attention == "spectral" and self.stretch_singular:
            s = stretch_singular(s)
        approx = (u * s[..., None, :]) @ vh
        approx.diagonal(dim1=-2, dim2=-1).zero_()
        approx = _range_like(approx, clip_maps)
        if self.attention == "sequential":
            return ((approx + clip_maps) / 2).float()
        ws = (w * self.scale_factor).double()[..., None, None]
        return ((ws * approx + clip_maps) / (ws + 1)).float()

    @torch.compiler.disable  # scipy on the CPU: a graph break, not traced
    def _assignment(self, cost: torch.Tensor) -> torch.Tensor:
        """``(B, H, H)`` float32 costs ``[dino head, clip head]`` -> per crop the Hungarian assignment's columns (read,
        as the authors read them, as the DINO head to pair with CLIP head ``i``)."""
        if self._pairing is not None:
            return torch.tensor(self._pairing).expand(cost.shape[0], -1)
        assign = _scipy()[3]
        return torch.from_numpy(np.stack([assign(c)[1] for c in cost.cpu().numpy()]))

    def features(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """Patch tokens only, through the last block's mixed attention; with text, the global embedding too."""
        index = vit.depth - 1
        q, k, v = vit.qkv(index, x)
        p = vit.prefix_tokens  # CLS (and registers): the patches follow
        q, k, v = q[:, :, p:], k[:, :, p:], v[:, :, p:]
        if self.attention == "vanilla":
            logits = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        else:
            prior = cached_prior(self._cache, trace.grid, self.gaussian_std, x.device, 0)
            logits = self._mixed_maps(k.float(), trace.extras["dino_keys"].float()) + prior
        heads = (torch.softmax(logits, dim=-1) @ v.float()).to(x.dtype)
        if trace.text is not None:
            trace.extras["global"] = self.global_embedding(vit, x, trace)
        return grid_features(vit, vit.out_proj(index, heads), trace.grid, prefix=False)

    def global_embedding(self, vit: Backbone, x: torch.Tensor, trace: Trace) -> torch.Tensor:
        """``(B, E)`` unit global embeddings: the windows' images' (the ``image_context`` piece) when the engine
        passed them, else each crop's own CLS."""
        given = trace.extras.get("image_context")
        return F.normalize(given.float() if given is not None else global_cls(vit, x), dim=-1)

    def logits(self, vit: Backbone, feats: torch.Tensor, text: torch.Tensor, trace: Trace) -> torch.Tensor:
        """Per crop, object-level text (:meth:`object_queries`) and the global similarity mixed into every patch."""
        text = text.to(feats.device, torch.float32)
        clusters = text_clusters(text, self.h_threshold).to(feats.device)
        g = trace.extras["global"] @ text.T  # (B, Q)
        return object_level_logits(feats, text, g, clusters, self.mean_vector_weight, self.global_semantics_weight)

    def object_queries(self, unit: torch.Tensor, text: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Per crop the text embeddings with, in every cluster, the class most similar to the global embedding
        moved towards the mean of its two most similar patches (``mean_vector_weight``)."""
        clusters = text_clusters(text, self.h_threshold).to(unit.device)
        return object_queries(unit, text, g, clusters, self.mean_vector_weight)


def object_level_logits(
    feats: torch.Tensor, text: torch.Tensor, g: torch.Tensor, clusters: torch.Tensor, moved: float, mixed: float
) -> torch.Tensor:
    """CASS's object-level logits (RF-CLIP's too): ``(B, gh, gw, E)`` features, ``(Q, E)`` unit text, ``(B, Q)``
    global similarities and ``(Q,)`` text clusters -> ``(B, Q, gh, gw)``: each patch against the crop's
    :func:`object_queries` (``moved``: their ``mean_vector_weight``), then the global similarity mixed in with weight
    ``mixed`` (``global_semantics_weight``)."""
    b, gh, gw, e = feats.shape
    unit = F.normalize(feats.reshape(b, gh * gw, e), dim=-1)
    queries = object_queries(unit, text, g, clusters, moved)  # (B, Q, E)
    logits = unit @ queries.transpose(1, 2)  # (B, N, Q)
    logits = logits * (1 - mixed) + g[:, None] * mixed
    return logits.transpose(1, 2).reshape(b, -1, gh, gw)


def object_queries(
    unit: torch.Tensor, text: torch.Tensor, g: torch.Tensor, clusters: torch.Tensor, weight: float
) -> torch.Tensor:
    """``(B, N, E)`` unit patch features, ``(Q, E)`` unit text, ``(B, Q)`` global similarities, ``(Q,)`` cluster ids
    -> ``(B, Q, E)``: in every cluster the first class at the cluster's highest global similarity (``np.argmax``)
    moved by ``weight`` towards the normalised mean of its two most similar patches, the others unchanged."""
    n_clusters = int(clusters.max()) + 1
    b, q = g.shape
    best = g.new_full((b, n_clusters), -math.inf).scatter_reduce(1, clusters.expand(b, q), g, reduce="amax")
    hit = g == best.gather(1, clusters.expand(b, q))
    order = torch.arange(q, device=g.device).expand(b, q)
    earliest = torch.full((b, n_clusters), q, device=g.device).scatter_reduce(
        1, clusters.expand(b, q), torch.where(hit, order, q), reduce="amin"
    )
    first = order == earliest.gather(1, clusters.expand(b, q))  # the first class at its cluster's best (np.argmax)
    top = torch.topk(unit @ text.T, k=min(2, unit.shape[1]), dim=1).indices  # (B, k, Q) patch indices
    picked = unit.gather(1, top.reshape(b, -1, 1).expand(-1, -1, unit.shape[-1])).reshape(b, top.shape[1], q, -1)
    means = F.normalize(picked.mean(dim=1), dim=-1)  # (B, Q, E)
    moved = F.normalize((1 - weight) * text + weight * means, dim=-1)
    return torch.where(first[..., None], moved, text.expand(b, -1, -1))


def global_cls(vit: Backbone, x: torch.Tensor) -> torch.Tensor:
    """Tokens entering the last block -> ``(B, E)`` global embeddings through the unchanged last block: the tower's
    own image embedding (:meth:`~gclip.backbones.base.Backbone.pooled`), which on a CLIP ViT is the CLS token's
    projection, as CASS reads it; on a tower that pools with an attention head (SigLIP 2, PE-Core) the head's
    output, SigLIP 2 having no CLS token."""
    return vit.pooled(vit.block(vit.depth - 1, x)).float()


@dataclass(frozen=True)
class GlobalCls(ImageContext):
    """CASS's global embedding with ``global_source="image"``: the whole model input's CLS embedding ``(1, E)``."""

    pos_rule: str = "sclip"

    def __call__(self, vit: Backbone, image: torch.Tensor) -> torch.Tensor:
        x, _ = vit.embed(image, self.pos_rule)
        for i in range(vit.depth - 1):
            x = vit.block(i, x)
        return global_cls(vit, x)


@dataclass(frozen=True)
class DinoKeys(SecondModelPass):
    """CASS's second model: DINO's last-block keys of each crop (sent through PIL and resized to a square, as the
    authors do), bilinearly resized to CLIP's patch grid: ``trace.extras["dino_keys"]`` ``(B, H, N, d)``. The DINO
    must have CLIP's width and heads."""

    name: str
    checkpoint: str | None

    def model(self, vit: Backbone) -> SecondModel:
        proxy = second_model_for(vit, self.name, self.checkpoint)
        if proxy.spec.input_size or proxy.width != vit.width or proxy.model.blocks[-1].attn.num_heads != vit.heads:
            raise ConfigError(
                f"cass pairs CLIP with a DINO of the same width and heads: {self.name} does not fit this CLIP "
                f"(width {vit.width}, {vit.heads} heads); choose e.g. dino_vitb8 for a ViT-B"
            )
        return proxy

    def warm(self, vit: Backbone, grid: tuple[int, int]) -> None:
        proxy = self.model(vit)
        side = min(grid) * vit.patch_size // proxy.patch_size * proxy.patch_size  # DINO's square input
        proxy.warm((side, side))

    def __call__(self, vit: Backbone, trace: Trace) -> None:
        if trace.images is None:
            raise ConfigError("cass needs the crops' pixels (trace.images) for its second model")
        proxy = self.model(vit)
        keys, grid = proxy.last_keys(dino_input(trace.images, proxy.patch_size).to(vit.dtype))
        b, h, _, d = keys.shape
        maps = keys.transpose(-1, -2).reshape(b * h, d, *grid).float()
        maps = F.interpolate(maps, size=trace.grid, mode="bilinear", align_corners=False)
        trace.extras["dino_keys"] = maps.reshape(b, h, d, -1).transpose(-1, -2)  # (B, H, N, d) on CLIP's grid

"""CLIPer (ICCV 2025, linsun449/cliper.code): early-layer fusion, then the last layer's attention spread over the
class maps.

Early-layer fusion. Blocks ``0..L-2`` run unchanged; the per-head attention maps of all of them are summed into
``S``. The last block's attention (no residual, no FFN) is then run ``L`` times, on the normalised input of every
block ``k < L-1`` (``ln_1`` of block ``k``, normalised again by the last block) and on the last block's own input,
each with its own attention ``A_k``: ``S`` goes through ``k + 1`` Sinkhorn steps (columns, then rows, summed to 1:
the authors normalise ``S`` in place once per feature, so the ``k``-th feature sees ``k + 1`` steps), is
symmetrised, has its column means subtracted, is clipped at 0 and its rows summed to 1. Each of the ``L`` outputs is
projected and compared with the text (cosine times ``softmax_scale``), and a softmax over the texts (the classes,
the background words, and the classes' mean) gives per-layer class probabilities.

Sliding windows (``crop > 0``): each window's per-layer logits and its last attention (mean over heads) are
averaged over the image at patch level; the averaged logits are multiplied by the row-normalised averaged attention
before their softmax, and the result is averaged half and half with the whole image's probabilities.

Then the ``select_layer`` map is zeroed below ``attention_thr`` times its maximum (in place, so the layer mean sees
it too), multiplied by the whole image's last attention (mean over heads, CLS dropped), and added to the mean of all
layers' maps. Labels, as the authors' evaluation: each class map is resized to the photo (bilinear), divided by its
maximum and multiplied by its score (the map's maximum at patch level); classes scoring at most ``score_threshold``
are dropped, values below ``bkg_thre`` zeroed (after a min-max normalisation with ``is_normalize``) and each pixel
takes the class of highest value, or the background where none is left (with ``bkg_thre = 0``: where the squared
complement of the highest value is higher). Without a background class those pixels are left unlabeled.

The windows are cut from the photo resized as the authors do it: PIL bicubic, the short side to the engine's short
side, each side rounded to a multiple of the patch; the position embedding is resampled bilinearly.

Fine-grained compensation (``refinement``, the authors' default ``SFSA``; off by default here: it needs Stable
Diffusion). The photo (``[0, 1]``) goes through the pipeline's image processor at 512 x 512 (its nearest resize, then
``2x - 1``), the VAE's posterior mean (times its scaling factor) is noised to the scheduler's ``time_step``-th of 50
timesteps (noise drawn from ``noise_seed``; the authors' is unseeded) and the UNet runs once on it with the empty
prompt's embedding. The self-attention maps of ``attention_layers_to_use`` (indices into the UNet's attention layers:
down blocks, mid block, up blocks, each transformer's self- then cross-attention; ``-4, -6``: the last up block's
second and first) are taken per head, each divided by its column maxima, zeroed below ``attention_thr`` (the option
the CLIP part uses too) and its rows summed to 1. ``sfsa``: their product over all heads and layers in that order;
``mean``: their mean; ``selection``: the ``attention_idx``-th. The class maps, resized bilinearly to the latent's
64 x 64, are multiplied by it; each class's score becomes the mean of its refined and its unrefined maximum, and the
refined maps are the ones resized to the photo.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import ConfigError, WeightsError
from ..inference.windows import ImageWindows, window_boxes
from .base import Method, attention_map, register
from .pieces import LabelRefinement, TextSide


def fused_attention(summed: torch.Tensor) -> torch.Tensor:
    """One of CLIPer's last-layer attentions from ``(..., N, N)`` summed maps already put through their Sinkhorn
    steps: symmetrised, column means subtracted, clipped at 0, rows summed to 1."""
    a = (summed + summed.transpose(-2, -1)) / 2
    a = (a - a.mean(-2, keepdim=True)).clamp(min=0)
    return a / a.sum(-1, keepdim=True)


def sinkhorn_step(summed: torch.Tensor) -> torch.Tensor:
    """Columns, then rows, of ``(..., N, N)`` maps summed to 1."""
    summed = summed / summed.sum(-2, keepdim=True)
    return summed / summed.sum(-1, keepdim=True)


def _recorded_attention(maps: list[torch.Tensor], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ s) v`` per head, its map appended to ``maps``."""
    a = attention_map(q, k)
    maps.append(a)
    return (a @ v.float()).to(v.dtype)


def early_fusion(
    vit: Backbone, images: torch.Tensor, fuse: bool = True, select_layer: int = -1
) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIPer's encoder (module doc) on ``(1, 3, H, W)`` images -> ``(L, gh, gw, E)`` projected patch features, one
    per layer (zeros for the layers not used without ``fuse``), and the ``(N, N)`` last attention between the patches
    (mean over heads; the prefix tokens' rows and columns left out)."""
    depth = vit.depth
    if not -depth <= select_layer < depth:
        raise ConfigError(f"cliper select_layer {select_layer} is out of range for a tower of {depth} blocks")
    chosen = select_layer % depth
    x, grid = vit.embed(images, "bilinear")
    summed = torch.zeros((), device=x.device)
    inputs: list[torch.Tensor | None] = []
    for i in range(depth - 1):
        inputs.append(vit.pre_norm(i, x) if fuse or i == chosen else None)
        maps: list[torch.Tensor] = []
        x = vit.block(i, x, attention=functools.partial(_recorded_attention, maps))
        summed = summed + maps[0]
    inputs.append(x if fuse or chosen == depth - 1 else None)
    last = depth - 1
    feats = []
    attention_k = summed
    for tokens in inputs:
        summed = sinkhorn_step(summed)
        attention_k = fused_attention(summed)
        if tokens is None:
            feats.append(None)
            continue
        _, _, v = vit.qkv(last, tokens)
        out = vit.out_proj(last, (attention_k @ v.float()).to(v.dtype))
        feats.append(vit.project(vit.patches(out)).float())
    shape = next(f for f in feats if f is not None).shape
    stacked = torch.stack([torch.zeros(shape, device=x.device) if f is None else f for f in feats])
    p = vit.prefix_tokens
    return stacked[:, 0].reshape(depth, grid[0], grid[1], -1), attention_k[0].mean(0)[p:, p:]


def authors_resize(original: np.ndarray, short_side: int, patch: int) -> np.ndarray:
    """The authors' resize of an ``HxWx3 uint8`` photo: PIL bicubic, the short side to ``short_side``, each side
    rounded to a multiple of ``patch``."""
    from PIL import Image

    h, w = original.shape[:2]
    ratio = short_side / min(w, h)
    size = (int(w * ratio / patch + 0.5) * patch, int(h * ratio / patch + 0.5) * patch)
    return np.asarray(Image.fromarray(original).resize(size, Image.BICUBIC))


# the authors' ``sd_version`` names -> the Hugging Face repositories they load (from the local cache only)
SD_VERSIONS = {
    "v2.1": "stabilityai/stable-diffusion-2-1-base",
    "v1.5": "runwayml/stable-diffusion-v1-5",
    "v1.4": "CompVis/stable-diffusion-v1-4",
}
SD_SIZE = 512  # the side the photo is resized to before the VAE (the latent: an eighth of it)
SD_STEPS = 50  # the scheduler's number of inference steps; ``time_step`` indexes its timesteps


def stable_diffusion_folder(checkpoint: str, version: str, refinement: str) -> str:
    """The local folder (diffusers' layout) of the Stable Diffusion that ``refinement`` uses: ``checkpoint``, else
    ``version``'s repository in the local Hugging Face cache (never downloaded).

    Raises:
        ConfigError: diffusers or transformers missing, or an unknown version. WeightsError: no such folder.
    """
    if not all(importlib.util.find_spec(m) for m in ("diffusers", "transformers")):
        raise ConfigError(
            f"cliper refinement {refinement!r} needs diffusers and transformers: pip install 'gclip[sd]' (or set "
            "refinement 'none')"
        )
    if checkpoint:
        path = Path(checkpoint).expanduser()
        if not (path / "model_index.json").is_file():
            raise WeightsError(
                f"cliper sd_checkpoint {checkpoint}: not a Stable Diffusion folder in diffusers' layout (no "
                "model_index.json)"
            )
        return str(path)
    if version not in SD_VERSIONS:
        raise ConfigError(f"cliper sd_version must be one of {', '.join(SD_VERSIONS)}, got {version!r}")
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(SD_VERSIONS[version], "model_index.json")
    if not isinstance(found, str):
        raise WeightsError(
            f"cliper refinement {refinement!r} needs Stable Diffusion {version} ({SD_VERSIONS[version]}), not in the "
            "local Hugging Face cache: pass its local folder (diffusers' layout) as sd_checkpoint (gclip does not "
            "download it)"
        )
    return str(Path(found).parent)


@functools.lru_cache(maxsize=2)
def load_stable_diffusion(folder: str, device: str, dtype: torch.dtype) -> Any:
    """diffusers' ``StableDiffusionPipeline`` from a local ``folder`` (no network) on ``device`` in ``dtype``, once
    per process and arguments (no safety checker: no image is generated).

    Raises:
        WeightsError: the folder does not hold a pipeline diffusers can read (one line).
    """
    from diffusers import StableDiffusionPipeline

    try:
        with warnings.catch_warnings():  # newer diffusers call torch_dtype "dtype" (a FutureWarning); older know one
            warnings.simplefilter("ignore", FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                folder,
                torch_dtype=dtype,
                local_files_only=True,
                safety_checker=None,
                requires_safety_checker=False,
                low_cpu_mem_usage=importlib.util.find_spec("accelerate") is not None,  # without it: diffusers' notice
            )
    except Exception as e:  # diffusers' and transformers' many load errors: one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"cliper sd_checkpoint {folder}: diffusers cannot load it: {first}") from e
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.text_encoder):
        part.requires_grad_(False).eval()
    return pipe.to(torch.device(device))


def unet_attention_layers(unet: Any) -> list[Any]:
    """The UNet's attention modules in the authors' order (their ``DIFFUSION_LAYERS``): the down blocks, the mid block
    and the up blocks, for each of their transformers its first block's self-attention, then its cross-attention."""
    out = []
    for block in [*unet.down_blocks, unet.mid_block, *unet.up_blocks]:
        for transformer in getattr(block, "attentions", None) or ():
            first = transformer.transformer_blocks[0]
            out += [first.attn1, first.attn2]
    return out


@contextlib.contextmanager
def recorded_attention(unet: Any, layers: Sequence[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Within the block, the attention ``layers`` of :func:`unet_attention_layers` run diffusers' plain
    ``AttnProcessor`` and their ``(heads, Q, K)`` maps (the first image's) land in the dict yielded."""
    from diffusers.models.attention_processor import AttnProcessor

    modules = unet_attention_layers(unet)
    if not modules or not all(-len(modules) <= i < len(modules) for i in layers):
        raise ConfigError(
            f"cliper attention_layers_to_use {list(layers)}: the UNet has {len(modules)} attention layers"
        )
    maps: dict[int, torch.Tensor] = {}
    saved = {}
    for i in dict.fromkeys(layers):
        attn = modules[i]
        saved[i] = attn.processor

        def scores(query, key, mask=None, _attn=attn, _i=i, _get=attn.get_attention_scores):
            probs = _get(query, key, mask)
            maps[_i] = probs.reshape(-1, _attn.heads, *probs.shape[1:])[0]
            return probs

        attn.set_processor(AttnProcessor())
        attn.get_attention_scores = scores
    try:
        yield maps
    finally:
        for i, processor in saved.items():
            del modules[i].get_attention_scores
            modules[i].set_processor(processor)


def sd_self_attention(pipe: Any, photo: torch.Tensor, layers: Sequence[int], time_step: int, seed: int) -> torch.Tensor:
    """The ``(M, N, N)`` float32 self-attention maps (all heads of ``layers``, in that order) of one denoising step of
    ``pipe``'s UNet on a ``(1, 3, H, W)`` photo in ``[0, 1]`` (module doc)."""
    from diffusers.utils.torch_utils import randn_tensor

    unet = pipe.unet
    device, dtype = unet.device, unet.dtype
    image = pipe.image_processor.preprocess(photo.to(device), height=SD_SIZE, width=SD_SIZE).to(dtype)
    latent = pipe.vae.encode(image)[0].mean * pipe.vae.config.scaling_factor
    pipe.scheduler.set_timesteps(SD_STEPS, device=device)
    if not -len(pipe.scheduler.timesteps) <= time_step < len(pipe.scheduler.timesteps):
        raise ConfigError(f"cliper time_step {time_step}: the scheduler has {len(pipe.scheduler.timesteps)} timesteps")
    t = pipe.scheduler.timesteps[time_step]
    noise = randn_tensor(latent.shape, generator=torch.Generator("cpu").manual_seed(seed), device=device, dtype=dtype)
    latent = pipe.scheduler.add_noise(latent, noise, t)
    prompt, _ = pipe.encode_prompt("", device, 1, False)
    with recorded_attention(unet, layers) as maps:
        unet(latent, t, encoder_hidden_states=prompt, return_dict=False)
    out = torch.cat([maps[i] for i in layers]).float()
    if out.shape[-1] != out.shape[-2] or int(out.shape[-1] ** 0.5) ** 2 != out.shape[-1]:
        raise ConfigError(
            f"cliper attention_layers_to_use {list(layers)}: give self-attention layers (their maps are "
            f"{tuple(out.shape[-2:])})"
        )
    return out


def refine_with_attention(
    attention: torch.Tensor, maps: torch.Tensor, refinement: str, attention_thr: float, attention_idx: int = 1
) -> torch.Tensor:
    """``(C, gh, gw)`` class maps refined by ``(M, N, N)`` self-attention maps (module doc) -> ``(C, s, s)`` with
    ``s² = N``."""
    side = int(attention.shape[-1] ** 0.5)
    cross = F.interpolate(maps[None].float(), size=(side, side), mode="bilinear", align_corners=False)[0]
    cross = cross.flatten(-2).transpose(0, 1)
    a = attention / (attention.amax(-2, keepdim=True) + 1e-5)
    a = torch.where(a < attention_thr, torch.zeros_like(a), a)
    a = a / (a.sum(-1, keepdim=True) + 1e-5)
    if refinement == "mean":
        out = a.mean(0) @ cross
    elif refinement == "selection":
        if not -a.shape[0] <= attention_idx < a.shape[0]:
            raise ConfigError(f"cliper attention_idx {attention_idx}: the layers give {a.shape[0]} maps (all heads)")
        out = a[attention_idx] @ cross
    else:  # the product a[0] @ a[1] @ ... applied to the maps, right to left
        out = cross
        for i in range(a.shape[0] - 1, -1, -1):
            out = a[i] @ out
    return out.transpose(0, 1).reshape(-1, side, side)


@dataclass
class _Background(LabelRefinement):
    """Pixels no class reaches are left unlabeled (the class list has no background class)."""

    def __call__(self, labels: torch.Tensor, windows: Any = ()) -> torch.Tensor:
        if not windows:
            return labels
        mask = windows[0].context.to(labels.device)
        return torch.where(mask, torch.full_like(labels, -1), labels)


class _Texts(TextSide):
    """The class queries, then the background words when the class list has no background class; marks on the
    method which rows are the background's (its ``_text_rows``)."""

    def __init__(self, method: CLIPer) -> None:
        self.method = method

    def __call__(self, encoder: Any, classes: Any) -> torch.Tensor:
        queries = encoder.embed(classes.queries)
        if classes.background:
            self.method._text_rows = (classes.query_to_class.count(0), 0)
            return queries
        words = self.method.background_texts()
        self.method._text_rows = (0, len(words))
        return torch.cat([queries, encoder.embed(words).to(queries)]) if words else queries


@register
@dataclass
class CLIPer(Method):
    """CLIPer's options (the authors' defaults; the configs set ``attention_thr``, ``softmax_scale`` and the
    thresholds per dataset: the preset's method options).

    Attributes:
        fuse_feature: early-layer fusion: the last layer also runs on every earlier block's normalised input and
            the class maps of all layers are averaged in (the authors' ``--fuse-feature``); ``False``: only
            ``select_layer``'s.
        select_layer: the layer whose map is thresholded and spread by the last attention (``-1``: the last).
        softmax_scale: multiplies the cosine similarities before the softmax over the texts (the authors'
            ``logit_scale``: 100, 50 on COCO).
        attention_thr: a class map's values below this fraction of its maximum are zeroed before the attention
            spreads it.
        score_threshold: classes whose score (their map's maximum) is at most this are dropped.
        bkg_thre: values below this are zeroed; a pixel with none left is background (``0``: the background is
            ``(1 - top value)²``).
        is_normalize: min-max normalise each class map over the photo before ``bkg_thre``.
        background_words: the background texts when the class list has no background class (with one, its
            queries are the background texts): comma-separated words, or the path of a file whose first line
            holds them (the authors' class files, e.g. ``data/voc/cls_voc21.txt`` of a clone of their repository).
        refinement: the fine-grained compensation with Stable Diffusion's self-attention (module doc): ``"none"``
            (gclip's default: the CLIP part only), ``"sfsa"`` (the authors' default ``SFSA``: the product of the
            maps), ``"mean"`` or ``"selection"``. Needs ``pip install 'gclip[sd]'`` and a local checkpoint.
        sd_version: the Stable Diffusion the authors name (``v2.1``: stabilityai/stable-diffusion-2-1-base, their
            default; ``v1.5``, ``v1.4``), looked up in the local Hugging Face cache when ``sd_checkpoint`` is empty.
        sd_checkpoint: a local Stable Diffusion folder in diffusers' layout (``model_index.json``, ``unet/``,
            ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``); nothing is downloaded.
        attention_layers_to_use: the UNet's attention layers whose self-attention refines the maps, in the order
            of their product (indices into the down, mid and up blocks' attentions, self- then cross-attention
            each; ``-4, -6``: the last up block's second and first self-attention, 64 x 64).
        time_step: which of the scheduler's 50 timesteps the latent is noised to and the UNet run at.
        attention_idx: with ``"selection"``, the map used (counting every head of every layer in order).
        noise_seed: the seed of the latent's noise (the authors draw it without one).
    """

    name = "cliper"
    protocol = "cliper"
    summary = (
        "early-layer fusion: the last block's attention (Sinkhorn-normalised sum of all earlier attention maps) run "
        "on every layer's input; the layers' class maps averaged and spread by the last attention"
    )
    table_row = (
        "last block, run on every block's input; then the image's class maps (spread by the last attention)",
        "summed attention maps of blocks 0..L-2, Sinkhorn-normalised, symmetrised, centred, clipped",
        "dropped",
    )
    needs_original = True
    pos_rule = "bilinear"
    fuse_feature: bool = True
    select_layer: int = -1
    softmax_scale: float = 100.0
    attention_thr: float = 0.2
    score_threshold: float = 0.3
    bkg_thre: float = 0.3
    is_normalize: bool = False
    background_words: str = "background"
    refinement: Literal["none", "sfsa", "mean", "selection"] = "none"
    sd_version: str = "v2.1"
    sd_checkpoint: str = ""
    attention_layers_to_use: tuple[int, ...] = (-4, -6)
    time_step: int = 45
    attention_idx: int = 1
    noise_seed: int = 0
    _text_rows: tuple[int, int] | None = None

    window_mode = "image"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.softmax_scale <= 0 or not 0 <= self.attention_thr <= 1 or self.bkg_thre < 0:
            raise ConfigError("cliper softmax_scale must be > 0, attention_thr in [0, 1], bkg_thre >= 0")
        self.attention_layers_to_use = tuple(int(i) for i in self.attention_layers_to_use)
        if self.refinement != "none":
            if not self.attention_layers_to_use:
                raise ConfigError("cliper attention_layers_to_use is empty: name at least one UNet attention layer")
            stable_diffusion_folder(self.sd_checkpoint, self.sd_version, self.refinement)

    @property
    def text_side(self) -> TextSide:  # type: ignore[override]
        return _Texts(self)

    @property
    def label_refinement(self) -> LabelRefinement:  # type: ignore[override]
        return _Background()

    def background_texts(self) -> list[str]:
        """The background words (:attr:`background_words`: the words, or a file's first line)."""
        spec = self.background_words
        path = Path(spec).expanduser()
        if ("/" in spec or spec.endswith(".txt")) and not path.is_file():
            raise ConfigError(f"cliper background_words: no file {spec}")
        line = path.read_text(encoding="utf-8").splitlines()[0] if path.is_file() else spec
        return [w for w in (part.strip() for part in line.replace(",", " ").split()) if w]

    def input_shape(self, shape: tuple[int, int], patch: int, crop: int) -> tuple[int, int]:
        return tuple(max(patch, int(s / patch + 0.5) * patch) for s in shape)  # type: ignore[return-value]

    def class_maps(self, vit: Backbone, image: torch.Tensor, fg: torch.Tensor, bg: torch.Tensor, crop: int = 0,
                   stride: int = 112) -> torch.Tensor:  # fmt: skip
        """The class maps of a ``(1, 3, H, W)`` model input (sides multiples of the patch) for ``(C, E)`` class and
        ``(K, E)`` background texts -> ``(C, gh, gw)`` (module doc; ``crop > 0``: with sliding windows)."""
        p = vit.patch_size
        texts = F.normalize(torch.cat([fg, bg, fg.mean(0, keepdim=True)]).float(), dim=-1)
        n = fg.shape[0]

        def logits(feats: torch.Tensor) -> torch.Tensor:  # (L, gh, gw, E) -> (L, T, gh, gw)
            return self.softmax_scale * torch.einsum("lhwe,te->lthw", F.normalize(feats, dim=-1), texts)

        feats, attn = early_fusion(vit, image, self.fuse_feature, self.select_layer)
        gh, gw = feats.shape[1:3]
        seg = logits(feats).softmax(1)[:, :n]
        if crop > 0:
            if crop % p or stride % p:  # the windows' patch grids must tile the image's (as the authors' always do)
                raise ConfigError(
                    f"cliper: its sliding windows need crop and stride multiples of the patch ({p}), got crop {crop} "
                    f"and stride {stride} (e.g. --crop {max(crop // p, 1) * p} --stride {max(stride // p, 1) * p})"
                )
            h, w = image.shape[-2:]
            preds = torch.zeros((vit.depth, texts.shape[0], gh, gw), device=image.device)
            count = torch.zeros((1, gh, gw), device=image.device)
            attns = torch.zeros((gh, gw, gh, gw), device=image.device)
            counts = torch.zeros_like(attns)
            for y1, y2, x1, x2 in window_boxes(h, w, crop, stride):
                wf, wa = early_fusion(vit, image[..., y1:y2, x1:x2], self.fuse_feature, self.select_layer)
                ys, xs = slice(y1 // p, y2 // p), slice(x1 // p, x2 // p)
                ch, cw = wf.shape[1:3]
                attns[ys, xs, ys, xs] += wa.reshape(ch, cw, ch, cw)
                counts[ys, xs, ys, xs] += 1
                preds[..., ys, xs] += logits(wf)
                count[..., ys, xs] += 1
            attns = (attns / (counts + 1e-5)).reshape(gh * gw, gh * gw)
            attns = attns / attns.sum(-1, keepdim=True)
            slide = ((preds / count).flatten(-2) @ attns).unflatten(-1, (gh, gw))
            seg = slide.softmax(1)[:, :n] * 0.5 + seg * 0.5
        chosen = seg[self.select_layer]
        chosen[chosen < chosen.amax((-1, -2), keepdim=True) * self.attention_thr] = 0
        spread = (chosen.flatten(-2) @ attn).unflatten(-1, (gh, gw))
        return spread + seg.mean(0) if self.fuse_feature else spread

    def refined(self, vit: Backbone, photo: np.ndarray, maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, gh, gw)`` class maps of an ``HxWx3 uint8`` photo -> the maps after :attr:`refinement` (``(C, 64,
        64)`` with SD's 512 input; unchanged with ``"none"``) and the ``(C,)`` class scores (module doc)."""
        score = maps.amax((-1, -2))
        if self.refinement == "none":
            return maps, score
        folder = stable_diffusion_folder(self.sd_checkpoint, self.sd_version, self.refinement)
        pipe = load_stable_diffusion(folder, str(maps.device), vit.dtype)
        tensor = torch.from_numpy(np.array(photo, dtype=np.float32)).permute(2, 0, 1).div(255)[None]
        attention = sd_self_attention(pipe, tensor, self.attention_layers_to_use, self.time_step, self.noise_seed)
        out = refine_with_attention(attention, maps, self.refinement, self.attention_thr, self.attention_idx)
        return out, out.amax((-1, -2)) * 0.5 + score * 0.5

    def labels_scores(
        self, maps: torch.Tensor, size: tuple[int, int], score: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(C, gh, gw)`` class maps -> ``(C, H, W)`` per-pixel class values at ``size`` (0 where dropped) and the
        ``(H, W)`` background value (module doc: the authors' ``cam_to_label``); ``score``: the ``(C,)`` class
        scores (default: the maps' maxima)."""
        score = maps.amax((-1, -2)) if score is None else score
        up = F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0]
        cam = up / (up.amax((-1, -2), keepdim=True) + 1e-5) * score[:, None, None]
        if self.is_normalize:
            flat = cam.flatten(1)
            flat = flat - flat.amin(-1, keepdim=True)
            cam = (flat / (flat.amax(-1, keepdim=True) + 1e-6)).reshape(cam.shape)
        keep = (score > self.score_threshold).to(cam.dtype)[:, None, None]
        if self.bkg_thre > 0:
            cam = torch.where(cam < self.bkg_thre, torch.zeros_like(cam), cam) * keep
            return cam, torch.full(size, self.bkg_thre / 2, device=cam.device)
        cam = cam * keep
        return cam, (1 - cam.amax(0)) ** 2

    def image_logits(
        self,
        vit: Backbone,
        windows: ImageWindows,
        item: Any,
        text: torch.Tensor,
        stage: Callable[[str], contextlib.AbstractContextManager],
    ) -> tuple[torch.Tensor, torch.Tensor | None] | torch.Tensor:
        """The photo resized as the authors do it, its class maps (:meth:`class_maps`, with sliding windows of
        the engine's ``crop`` and ``stride`` when ``crop > 0``; then :meth:`refined`) and their per-pixel values
        (:meth:`labels_scores`) at the photo's size, one row per query (the background class's rows carry the
        background value)."""
        if self._text_rows is None:
            raise ConfigError("cliper: set its classes with Segmenter.set_classes (its text side marks the background)")
        lead, trail = self._text_rows
        rows = text.shape[0] - trail
        with stage("preprocess"):
            short = min(int(s) for s in item.image.shape[-2:])
            pixels = authors_resize(np.asarray(item.original), short, vit.patch_size)
            tensor = torch.from_numpy(pixels.copy()).permute(2, 0, 1).float().div(255).to(text.device)
            mean = torch.tensor(vit.mean, device=tensor.device).view(3, 1, 1)
            std = torch.tensor(vit.std, device=tensor.device).view(3, 1, 1)
            image = ((tensor - mean) / std)[None].to(vit.dtype)
        fg, bg = text[lead:rows], torch.cat([text[:lead], text[rows:]])
        with stage("encoder"):
            maps = self.class_maps(vit, image, fg, bg, windows.crop, windows.stride)
        with stage("head"):
            maps, score = self.refined(vit, np.asarray(item.original), maps)
            cam, background = self.labels_scores(maps, tuple(int(s) for s in item.size), score)
            out = torch.cat([background[None].expand(lead, -1, -1), cam])
            if lead:
                return out
            wins = cam.amax(0) <= background if self.bkg_thre == 0 else cam.amax(0) == 0
            return out, wins

"""Second backbones: the vision foundation models some methods pair with CLIP (DINO, DINOv2, SAM's encoder).

A proxy is loaded by name (:data:`SECOND_MODELS`) through timm, from a local checkpoint file, gclip's weights folder
(``gclip download NAME``) or timm's cached pretrained weights, found, read and refused as CLIP's are
(:mod:`.weights`: the same one-line errors), and cached per process: the Segmenter,
``gclip eval``, bulk runs and the demo share one copy. A timm ViT (DINO, DINOv2, MAE) is walked through the same
family of adapters as CLIP, :class:`~gclip.backbones.timm_vit.TimmViT` (``SecondModel.vit``), with the position
embedding resampled as the authors' torch.hub models do it (DINO: bicubic by scale factor; DINOv2 with registers:
bicubic to the size with antialias; MAE: bicubic to the size). DINOv3 (timm ``Eva`` with DINOv3's rotary position
embedding, a CLS and 4 register tokens, layer scale, no absolute positions) is walked through
:class:`~gclip.backbones.timm_eva.TimmEva`, its rotation built for each grid by timm's ``RotaryEmbeddingDinoV3``
(coordinates normalised to [-1, 1] per side, so any grid has its own rotation, no resampling); its weights are gated:
a local file only (:attr:`SecondModelSpec.gated`). Checkpoints in the authors' layouts load as they are:
DINOv2's hub files (``register_tokens``, the CLS position in ``pos_embed``) through timm's ViT converter, DINOv3's
(``storage_tokens``, ``ls1.gamma``, a k-masked ``qkv.bias``) through timm's Eva converter. SAM's image encoder
(segment-anything's ``ImageEncoderViT``: windowed attention, relative position biases, a convolutional neck) is
walked through :class:`~gclip.backbones.sam_vit.SamViT`, the same family.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError, WeightsError
from .base import Backbone, fingerprint
from .models import resolve_device
from .sam_vit import SamViT
from .timm_eva import TimmEva, is_timm_eva
from .timm_vit import IMAGENET_MEAN, IMAGENET_STD, TimmViT
from .weights import check_sidecar, find_weights, hub_cached, option_flag, read_checkpoint, weights_record

__all__ = [
    "SECOND_MODELS",
    "SecondModelSpec",
    "SecondModel",
    "load_second_model",
    "second_model_for",
    "register_second_model",
    "list_second_models",
    "second_model_weights",
]


@dataclass(frozen=True)
class SecondModelSpec:
    """A named second backbone.

    Attributes:
        arch: the timm architecture (built without weights, ``num_classes=0``).
        tag: timm's pretrained tag for cached weights (``None``: a local checkpoint is required).
        mean, std: the model's input normalisation (0..1 scale, RGB).
        build: builds the bare model instead of ``timm.create_model(arch)`` (tiny test configs).
        checkpoint: a weights file used when the caller gives none (before timm's cache).
        pos_rule: how the position embedding is resampled (:func:`gclip.backbones.openclip.resample_pos_embed`).
        input_size: a fixed input side the crops are resized to, bilinearly (SAM's image encoder: 1024; MAE: 336,
            ProxyCLIP's crop); 0: the crop's size.
        gated: where the weights are requested (their licence is accepted there), for weights that cannot be
            downloaded for the user (DINOv3): only a local file is read (the option's, or ``checkpoint``), never the
            weights folder, a cache or the network, and a missing one is a one-line error saying where to get it.
        family: ``"timm"`` (a timm ViT or Eva), ``"mae"`` (a timm ViT from an MAE checkpoint: its decoder is dropped) or
            ``"sam"`` (``arch`` names a ``segment_anything.sam_model_registry`` entry; its image encoder, from the
            ``segment-anything`` package).
    """

    arch: str
    tag: str | None = None
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    build: Callable[[], nn.Module] | None = None
    checkpoint: str | None = None
    pos_rule: str = "sclip"
    input_size: int = 0
    family: str = "timm"
    gated: str | None = None


DINOV3_WEIGHTS = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
"""Where DINOv3's gated weights are requested: the authors' ``dinov3_vit*16_pretrain_lvd1689m-*.pth`` files (the same
weights in timm's layout are timm's ``vit_*_patch16_dinov3.lvd1689m`` on the Hugging Face hub)."""


SECOND_MODELS: dict[str, SecondModelSpec] = {
    "dino_vitb8": SecondModelSpec("vit_base_patch8_224", "dino"),
    "dino_vitb16": SecondModelSpec("vit_base_patch16_224", "dino"),
    "dino_vits8": SecondModelSpec("vit_small_patch8_224", "dino"),
    "dino_vits16": SecondModelSpec("vit_small_patch16_224", "dino"),
    "dinov2_vitb14_reg": SecondModelSpec("vit_base_patch14_reg4_dinov2", "lvd142m", pos_rule="antialias"),
    "dinov2_vits14_reg": SecondModelSpec("vit_small_patch14_reg4_dinov2", "lvd142m", pos_rule="antialias"),
    "dinov3_vits16": SecondModelSpec("vit_small_patch16_dinov3", gated=DINOV3_WEIGHTS),
    "dinov3_vitb16": SecondModelSpec("vit_base_patch16_dinov3", gated=DINOV3_WEIGHTS),
    "dinov3_vitl16": SecondModelSpec("vit_large_patch16_dinov3", gated=DINOV3_WEIGHTS),
    "mae_vitb16": SecondModelSpec("vit_base_patch16_224", "mae", pos_rule="size", input_size=336, family="mae"),
    "sam_vitb": SecondModelSpec("vit_b", None, input_size=1024, family="sam"),
}


_FOR_VIT: dict[tuple, SecondModel] = {}  # second_model_for's models (a plain dict: see there)
_FILES: dict[tuple[str, str | None], str] = {}  # (name, checkpoint given) -> the weights file read, for the records


def register_second_model(name: str, spec: SecondModelSpec) -> None:
    """Make a second backbone available by name (e.g. a tiny config in tests)."""
    SECOND_MODELS[name] = spec
    load_second_model.cache_clear()
    _FOR_VIT.clear()


def list_second_models() -> list[str]:
    return sorted(SECOND_MODELS)


class SecondModel:
    """A second model walked through its adapter (the one family CLIP's towers use): a timm ``VisionTransformer``
    through :class:`~gclip.backbones.timm_vit.TimmViT`, a timm ``Eva`` (DINOv3) through
    :class:`~gclip.backbones.timm_eva.TimmEva` (q and k of :meth:`last_qkv` carry its rotary positions, as its
    attention sees them), SAM's image encoder through :class:`~gclip.backbones.sam_vit.SamViT`.

    Attributes:
        name, spec: what was loaded; ``model``: the module; ``patch_size``, ``width``: read from the model.
        vit: its adapter (normalisation the spec's): :class:`~gclip.backbones.timm_vit.TimmViT`,
            :class:`~gclip.backbones.timm_eva.TimmEva` or :class:`~gclip.backbones.sam_vit.SamViT`.
    """

    def __init__(self, name: str, spec: SecondModelSpec, model: nn.Module, path: str | None = None) -> None:
        self.name, self.spec, self.model, self.path = name, spec, model, path
        if spec.family == "sam":
            self.vit: Backbone = SamViT(model)
        else:
            self.vit = (TimmEva if is_timm_eva(model) else TimmViT)(model, spec.mean, spec.std)
        self.patch_size = int(model.patch_embed.proj.kernel_size[0])
        self.width = int(model.patch_embed.proj.out_channels)

    def _adapter(self) -> TimmViT:
        if not isinstance(self.vit, TimmViT):
            raise ConfigError(f"proxy {self.name} is SAM's image encoder: choose a DINO or DINOv2 proxy")
        return self.vit

    @property
    def device(self) -> torch.device:
        return self.model.patch_embed.proj.weight.device

    @property
    def fingerprint(self) -> str:
        """A short hash of the weights (:func:`gclip.backbones.base.fingerprint`, the one CLIP's disk caches use)."""
        return fingerprint(self.model)

    def weights_record(self) -> dict[str, Any] | None:
        """``{"path", "sha256"}`` of the weights file read (:func:`gclip.backbones.weights.weights_record`)."""
        return weights_record(self.path)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def renormalise(self, images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        """Images normalised with ``mean``/``std`` (CLIP's) -> normalised with this model's."""
        src_m, src_s = (torch.tensor(v, device=images.device, dtype=images.dtype).view(1, 3, 1, 1) for v in (mean, std))
        dst_m, dst_s = (
            torch.tensor(v, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
            for v in (self.spec.mean, self.spec.std)
        )
        return (images * src_s + src_m - dst_m) / dst_s

    def pos_embed(self, size: tuple[int, int]) -> torch.Tensor | None:
        """The position embedding for ``(H, W)`` pixel inputs (the spec's ``pos_rule``), computed once per size:
        :meth:`TimmViT.pos_embed <gclip.backbones.timm_vit.TimmViT.pos_embed>`.

        Models whose embedding covers the patches only (timm's ``no_embed_class``, DINOv2 with registers) get
        ``(N, C)``, the others ``(P + N, C)`` with the CLS (and register) positions first."""
        grid = (int(size[0]) // self.patch_size, int(size[1]) // self.patch_size)
        return self._adapter().pos_embed(grid, self.spec.pos_rule)

    def warm(self, size: tuple[int, int]) -> None:
        """Fill the position-embedding cache for ``(H, W)`` crops (before a compiled forward traces it)."""
        if self.spec.family == "sam":
            return
        side = self.spec.input_size
        self.pos_embed((side, side) if side else size)

    @property
    def window_patch(self) -> int:
        """What a crop's sides must be a multiple of (1 for a model that resizes its input)."""
        return 1 if self.spec.input_size else self.patch_size

    def grid(self, size: tuple[int, int]) -> tuple[int, int]:
        """The feature grid for an ``(H, W)`` crop."""
        if self.spec.input_size:
            side = self.spec.input_size // self.patch_size
            return side, side
        return int(size[0]) // self.patch_size, int(size[1]) // self.patch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 3, H, W)`` images normalised for this model -> ``(B, C, h, w)``: the patch tokens of the last block
        after the final norm (DINO's ``get_intermediate_layers(x, 1)``, MAE's ``forward_features``); for SAM the
        image encoder's output (neck included). A model with a fixed input gets the crop resized bilinearly to it,
        as ProxyCLIP feeds it."""
        if self.spec.input_size:
            side = self.spec.input_size
            images = F.interpolate(images.to(self.dtype), size=(side, side), mode="bilinear", align_corners=False)
            if self.spec.family == "sam":  # SAM's blocks (windows as the module runs them) and its neck
                vit = self.vit
                x, grid = vit.embed(images)
                for i in range(vit.depth):
                    x = vit.block(i, x)
                out = vit.project(x)
                return out.transpose(1, 2).reshape(out.shape[0], -1, grid[0], grid[1])
        vit = self._adapter()
        x, grid = self._walk(images, vit.depth)
        x = vit.patches(vit.final_norm(x))
        return x.transpose(1, 2).reshape(x.shape[0], -1, grid[0], grid[1])

    def last_qkv(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(B, 3, H, W)`` images normalised for this model -> the last block's patch queries, keys and values,
        each ``(B, heads, N, d)`` (``norm1`` then ``qkv``, prefix tokens dropped), and the patch grid."""
        if self.spec.input_size:
            raise ConfigError(f"proxy {self.name} resizes its input to a fixed size: choose a DINO or DINOv2 proxy")
        vit = self._adapter()
        x, grid = self._walk(images, vit.depth - 1)
        keep = slice(vit.prefix_tokens, None)
        q, k, v = vit.qkv(vit.depth - 1, x)
        return q[:, :, keep], k[:, :, keep], v[:, :, keep], grid

    def last_keys(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """The last block's patch keys ``(B, heads, N, d)`` (CASS's ``qkv[1]``) and the patch grid
        (:meth:`last_qkv`)."""
        _, k, _, grid = self.last_qkv(images)
        return k, grid

    def _walk(self, images: torch.Tensor, blocks: int) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tokens after the first ``blocks`` blocks (prefix tokens first) and the patch grid: the adapter's
        :meth:`~gclip.backbones.timm_vit.TimmViT.embed` (the spec's ``pos_rule``) and unchanged blocks."""
        vit = self._adapter()
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ConfigError(
                f"proxy {self.name} needs crops whose sides are multiples of its patch {self.patch_size}, got "
                f"{images.shape[-2]}x{images.shape[-1]}: choose a crop such as {self.patch_size * 16} (and stride)"
            )
        x, grid = vit.embed(images, self.spec.pos_rule)
        for i in range(blocks):
            x = vit.block(i, x)
        return x, grid


def _bare_model(name: str, spec: SecondModelSpec) -> nn.Module:
    if spec.build is not None:
        return spec.build()
    if spec.family == "sam":
        try:
            from segment_anything import sam_model_registry
        except ImportError:
            raise ConfigError(f"proxy {name} needs SAM's package: pip install 'gclip[sam]'") from None
        return sam_model_registry[spec.arch](checkpoint=None).image_encoder
    import timm

    return timm.create_model(spec.arch, pretrained=False, num_classes=0)


def _cached_weights(spec: SecondModelSpec) -> str | None:
    if spec.tag is None:
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(f"{spec.arch}.{spec.tag}")
    return hub_cached(getattr(cfg, "hf_hub_id", None), ["model.safetensors", "pytorch_model.bin"])


def _weights_file(name: str, spec: SecondModelSpec, checkpoint: str | None, option: str) -> str:
    """The file given, the spec's, else :func:`gclip.backbones.weights.find_weights` (gclip's weights folder, timm's
    cache, a download from the hub; SAM's encoder has no download here: `gclip download` fetches it)."""
    if checkpoint or spec.checkpoint:
        return str(checkpoint or spec.checkpoint)
    if spec.gated:
        raise WeightsError(
            f"proxy {name}'s weights are gated (they are not downloaded for you): request the authors' file "
            f"(e.g. {name}_pretrain_lvd1689m-*.pth) at {spec.gated}, or take timm's model.safetensors of "
            f"huggingface.co/timm/{spec.arch}.lvd1689m, then pass it as {option}=PATH ({option_flag(option)} PATH on "
            "the command line)"
        )

    def fetch() -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(f"timm/{spec.arch}.{spec.tag}", "model.safetensors")

    what = f"proxy {name}" + (f" (huggingface.co/timm/{spec.arch}.{spec.tag})" if spec.tag else "")
    example = "SAM's sam_vit_b_01ec64.pth" if spec.family == "sam" else ""
    return find_weights(what, name, option, lambda: _cached_weights(spec), fetch if spec.tag else None, example=example)


def _check_sidecar(path: str, name: str, spec: SecondModelSpec, option: str) -> None:
    """A ``gclip download`` file must hold this model's weights (SAM's file serves its encoder too)."""
    check_sidecar(
        path,
        f"proxy {name}",
        lambda s: (
            s.get("name") == name or (spec.family == "sam" and s.get("kind") == "sam" and s.get("arch") == spec.arch)
        ),
        f"pass {name}'s file to {option} (`gclip download {name}` fetches it)",
    )


def _dinov3_to_timm(state: dict[str, torch.Tensor], model: nn.Module, path: str, name: str) -> dict[str, torch.Tensor]:
    """A checkpoint in DINOv3's own layout (facebookresearch/dinov3: ``storage_tokens``, ``ls1.gamma``, a fused
    ``qkv.bias`` with its k-masking ``bias_mask``, ``rope_embed.periods``, ``mask_token``) -> timm's names, by timm's
    own converter (``timm.models.eva.checkpoint_filter_fn``). A model without q/v biases (timm's
    ``vit_*_patch16_dinov3``: the released ViT-S/B/L files hold all-zero ones) drops the file's ``qkv.bias``, which is
    refused unless its q and v parts are zero (the k part is masked out by the authors' model)."""
    import contextlib
    import io

    from timm.models.eva import checkpoint_filter_fn

    if not hasattr(model.blocks[0].attn, "q_bias") or model.blocks[0].attn.q_bias is None:
        for key, bias in state.items():
            if key.endswith("attn.qkv.bias"):
                q, _, v = bias.chunk(3, dim=-1)
                if q.any() or v.any():
                    raise WeightsError(
                        f"checkpoint {path} has non-zero q/v biases ({key}) that proxy {name} has no place for"
                    )
    with contextlib.redirect_stdout(io.StringIO()):  # the converter prints each bias it drops
        return checkpoint_filter_fn(state, model)


@functools.lru_cache(maxsize=4)
def load_second_model(
    name: str,
    checkpoint: str | None = None,
    device: str | torch.device | None = "cpu",
    dtype: torch.dtype = torch.float32,
    option: str = "proxy_checkpoint",
) -> SecondModel:
    """The second backbone ``name`` with weights from ``checkpoint`` (a DINO ``.pth``, a timm ``.safetensors``
    ...) or timm's cache; built once per process and arguments. ``option``: the method option (and, with dashes,
    the command-line flag) that a missing-weights error tells the user to set.

    Raises:
        ConfigError: unknown name. WeightsError: missing, unreadable or mismatched weights (one line).
    """
    if name not in SECOND_MODELS:
        raise ConfigError(f"unknown proxy model {name!r}: choose one of {', '.join(list_second_models())}")
    spec = SECOND_MODELS[name]
    path = _weights_file(name, spec, checkpoint, option)
    _check_sidecar(path, name, spec, option)
    state, _ = read_checkpoint(path, option)
    state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model = _bare_model(name, spec)
    if spec.family == "mae":  # MAE's pre-training checkpoint also holds its decoder and mask token
        state = {k: v for k, v in state.items() if not k.startswith("decoder") and k != "mask_token"}
    elif is_timm_eva(model):
        if "storage_tokens" in state:  # DINOv3's own checkpoint names -> timm's
            state = _dinov3_to_timm(state, model, path, name)
    elif "register_tokens" in state or "mask_token" in state:  # DINOv2's own checkpoint names -> timm's
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)
    elif spec.family == "sam":  # a whole SAM checkpoint (or timm's samvit names): the image encoder's own names
        if any(k.startswith("image_encoder.") for k in state):
            state = {k[len("image_encoder.") :]: v for k, v in state.items() if k.startswith("image_encoder.")}
        state = {k.replace("mlp.fc", "mlp.lin"): v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[-1].strip()[:160]
        raise WeightsError(f"checkpoint {path} does not fit proxy {name} ({spec.arch}): {first}") from e
    if result.missing_keys or result.unexpected_keys:
        example = (result.missing_keys or result.unexpected_keys)[0]
        raise WeightsError(
            f"checkpoint {path} does not fit proxy {name} ({spec.arch}): {len(result.missing_keys)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {example!r})"
        )
    model = model.to(device=resolve_device(device), dtype=dtype).eval().requires_grad_(False)
    _FILES[(name, checkpoint)] = path
    return SecondModel(name, spec, model, path)


def second_model_weights(options: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """What gclip's JSON outputs record of the second models a method's ``options`` name: ``{option: {"name", "path",
    "sha256"}}`` for ``proxy``/``sam`` (the file read: the one given, or the one found for it in this process) and for
    a ``mask_generator`` with its ``sam_checkpoint``."""
    out: dict[str, dict[str, Any]] = {}
    for option in ("proxy", "sam", "mask_generator"):
        name = options.get(option)
        if not isinstance(name, str):
            continue
        checkpoint = options.get("sam_checkpoint" if option == "mask_generator" else f"{option}_checkpoint")
        path = checkpoint if option == "mask_generator" else _FILES.get((name, checkpoint), checkpoint)
        record = weights_record(path)
        if record is not None:
            out[option] = {"name": name, **record}
    return out


def second_model_for(vit: Any, name: str, checkpoint: str | None, option: str = "proxy_checkpoint") -> SecondModel:
    """:func:`load_second_model` on a :class:`~gclip.backbones.openclip.DenseViT`'s device and dtype, for the methods'
    forwards: kept in
    a plain dict (not ``lru_cache``), which a ``torch.compile``'d forward traces as a hit."""
    key = (name, checkpoint, str(vit.device), vit.dtype)
    if key not in _FOR_VIT:
        _FOR_VIT[key] = load_second_model(name, checkpoint, vit.device, vit.dtype, option)
    return _FOR_VIT[key]


# The names of these before Engine v3 ("proxy" was ProxyCLIP's word for what every method here calls a second model).
ProxySpec, ProxyViT, PROXIES = SecondModelSpec, SecondModel, SECOND_MODELS
register_proxy, list_proxies, load_proxy, proxy_for = (
    register_second_model,
    list_second_models,
    load_second_model,
    second_model_for,
)

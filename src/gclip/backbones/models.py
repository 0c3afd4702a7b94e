"""Loading CLIP ViTs through open_clip: model names, pretrained tags, local checkpoints, clear errors.

Pretrained tags are resolved from the local cache first; only when the weights are not cached is the
network probed (a few seconds at most), so an offline machine gets an immediate, actionable error
instead of a download retry loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .base import fingerprint

__all__ = ["LoadedModel", "load_model", "read_checkpoint", "resolve_device", "trim_heap", "PRECISIONS"]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_HUB_HOST = "huggingface.co"


@dataclass
class LoadedModel:
    """An open_clip CLIP model ready for dense inference.

    Attributes:
        clip: the open_clip ``CLIP`` module (eval mode, on ``device``, in ``dtype``).
        tokenizer: open_clip tokenizer for the text tower.
        name: open_clip model name, e.g. ``"ViT-B-16"``.
        pretrained: the tag or the checkpoint path it was loaded from (``None``: random init).
        quick_gelu: whether the towers use QuickGELU.
        mean, std: image normalisation in [0, 1] units (from the model's preprocess config).
        device, dtype: where and in what precision the image tower runs.
        fingerprint: a short hash of a few weight tensors, used as a cache key for this set of weights.
    """

    clip: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: str | None
    quick_gelu: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: torch.device
    dtype: torch.dtype
    fingerprint: str

    @property
    def visual(self) -> torch.nn.Module:
        return self.clip.visual


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` means CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as e:
        raise WeightsError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WeightsError(f"device {device!r} asked for, but CUDA is not available here: use --device cpu")
    return dev


def _is_jit_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
    return any(n.endswith("constants.pkl") or "/code/" in n for n in names)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Read a state dict from ``.safetensors``, a torch pickle (``.pt``/``.bin``/``.pth``) or an OpenAI JIT archive.

    Pickles are read with ``weights_only=True``: a file holding arbitrary Python objects is refused.

    Returns:
        ``(state_dict, is_openai_jit)``; nested ``state_dict``/``model`` entries and ``module.`` prefixes
        are unwrapped.
    """
    path = Path(path)
    hint = "--pretrained takes a .pt/.bin/.pth/.safetensors state dict or an OpenAI JIT archive"
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist: pass an existing file to --pretrained")
    if path.stat().st_size == 0:
        raise WeightsError(f"checkpoint {path} is empty (0 bytes): download it again and pass it to --pretrained")
    jit = False
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        elif _is_jit_archive(path):
            jit = True
            obj = torch.jit.load(str(path), map_location="cpu").state_dict()
        else:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights only load failed" in reason.lower():
            reason = "not a tensor-only torch file (corrupt, or it pickles Python objects: re-save the state_dict)"
        raise WeightsError(f"cannot read checkpoint {path}: {reason[:200]} ({hint})") from e
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"checkpoint {path} holds no tensor state dict ({hint})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):
        obj.pop(key, None)
    obj = {k: v for k, v in obj.items() if not k.endswith("attn_mask")}  # buffers that scripted models save
    return obj, jit


def _describe_vit(state: dict[str, torch.Tensor]) -> str:
    conv = state.get("visual.conv1.weight")
    if conv is None:
        return "no ViT image tower"
    layers = sum(1 for k in state if k.startswith("visual.") and k.endswith("attn.in_proj_weight"))
    return f"width {conv.shape[0]}, {layers} blocks, patch {conv.shape[-1]}"


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path, name: str) -> None:
    from open_clip.model import resize_pos_embed

    if "logit_scale" in state and state["logit_scale"].ndim != model.logit_scale.ndim:
        state["logit_scale"] = state["logit_scale"].reshape(model.logit_scale.shape)
    try:
        resize_pos_embed(state, model)
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise WeightsError(
            f"checkpoint {path} ({_describe_vit(state)}) does not fit model {name} "
            f"({_describe_vit(model.state_dict())}): pass the --model it was trained as"
        ) from e
    missing = [k for k in result.missing_keys if not k.endswith("attn_mask")]
    if missing or result.unexpected_keys:
        example = (missing or result.unexpected_keys)[0]
        raise WeightsError(
            f"checkpoint {path} does not fit model {name}: {len(missing)} missing and "
            f"{len(result.unexpected_keys)} unexpected keys (e.g. {example!r}); pass the --model it was trained as"
        )


def hub_reachable(host: str = _HUB_HOST, timeout: float = 3.0) -> bool:
    """Whether ``host:443`` answers within ``timeout`` seconds (DNS included)."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "") or os.environ.get("GCLIP_OFFLINE"):
        return False
    ok = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, 443), timeout=timeout):
                ok[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return ok[0]


def _cached_tag_file(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    if cfg.get("file"):
        return cfg["file"]
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        from huggingface_hub import try_to_load_from_cache

        repo_id, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename[: -len(Path(filename).suffix)] + ".safetensors", filename]
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        for fname in candidates:
            found = try_to_load_from_cache(repo_id, fname, cache_dir=cache_dir)
            if isinstance(found, str) and os.path.isfile(found):
                return found
    url = cfg.get("url", "")
    if url:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def _resolve_tag(name: str, tag: str, cache_dir: str | None) -> tuple[str, bool]:
    """Local file for a pretrained tag: from the cache, or downloaded when the hub answers."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    quick_gelu = bool(cfg.get("quick_gelu", False))
    cached = _cached_tag_file(cfg, cache_dir)
    if cached:
        return cached, quick_gelu
    hint = f"download the weights on a connected machine and pass --pretrained /path/to/checkpoint (for {name}/{tag})"
    if not hub_reachable():
        raise WeightsError(f"weights {name}/{tag} are not in the local cache and the network is unreachable: {hint}")
    try:
        return open_clip.download_pretrained(cfg, cache_dir=cache_dir), quick_gelu
    except Exception as e:  # noqa: BLE001
        raise WeightsError(f"download of {name}/{tag} failed ({type(e).__name__}): {hint}") from e


class _RandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("No pretrained weights loaded")


@contextlib.contextmanager
def _without_random_init_notice(active: bool = True):
    """Drop open_clip's "No pretrained weights loaded ... initialized randomly" warning (it logs on the root
    logger) while gclip builds a model whose weights it loads itself."""
    notice, root = _RandomInitNotice(), logging.getLogger()
    if active:
        root.addFilter(notice)
    try:
        yield
    finally:
        root.removeFilter(notice)


def _check_vit(model: torch.nn.Module, name: str) -> None:
    visual = getattr(model, "visual", None)
    needed = ("conv1", "class_embedding", "positional_embedding", "transformer", "ln_post", "proj")
    if visual is None or not all(hasattr(visual, a) for a in needed):
        raise WeightsError(f"model {name} has no open_clip ViT image tower: gclip supports ViT models only")
    if getattr(visual, "attn_pool", None) is not None:
        raise WeightsError(f"model {name} pools with attention (CoCa-style): gclip supports plain ViT towers only")


def trim_heap() -> bool:
    """Return the C heap's free pages to the system (glibc ``malloc_trim(0)``); returns whether it could.

    After a checkpoint is loaded, glibc keeps the freed loading buffers (the state dict's copies) resident; this
    hands them back. A no-op where the C library has no ``malloc_trim`` (macOS, Windows, musl); never raises.
    """
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    try:
        trim.argtypes = [ctypes.c_size_t]
        trim.restype = ctypes.c_int
        trim(0)
    except Exception:  # noqa: BLE001 - best effort only
        return False
    return True


def warn_slow_precision(precision: str, device: torch.device) -> None:
    """Warn that fp16 on a CPU is very slow: CPUs have no fp16 matrix units (bf16 has them on AVX512-BF16/AMX)."""
    if precision == "fp16" and device.type == "cpu":
        warnings.warn(
            "fp16 on a CPU runs matrix products about 100x slower than fp32: use --precision bf16 or fp32 there",
            stacklevel=3,
        )


def load_model(
    name: str = "ViT-B-16",
    pretrained: str | Path | None = "openai",
    precision: str = "fp32",
    device: str | torch.device | None = None,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
) -> LoadedModel:
    """Load an open_clip ViT by name and pretrained tag, or from a local checkpoint file.

    Args:
        name: open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``.
        pretrained: a pretrained tag of that model (``"openai"``, ``"laion2b_s34b_b88k"``, ...), a path to a
            local checkpoint (``.pt``, ``.bin``, ``.safetensors`` or an OpenAI JIT archive), or ``None``
            for random weights.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``: the dtype the image tower runs in.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        quick_gelu: force QuickGELU on or off; ``None`` follows the tag (OpenAI weights use QuickGELU) or,
            for a local file, uses it for OpenAI JIT archives and for ``*-quickgelu`` model names.
        cache_dir: where open_clip caches downloaded weights.

    Returns:
        A :class:`LoadedModel`.

    Raises:
        WeightsError: unknown name or tag, missing/corrupt/mismatched checkpoint, weights not cached offline.

    >>> model = load_model("ViT-B-16", pretrained="/path/to/ViT-B-16.pt", device="cpu")  # doctest: +SKIP
    """
    import open_clip

    if precision not in PRECISIONS:
        raise WeightsError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    warn_slow_precision(precision, dev)
    if name not in open_clip.list_models():
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")][:12]
        raise WeightsError(
            f"unknown model {name!r}: use an open_clip model name such as {', '.join(vits)} (see `gclip models`)"
        )
    state: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    tag_quick_gelu = name.endswith("-quickgelu")
    if pretrained is not None and str(pretrained) != "":
        pretrained = str(pretrained)
        if open_clip.get_pretrained_cfg(name, pretrained):
            file, tag_quick_gelu = _resolve_tag(name, pretrained, cache_dir)
            path = Path(file)
        elif os.path.exists(pretrained) or os.sep in pretrained or Path(pretrained).suffix:
            path = Path(pretrained)
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise WeightsError(
                f"{pretrained!r} is neither a pretrained tag of {name} (tags: {tags}) nor an existing file: "
                "pass --pretrained /path/to/checkpoint"
            )
        state, is_jit = read_checkpoint(path)
        tag_quick_gelu = tag_quick_gelu or is_jit
    use_quick_gelu = tag_quick_gelu if quick_gelu is None else quick_gelu
    with _without_random_init_notice(state is not None):  # the weights are loaded right after
        model = open_clip.create_model(name, pretrained=None, force_quick_gelu=use_quick_gelu, device="cpu")
    _check_vit(model, name)
    if state is not None and path is not None:
        _load_state(model, state, path, name)
    model.eval().requires_grad_(False)
    dtype = PRECISIONS[precision]
    model = model.to(device=dev, dtype=dtype)
    pp = dict(open_clip.get_model_preprocess_cfg(model))
    tag_cfg = open_clip.get_pretrained_cfg(name, str(pretrained)) if pretrained else {}
    pp.update({k: tag_cfg[k] for k in ("mean", "std") if tag_cfg.get(k)})  # e.g. ViT-L-14 laion2b_s32b_b82k: 0.5
    open_clip.set_model_preprocess_cfg(model, pp)  # the image tower carries its own normalisation
    mean = tuple(float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD))
    del state
    trim_heap()  # the checkpoint's tensors are freed: give their pages back
    return LoadedModel(
        clip=model,
        tokenizer=open_clip.get_tokenizer(name),
        name=name,
        pretrained=str(pretrained) if pretrained is not None else None,
        quick_gelu=use_quick_gelu,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        device=dev,
        dtype=dtype,
        fingerprint=fingerprint(model),
    )

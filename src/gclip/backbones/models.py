"""Loading CLIP ViTs through open_clip: model names, pretrained tags, local checkpoints, clear errors.

Pretrained tags are resolved from gclip's weights folder and the local caches first; only when the weights are not
there is the network probed (a few seconds at most), so an offline machine gets an immediate, actionable error
instead of a download retry loop (:mod:`.weights`, shared with the second models and SAM). The activation a
checkpoint needs (QuickGELU or GELU) follows its tag, its ``gclip download`` sidecar, or what the file is (an OpenAI
archive or state dict, a file open_clip publishes); a file that looks like OpenAI's weights but says nothing gets a
one-line notice naming ``--quick-gelu``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import WeightsError
from .base import fingerprint
from .tokenizer import LazyTokenizer
from .weights import (
    Checkpoint,
    check_sidecar,
    file_sha256,
    find_weights,
    hub_cached,
    hub_reachable,
    load_checkpoint,
    read_checkpoint,
    read_sidecar,
    weights_record,
)

__all__ = [
    "LoadedModel",
    "load_model",
    "model_for",
    "read_checkpoint",
    "resolve_device",
    "trim_heap",
    "PRECISIONS",
    "hub_reachable",
]

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_MODEL = "ViT-B-16"


@dataclass
class LoadedModel:
    """An open_clip CLIP model ready for dense inference.

    Attributes:
        clip: the open_clip ``CLIP`` module (eval mode, on ``device``, in ``dtype``).
        tokenizer: the text tower's tokenizer (:class:`~gclip.backbones.tokenizer.LazyTokenizer`: found on its
            first call).
        name: open_clip model name, e.g. ``"ViT-B-16"``.
        pretrained: the tag or the checkpoint path it was loaded from (``None``: random init).
        quick_gelu: whether the towers use QuickGELU.
        mean, std: image normalisation in [0, 1] units (from the model's preprocess config).
        device, dtype: where and in what precision the image tower runs.
        fingerprint: a short hash of a few weight tensors, used as a cache key for this set of weights.
        path: the weights file read (``None``: random weights).
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
    path: str | None = None

    @property
    def visual(self) -> torch.nn.Module:
        return self.clip.visual

    def weights_record(self) -> dict[str, Any] | None:
        """``{"path", "sha256"}`` of the weights file (:func:`gclip.backbones.weights.weights_record`)."""
        return weights_record(self.path)


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


def _cached_tag_file(cfg: dict[str, Any], cache_dir: str | None) -> str | None:
    if cfg.get("file"):
        return cfg["file"]
    hf_hub = cfg.get("hf_hub", "")
    if hf_hub:
        repo_id, filename = os.path.split(hf_hub)
        filename = filename or "open_clip_pytorch_model.bin"
        candidates = [filename[: -len(Path(filename).suffix)] + ".safetensors", filename]
        if filename == "open_clip_pytorch_model.bin":
            candidates.insert(0, "open_clip_model.safetensors")
        found = hub_cached(repo_id, candidates, cache_dir)
        if found:
            return found
    url = cfg.get("url", "")
    if url:
        local = Path(cache_dir or os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
        if local.is_file():
            return str(local)
    return None


def _resolve_tag(name: str, tag: str, cache_dir: str | None) -> str:
    """Local file for a pretrained tag: gclip's weights folder, open_clip's caches, or a download when the hub
    answers (:func:`gclip.backbones.weights.find_weights`)."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag)
    hub = cfg.get("hf_hub", "").strip("/")
    source = f"huggingface.co/{hub}" if hub else cfg.get("url", "")
    return find_weights(
        f"CLIP {name}/{tag}" + (f" ({source})" if source else ""),
        f"{name} {tag}",
        "pretrained",
        cached=lambda: _cached_tag_file(cfg, cache_dir),
        fetch=lambda: open_clip.download_pretrained(cfg, cache_dir=cache_dir),
    )


@functools.cache
def _published_files() -> dict[str, tuple[str, str, bool]]:
    """open_clip's published weights, by what identifies their files: the URL's file name, the SHA-256 (or its first 8
    hex digits) written in the URL, the hub repository -> ``(model, tag, quick_gelu)``."""
    import open_clip

    known: dict[str, tuple[str, str, bool]] = {}
    for model, tag in open_clip.list_pretrained():
        cfg = open_clip.get_pretrained_cfg(model, tag)
        entry = (model, tag, bool(cfg.get("quick_gelu", False)) or model.endswith("-quickgelu"))
        url = cfg.get("url", "")
        if url:
            known.setdefault("file:" + url.rsplit("/", 1)[-1], entry)
            for digest in re.findall(r"(?<![0-9a-f])([0-9a-f]{64}|[0-9a-f]{8})(?=[/.])", url):
                known.setdefault("sha:" + digest, entry)
        if cfg.get("hf_hub"):
            known.setdefault("hub:" + cfg["hf_hub"].split("/")[0] + "--" + cfg["hf_hub"].split("/")[1], entry)
    return known


def published_checkpoint(path: str | Path, hash_it: bool = False) -> tuple[str, str, bool] | None:
    """``(model, tag, quick_gelu)`` of a file that open_clip publishes, recognised by its file name, its place in the
    Hugging Face cache (``models--timm--vit_base_patch16_clip_224.openai``) or, with ``hash_it``, its SHA-256."""
    known, path = _published_files(), Path(path)
    for part in path.parts:
        if part.startswith("models--") and "hub:" + part[len("models--") :] in known:
            return known["hub:" + part[len("models--") :]]
    if "file:" + path.name in known:
        return known["file:" + path.name]
    if hash_it:
        digest = file_sha256(path)
        return known.get("sha:" + digest) or known.get("sha:" + digest[:8])
    return None


def _rounded_to_fp16(state: dict[str, torch.Tensor]) -> bool:
    """Whether the image tower's first weights hold fp16 values (OpenAI released its CLIPs in fp16; open_clip's
    ``openai`` models keep those values in fp32)."""
    names = ["visual.conv1.weight", "visual.transformer.resblocks.0.attn.in_proj_weight"]
    tensors = [state[n] for n in names if n in state and state[n].is_floating_point()]
    return bool(tensors) and all(
        t.dtype == torch.float16 or (t.dtype == torch.float32 and torch.equal(t.half().float(), t)) for t in tensors
    )


def checkpoint_activation(name: str, path: Path, checkpoint: Checkpoint) -> tuple[bool, str]:
    """Whether a local checkpoint without a tag or sidecar needs QuickGELU, and why: ``(quick_gelu, reason)``;
    reason ``""`` when nothing tells (GELU, and a notice when the weights look like OpenAI's)."""
    if name.endswith("-quickgelu"):
        return True, f"the model name {name}"
    if checkpoint.jit:
        return True, "an OpenAI TorchScript archive"
    if checkpoint.openai_keys:
        return True, "a state dict of OpenAI's own model (input_resolution, context_length, vocab_size)"
    rounded = _rounded_to_fp16(checkpoint.state)
    found = published_checkpoint(path, hash_it=rounded)
    if found is not None:
        return found[2], f"open_clip's published {found[0]}/{found[1]}"
    if rounded:
        warnings.warn(
            f"checkpoint {path.name} looks like OpenAI's CLIP weights (rounded to fp16, as OpenAI released them) but "
            "nothing says which activation it was trained with: loaded with GELU; pass --quick-gelu if it is "
            "OpenAI's (--no-quick-gelu if not, to silence this)",
            stacklevel=3,
        )
    return False, ""


def model_for(pretrained: str | Path | None) -> str:
    """The model of a ``gclip download`` file (its sidecar's), else :data:`DEFAULT_MODEL` (``--model`` left out)."""
    if pretrained and os.path.isfile(str(pretrained)):
        side = read_sidecar(pretrained)
        if side and side.get("kind") == "clip" and side.get("model"):
            return str(side["model"])
    return DEFAULT_MODEL


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
    if visual is not None and getattr(visual, "trunk", None) is not None:  # open_clip's TimmModel (SigLIP 2, PE-Core)
        from . import backbone_for

        backbone_for(visual)  # its adapter, or a one-line WeightsError
        return
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
    name: str | None = DEFAULT_MODEL,
    pretrained: str | Path | None = "openai",
    precision: str = "fp32",
    device: str | torch.device | None = None,
    quick_gelu: bool | None = None,
    cache_dir: str | None = None,
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """Load an open_clip ViT by name and pretrained tag, or from a local checkpoint file.

    Args:
        name: open_clip model name (``open_clip.list_models()``), e.g. ``"ViT-B-16"``; ``None``: the model a
            ``gclip download`` file records, else ``"ViT-B-16"``.
        pretrained: a pretrained tag of that model (``"openai"``, ``"laion2b_s34b_b88k"``, ...), a path to a
            local checkpoint (``.pt``, ``.bin``, ``.safetensors`` or an OpenAI JIT archive), or ``None``
            for random weights.
        precision: ``"fp32"``, ``"fp16"`` or ``"bf16"``: the dtype the image tower runs in.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        quick_gelu: force QuickGELU on or off; ``None`` follows the tag (OpenAI weights use QuickGELU) or,
            for a local file, its ``gclip download`` sidecar, else what the file is (:func:`checkpoint_activation`:
            OpenAI archives and state dicts, open_clip's published files, ``*-quickgelu`` model names).
        cache_dir: where open_clip caches downloaded weights.
        tokenizer: a local folder with the text tower's tokenizer files, for models whose tokenizer comes from the
            Hugging Face hub (SigLIP, SigLIP 2); found on first use, offline too (:mod:`gclip.backbones.tokenizer`).

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
    if name is None:
        name = model_for(pretrained)
    if name not in open_clip.list_models():
        vits = [m for m in open_clip.list_models() if m.startswith("ViT-")][:12]
        raise WeightsError(
            f"unknown model {name!r}: use an open_clip model name such as {', '.join(vits)} (see `gclip models`)"
        )
    state: dict[str, torch.Tensor] | None = None
    path: Path | None = None
    tag_cfg: dict[str, Any] = {}
    tag_quick_gelu: bool | None = True if name.endswith("-quickgelu") else None
    if pretrained is not None and str(pretrained) != "":
        pretrained = str(pretrained)
        if open_clip.get_pretrained_cfg(name, pretrained):
            tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
            path = Path(_resolve_tag(name, pretrained, cache_dir))
            tag_quick_gelu = bool(tag_quick_gelu or tag_cfg.get("quick_gelu", False))
        elif os.path.exists(pretrained) or os.sep in pretrained or Path(pretrained).suffix:
            path = Path(pretrained)
        else:
            tags = ", ".join(open_clip.list_pretrained_tags_by_model(name)) or "none"
            raise WeightsError(
                f"{pretrained!r} is neither a pretrained tag of {name} (tags: {tags}) nor an existing file: "
                "pass --pretrained /path/to/checkpoint"
            )
        side = _clip_sidecar(path, name)
        if side is not None and side.get("tokenizer") and tokenizer is None:  # its hub tokenizer, saved beside it
            tokenizer = path.parent / str(side["tokenizer"])
        if side is not None:  # a file from `gclip download`: its settings
            tag_cfg = open_clip.get_pretrained_cfg(side["model"], str(side.get("tag") or "")) or tag_cfg
            tag_cfg = {**tag_cfg, **{k: tuple(side[k]) for k in ("mean", "std") if side.get(k)}}
            tag_quick_gelu = bool(side.get("quick_gelu", tag_quick_gelu))
        checkpoint = load_checkpoint(path)
        state = checkpoint.state
        if checkpoint.jit:
            tag_quick_gelu = True
        elif tag_quick_gelu is None and quick_gelu is None:
            tag_quick_gelu, _ = checkpoint_activation(name, path, checkpoint)
    tag_quick_gelu = bool(tag_quick_gelu)
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
    if not tag_cfg:  # random weights, or a file that says nothing: the normalisation all of the model's tags share
        tag_cfg = _shared_normalisation(name)
    pp.update({k: tag_cfg[k] for k in ("mean", "std") if tag_cfg.get(k)})  # e.g. ViT-L-14 laion2b_s32b_b82k: 0.5
    open_clip.set_model_preprocess_cfg(model, pp)  # the image tower carries its own normalisation
    mean = tuple(float(v) for v in pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(float(v) for v in pp.get("std", open_clip.OPENAI_DATASET_STD))
    del state
    trim_heap()  # the checkpoint's tensors are freed: give their pages back
    text_tokenizer = LazyTokenizer(name, tokenizer, cache_dir)
    if tokenizer is not None:
        text_tokenizer.check()  # a folder given is checked now, not at the first class name
    return LoadedModel(
        clip=model,
        tokenizer=text_tokenizer,
        name=name,
        pretrained=str(pretrained) if pretrained is not None else None,
        quick_gelu=use_quick_gelu,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        device=dev,
        dtype=dtype,
        fingerprint=fingerprint(model),
        path=str(path) if path is not None else None,
    )


def any_tag_quick_gelu(name: str) -> bool:
    """Whether one of open_clip model ``name``'s pretrained tags uses QuickGELU (OpenAI's ViTs: the random weights of
    tests and benchmarks are built that way); ``False`` for the timm towers (SigLIP 2, PE-Core, EVA02), whose text
    towers take no QuickGELU."""
    import open_clip

    if name.endswith("-quickgelu"):
        return True
    return any(
        open_clip.get_pretrained_cfg(name, t).get("quick_gelu") for t in open_clip.list_pretrained_tags_by_model(name)
    )


def _shared_normalisation(name: str) -> dict[str, Any]:
    """``{"mean", "std"}`` that every pretrained tag of open_clip model ``name`` uses (SigLIP 2's and PE-Core's 0.5),
    for weights that do not name their tag; ``{}`` when the tags differ (ViT-L-14) or there are none."""
    import open_clip

    found = set()
    for tag in open_clip.list_pretrained_tags_by_model(name):
        cfg = open_clip.get_pretrained_cfg(name, tag)
        mean = tuple(cfg.get("mean") or open_clip.OPENAI_DATASET_MEAN)
        std = tuple(cfg.get("std") or open_clip.OPENAI_DATASET_STD)
        found.add((mean, std))
    if len(found) != 1:
        return {}
    mean, std = found.pop()
    return {"mean": mean, "std": std}


def _clip_sidecar(path: Path, name: str) -> dict[str, Any] | None:
    """The ``gclip download`` sidecar of a CLIP checkpoint, checked to describe CLIP weights of model ``name``."""
    names = (name, name.removesuffix("-quickgelu"), f"{name}-quickgelu")
    side = read_sidecar(path) if path.is_file() else None
    remedy = "pass it to the option of its model (see `gclip models`)"
    if side is not None and side.get("kind") == "clip":
        remedy = f"pass --model {side.get('model')}, or leave --model out"
    return check_sidecar(path, f"CLIP {name}", lambda s: s.get("kind") == "clip" and s.get("model") in names, remedy)

"""Deterministic random weights for tests and benchmarks.

The weights come from numpy's PCG64 generator, whose stream numpy keeps stable across releases, so a
checkpoint made from a seed is the same on every machine and every torch version. That lets the test
suite compare gclip against numbers produced by other code bases (golden tensors) without shipping a
150M-parameter checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .backbones.models import LoadedModel

__all__ = ["random_model", "random_state_dict", "save_random_checkpoint"]


def _init_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    noise = rng.standard_normal(shape, dtype=np.float32)
    leaf = name.rsplit(".", 1)[-1]
    if name == "logit_scale":
        return np.full(shape, math.log(100.0), dtype=np.float32)
    parent = name.split(".")[-2] if "." in name else ""
    if len(shape) == 1 and ("ln" in parent or "norm" in parent):  # open_clip's ln_*, timm's norm*
        # LayerNorm: weight near one, bias near zero.
        return (1.0 + 0.1 * noise) if leaf == "weight" else 0.05 * noise
    if leaf == "bias" or name.endswith("in_proj_bias"):
        return 0.02 * noise
    if leaf in ("proj", "text_projection"):
        return noise / math.sqrt(shape[0])
    if leaf in ("class_embedding", "positional_embedding", "cls_token", "pos_embed"):
        return noise / math.sqrt(shape[-1])
    if leaf == "token_embedding" or name.endswith("token_embedding.weight"):
        return 0.02 * noise
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else shape[0]
    return noise / math.sqrt(fan_in)


def random_state_dict(model: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Deterministic random values for every floating tensor of ``model.state_dict()``.

    Tensors are filled in sorted-name order from ``numpy.random.default_rng(seed)``; LayerNorm weights
    are near 1, biases small, matrices scaled by ``fan_in ** -0.5``. Every value is exactly representable in
    fp16, so code that casts weights to fp16 and back (as OpenAI's ``build_model`` does) sees the same model.

    Args:
        model: any module (typically an open_clip ``CLIP``); only its state-dict names and shapes are read.
        seed: the generator seed.

    Returns:
        A new state dict (fp32 CPU tensors for floating entries; other entries copied unchanged).

    >>> import open_clip
    >>> sd = random_state_dict(open_clip.create_model("ViT-B-32"), seed=0)
    """
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    reference = model.state_dict()
    for name in sorted(reference):
        value = reference[name]
        if not torch.is_floating_point(value):
            out[name] = value.clone()
            continue
        values = _init_tensor(name, tuple(value.shape), rng).astype(np.float16).astype(np.float32)
        out[name] = torch.from_numpy(values)
    return out


def save_random_checkpoint(
    path: str | Path, model_name: str = "ViT-B-16", seed: int = 0, quick_gelu: bool = False
) -> Path:
    """Build ``model_name`` with open_clip, fill it with :func:`random_state_dict`, save it to ``path``.

    The file format follows the suffix: ``.safetensors`` or a torch pickle (``.pt``/``.bin``).

    >>> save_random_checkpoint("/tmp/vit-b-16-random.pt")  # doctest: +SKIP
    """
    import open_clip

    path = Path(path)
    model = open_clip.create_model(model_name, pretrained=None, force_quick_gelu=quick_gelu)
    state = random_state_dict(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
    else:
        torch.save(state, tmp)
    tmp.replace(path)
    return path


def random_model(
    name: str,
    precision: str = "fp32",
    device: str | None = None,
    seed: int = 0,
    quick_gelu: bool = True,
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """``name`` with the deterministic random weights of :func:`random_state_dict` (no file), loaded as
    :func:`gclip.load_model` loads a checkpoint (``pretrained`` reads ``random:<seed>``).

    >>> model = random_model("ViT-B-16", seed=0)  # doctest: +SKIP
    """
    import dataclasses

    from .backbones.base import fingerprint
    from .backbones.models import PRECISIONS, load_model, resolve_device, trim_heap, warn_slow_precision
    from .errors import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dev = resolve_device(device)
    warn_slow_precision(precision, dev)
    model = load_model(name, None, "fp32", "cpu", quick_gelu=quick_gelu, tokenizer=tokenizer)
    model.clip.load_state_dict(random_state_dict(model.clip, seed))
    model.clip.to(device=dev, dtype=PRECISIONS[precision])
    trim_heap()  # as load_model does after reading a checkpoint: the random state dict is garbage now
    return dataclasses.replace(
        model,
        pretrained=f"random:{seed}",
        device=dev,
        dtype=PRECISIONS[precision],
        fingerprint=fingerprint(model.clip),
    )

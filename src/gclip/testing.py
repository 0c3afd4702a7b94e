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

__all__ = ["random_model", "random_state_dict", "save_random_checkpoint", "save_random_stable_diffusion"]


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
    fan_in = int(np.prod(shape[1:])) if len(shape) > 1 else (shape[0] if shape else 1)  # () : SigLIP's logit_bias
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
        out[name] = torch.from_numpy(np.asarray(values, dtype=np.float32).reshape(tuple(value.shape)))
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


def save_random_stable_diffusion(path: str | Path, seed: int = 0, sharpen: float = 4.0) -> Path:
    """A tiny Stable Diffusion folder in diffusers' layout (``model_index.json``, ``unet/``, ``vae/``,
    ``text_encoder/``, ``tokenizer/``, ``scheduler/``) at ``path``: SD 2.1 base's block layout (three cross-attention
    down blocks and a plain one, its mirror on the way up, two layers per block, linear projections, the latent at an
    eighth of a 512 input, PNDM scheduling with SD's usual betas) at tiny widths, every weight from
    :func:`random_state_dict`; the UNet's self-attention query and key weights are multiplied by ``sharpen`` so that
    its maps are not near-uniform. The tokenizer holds only CLIP's byte tokens and its two special tokens. Needs
    ``diffusers`` and ``transformers`` (``pip install 'gclip[sd]'``).

    >>> save_random_stable_diffusion("/tmp/tiny-sd")  # doctest: +SKIP
    """
    import json
    import tempfile

    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    path = Path(path)
    width = 16  # the text encoder's width, the UNet's cross-attention width
    unet = UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        norm_num_groups=4,
        attention_head_dim=2,  # diffusers' legacy name: two heads per attention
        cross_attention_dim=width,
        use_linear_projection=True,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=512,
    )
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=514,
            hidden_size=width,
            intermediate_size=2 * width,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=77,
            projection_dim=width,
            hidden_act="gelu",
            bos_token_id=512,
            eos_token_id=513,
            pad_token_id=0,
        )
    )
    for i, module in enumerate((unet, vae, text)):
        state = random_state_dict(module, seed + i)
        for name in state:
            if ".attn1.to_q." in name or ".attn1.to_k." in name:
                state[name] = state[name] * sharpen
        module.load_state_dict(state)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
        prediction_type="epsilon",
    )
    # CLIP's byte-level alphabet (as its BPE writes it) and its two special tokens; no merges
    chars = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    alphabet, extra = list(chars), 0
    for b in range(256):
        if b not in chars:
            chars.append(b)
            alphabet.append(256 + extra)
            extra += 1
    byte_chars = [chr(c) for c in alphabet]
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (Path(tmp) / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), pad_token="!", model_max_length=77
        )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path))
    return path

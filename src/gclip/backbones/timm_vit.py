"""The :class:`~gclip.backbones.base.Backbone` of timm's ``VisionTransformer``: the second implementation of the
adapter, and the walk of the second models (:mod:`.second_models`: DINO, DINOv2 with registers, MAE).

What it covers of timm's ViT: fused ``qkv`` with ``q_norm``/``k_norm``, an optional CLS token
(``cls_token``), register tokens (``num_prefix_tokens``), position embeddings that cover the patches only
(``no_embed_class``) or also every prefix token, or no position embedding at all; layer scale (``ls1``/``ls2``), the
attention's inner norm (``attn.norm``), an MLP with or without its inner norm (``Mlp``, ``GluMlp``, ``SwiGLU``:
anything with an ``fc2``), ``Block`` and ``ResPostBlock`` layouts, ``norm_pre`` and the final ``norm``. A tower has no
projection unless one is given. What it does not cover is refused in one line when the adapter is built (rotary
position attention such as Eva/RoPE towers, gated attention, parallel blocks).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch
from torch import nn

from ..errors import ConfigError, WeightsError
from .base import FFN_OUT_WEIGHT, Attention, Backbone
from .openclip import resample_pos_embed

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "TimmViT", "is_timm_vit"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MODULE_CS_NAME = "mlp.fc2.weight"
"""timm's name of the FFN output weight (Channel Suppression's override), relative to a block."""


def is_timm_vit(module: nn.Module) -> bool:
    """Whether ``module`` is a timm ``VisionTransformer`` (or a subclass); timm is not imported for this (a timm
    model exists only once timm's module is loaded)."""
    vision_transformer = sys.modules.get("timm.models.vision_transformer")
    return vision_transformer is not None and isinstance(module, vision_transformer.VisionTransformer)


def layer_scale(block: nn.Module, branch: int, y: torch.Tensor) -> torch.Tensor:
    """A block's layer scale of branch 1 (attention) or 2 (FFN): timm ViT's ``ls1``/``ls2`` modules or Eva's
    ``gamma_1``/``gamma_2`` parameters; none: ``y`` as it is."""
    module = getattr(block, f"ls{branch}", None)
    if module is not None:
        return module(y)
    gamma = getattr(block, f"gamma_{branch}", None)
    return y if gamma is None else gamma * y


def _vit_layout(block: nn.Module) -> str:
    """``"pre"`` (timm's ``Block``) or ``"post"`` (``ResPostBlock``); a one-line error for any other block."""
    from timm.layers import Attention as TimmAttention
    from timm.models.vision_transformer import Block, ResPostBlock

    name = type(block).__name__
    if not isinstance(block, (Block, ResPostBlock)):
        raise WeightsError(f"timm ViT block {name}: no dense-walk adapter for this block layout")
    attn = block.attn
    if type(attn) is not TimmAttention:
        raise WeightsError(f"timm ViT block {name} with {type(attn).__name__}: no dense-walk adapter for its attention")
    if getattr(attn, "gate", None) is not None:
        raise WeightsError(f"timm ViT block {name}: gated attention has no dense-walk adapter")
    if getattr(block.mlp, "fc2", None) is None:
        raise WeightsError(f"timm ViT block {name}: its MLP has no fc2 output layer")
    return "post" if isinstance(block, ResPostBlock) else "pre"


class TimmViT(Backbone):
    """The :class:`~gclip.backbones.base.Backbone` of a timm ``VisionTransformer`` (see the module docstring).

    Args:
        model: the tower (only read, never modified).
        mean, std: the normalisation of the images it is given (0..1 scale, RGB); by default the model's
            ``pretrained_cfg``'s, else ImageNet's.
        projection: into an embedding space, a ``(width, E)`` matrix or a module; ``None``: none (identity).

    Attributes:
        patch_size, width, depth, heads: read from the model; ``prefix_tokens``: its ``num_prefix_tokens`` (CLS and
        register tokens); ``has_cls``: whether it has a ``cls_token``.
    """

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        projection: torch.Tensor | nn.Module | None = None,
    ) -> None:
        self.module = self.trunk = model
        cfg = getattr(model, "pretrained_cfg", None) or {}
        self.mean = tuple(mean if mean is not None else cfg.get("mean", IMAGENET_MEAN))
        self.std = tuple(std if std is not None else cfg.get("std", IMAGENET_STD))
        self.blocks: nn.Sequential = model.blocks
        self._layouts = [self._layout(b) for b in self.blocks]
        """``"pre"`` or ``"post"`` per block (:meth:`_layout`)."""
        proj = model.patch_embed.proj
        ph, pw = proj.kernel_size
        if (ph, pw) != tuple(proj.stride) or ph != pw:
            raise WeightsError(f"timm ViT with {ph}x{pw} patches at stride {tuple(proj.stride)}: square patches only")
        self.patch_size, self.width, self.depth = int(ph), int(model.embed_dim), len(self.blocks)
        self.heads = int(self.blocks[0].attn.num_heads)
        self.prefix_tokens = int(model.num_prefix_tokens)
        self.has_cls = getattr(model, "cls_token", None) is not None
        self.pos_prefix = 0 if getattr(model, "no_embed_class", False) else self.prefix_tokens
        """Rows of the position embedding before the patches' (0: the prefix tokens carry no position)."""
        self._projection = projection
        self._pos_cache: dict[tuple[int, int, str, torch.dtype, torch.device], torch.Tensor] = {}

    _layout = staticmethod(_vit_layout)
    """A block's layout, ``"pre"`` or ``"post"``; a one-line error for a block the walk does not reproduce."""

    @property
    def dtype(self) -> torch.dtype:
        return self.trunk.patch_embed.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.trunk.patch_embed.proj.weight.device

    @property
    def native_grid(self) -> tuple[int, int]:
        pos = self.trunk.pos_embed
        if pos is None:
            gh, gw = self.trunk.patch_embed.grid_size
            return int(gh), int(gw)
        side = int(round(math.sqrt(pos.shape[1] - self.pos_prefix)))
        return side, side

    # --- tokens -------------------------------------------------------------------------------------------
    def pos_embed(self, grid: tuple[int, int], rule: str = "sclip") -> torch.Tensor | None:
        """The position embedding for a ``(gh, gw)`` patch grid, ``(pos_prefix + gh*gw, D)``: the prefix tokens'
        rows as they are, the patches' resampled by ``rule`` (:func:`~gclip.backbones.openclip.resample_pos_embed`);
        resampled once per grid, rule, dtype and device. ``None`` for a tower without one."""
        pos = self.trunk.pos_embed
        if pos is None:
            return None
        key = (int(grid[0]), int(grid[1]), rule, pos.dtype, pos.device)
        if key not in self._pos_cache:
            rows = pos.detach()[0]
            head, body = rows[: self.pos_prefix], rows[self.pos_prefix :]
            # resample_pos_embed keeps one leading (CLS) row as it is: give it a placeholder, then drop it
            resized = resample_pos_embed(torch.cat([body.new_zeros((1, body.shape[-1])), body]), key[:2], rule)[1:]
            self._pos_cache[key] = torch.cat([head, resized]) if self.pos_prefix else resized
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor, pos_rule: str = "sclip") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, H, W)`` images (H, W multiples of the patch) -> ``(B, P+N, D)`` tokens after
        ``norm_pre`` (CLS, registers, then the patches), the position embedding resampled by ``pos_rule``
        (:meth:`pos_embed`), and the ``(gh, gw)`` grid."""
        m = self.trunk
        if images.shape[-2] % self.patch_size or images.shape[-1] % self.patch_size:
            raise ConfigError(
                f"a timm ViT with {self.patch_size}-pixel patches needs image sides that are multiples of "
                f"{self.patch_size}, got {images.shape[-2]}x{images.shape[-1]}"
            )
        x = m.patch_embed.proj(images.to(self.dtype))
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = m.patch_embed.norm(x.flatten(2).transpose(1, 2))
        b = x.shape[0]
        prefix = [t.expand(b, -1, -1).to(x.dtype) for t in (m.cls_token, m.reg_token) if t is not None]
        pos = self.pos_embed(grid, pos_rule)
        if pos is None:
            x = torch.cat([*prefix, x], dim=1)
        elif self.pos_prefix == 0:  # no_embed_class: the prefix tokens carry no position
            x = torch.cat([*prefix, x + pos.to(x.dtype)], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos.to(x.dtype)
        return m.norm_pre(m.pos_drop(x)), grid

    # --- one block ----------------------------------------------------------------------------------------
    def block(
        self,
        index: int,
        x: torch.Tensor,
        attention: Attention | None = None,
        residual: bool = True,
        ffn: bool = True,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """:meth:`Backbone.block <gclip.backbones.base.Backbone.block>`; ``overrides`` may also name any other
        parameter of the timm block (``"mlp.fc2.weight"`` is the FFN output weight). The unchanged block is the
        module itself (timm's attention is ``scaled_dot_product_attention`` already), with ``overrides`` through
        ``torch.func.functional_call``; a changed one is the walk."""
        overrides = dict(overrides or {})
        out_weight = overrides.pop(FFN_OUT_WEIGHT, overrides.pop(_MODULE_CS_NAME, None))
        if attention is None and residual and ffn:
            if out_weight is not None:
                overrides[_MODULE_CS_NAME] = out_weight
            return self._module_block(index, x, overrides)
        if overrides:
            raise ValueError(f"block {index}: only {FFN_OUT_WEIGHT!r} can be overridden in a changed block")
        cs = None if out_weight is None else {FFN_OUT_WEIGHT: out_weight}
        return super().block(index, x, attention, residual, ffn, cs)

    def _module_block(self, index: int, x: torch.Tensor, overrides: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The timm block ``index`` called as it is, its parameters ``overrides`` replaced."""
        blk = self.blocks[index]
        return torch.func.functional_call(blk, dict(overrides), (x,)) if overrides else blk(x)

    def pre_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[index].norm1(x) if self._layouts[index] == "pre" else x

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` for its input tokens ``x``, each ``(B, heads, P+N, head_dim)``: ``norm1``,
        the fused ``qkv``, then ``q_norm``/``k_norm``."""
        attn = self.blocks[index].attn
        y = self.pre_norm(index, x)
        b, n, _ = y.shape
        q, k, v = attn.qkv(y).reshape(b, n, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return attn.q_norm(q), attn.k_norm(k), v

    def out_proj(self, index: int, heads_out: torch.Tensor) -> torch.Tensor:
        """``(B, heads, N, head_dim)`` heads (or merged ``(B, N, heads*head_dim)``) -> merge, the attention's inner
        ``norm``, ``proj``."""
        attn = self.blocks[index].attn
        if heads_out.dim() == 4:
            b, h, n, d = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(b, n, h * d)
        return attn.proj(attn.norm(heads_out))

    def attn_residual(self, index: int, attn_out: torch.Tensor) -> torch.Tensor:
        """Layer scale (:func:`layer_scale`) of a pre-norm block, or the post-norm ``norm1`` (``ResPostBlock``)."""
        blk = self.blocks[index]
        return layer_scale(blk, 1, attn_out) if self._layouts[index] == "pre" else blk.norm1(attn_out)

    def ffn(self, index: int, x: torch.Tensor, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """``ls2(mlp(norm2(x)))`` (a pre-norm block, :func:`layer_scale`) or ``norm2(mlp(x))`` (``ResPostBlock``),
        optionally with the MLP's ``fc2.weight`` replaced (Channel Suppression)."""
        blk = self.blocks[index]
        pre = self._layouts[index] == "pre"
        y = blk.norm2(x) if pre else x
        y = blk.mlp(y) if out_weight is None else torch.func.functional_call(blk.mlp, {"fc2.weight": out_weight}, (y,))
        return layer_scale(blk, 2, y) if pre else blk.norm2(y)

    def ffn_out_weight(self, index: int) -> torch.Tensor:
        return self.blocks[index].mlp.fc2.weight

    def ffn_module(self, index: int) -> nn.Module:
        return self.blocks[index].mlp

    # --- output -------------------------------------------------------------------------------------------
    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """timm's final ``norm`` (what ``forward_features`` ends with; an ``fc_norm`` of pooled features is not
        applied)."""
        return self.trunk.norm(tokens)

    def projection(self, tokens: torch.Tensor) -> torch.Tensor:
        p = self._projection
        if p is None:
            return tokens
        return p(tokens) if isinstance(p, nn.Module) else tokens @ p.to(tokens.dtype)

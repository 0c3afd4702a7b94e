"""The :class:`~gclip.backbones.base.Backbone` of timm's ``Eva``: EVA-02, Perception Encoder (PE-Core) and the other
rotary-position ViTs timm builds with it.

It is :class:`~gclip.backbones.timm_vit.TimmViT` (patch embedding, CLS and register tokens, absolute position
embeddings resampled to any grid, pre- and post-norm blocks, layer scale, the final norm) with Eva's blocks:

- attention: ``EvaAttention`` (fused ``qkv`` with its separate ``q_bias``/``v_bias``, or separate
  ``q_proj``/``k_proj``/``v_proj``) or ``AttentionRope`` (fused or separate, grouped key/value heads expanded to
  every head), ``q_norm``/``k_norm``, the inner ``norm`` before ``proj``;
- rotary position embeddings (RoPE): :meth:`TimmEva.qkv` rotates q and k of the patch tokens as the block does
  (the prefix tokens, CLS and registers, are not rotated), so that every method's own attention, built from
  :meth:`~TimmEva.qkv` (q-q, k-k, v-v, fused maps), compares rotated queries and keys exactly as the tower does.
  v is never rotated, so v-v attention carries no rotary position, as in the tower. The rotation of a ``(gh, gw)``
  grid is timm's: the tower's cached one at its native grid, elsewhere the one timm builds for a tower of that
  size (``RotaryEmbeddingCat``: the same frequency bands on the new grid, with the tower's ``ref_feat_shape``
  scaling, what ``dynamic_img_size`` and ``set_input_size`` give); a module without a cache, such as DINOv3's
  ``RotaryEmbeddingDinoV3`` (coordinates normalised to [-1, 1] per side), builds the rotation of each grid itself
  (``get_embed(shape=...)``, what timm's ``dynamic_img_size`` forward does);
- MLP: ``Mlp``, ``GluMlp`` and ``SwiGLU`` with or without its inner norm (EVA-02's sub-norm): the output weight
  ``fc2`` is the FFN output weight Channel Suppression replaces (:meth:`~TimmEva.ffn_out_weight`);
- layer scale: ``gamma_1``/``gamma_2`` (:func:`~gclip.backbones.timm_vit.layer_scale`).

What it does not cover is refused in one line when the adapter is built: gated attention, per-depth ("mixed") RoPE,
RoPE modules without a grid rule gclip knows.

The rotation needs the patch grid of the tokens a block is given; :meth:`TimmEva.embed` records it per token count
(:meth:`~TimmEva.token_layout`: the latest grid of a count wins; tokens with their prefix or the patch tokens alone;
a square grid is assumed for a count never embedded).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsError
from .timm_vit import TimmViT

__all__ = ["TimmEva", "is_timm_eva", "rope_embed"]


def is_timm_eva(module: nn.Module) -> bool:
    """Whether ``module`` is a timm ``Eva`` (timm is not imported for this)."""
    eva = sys.modules.get("timm.models.eva")
    return eva is not None and isinstance(module, eva.Eva)


def _eva_layout(block: nn.Module) -> str:
    """``"pre"`` (``EvaBlock``) or ``"post"`` (``EvaBlockPostNorm``); a one-line error for any other block."""
    from timm.layers import AttentionRope
    from timm.models.eva import EvaAttention, EvaBlock, EvaBlockPostNorm

    name = type(block).__name__
    if not isinstance(block, (EvaBlock, EvaBlockPostNorm)):
        raise WeightsError(f"timm Eva block {name}: no dense-walk adapter for this block layout")
    attn = block.attn
    if type(attn) not in (EvaAttention, AttentionRope):
        raise WeightsError(f"timm Eva block {name} with {type(attn).__name__}: no dense-walk adapter for its attention")
    if getattr(attn, "gate", None) is not None:
        raise WeightsError(f"timm Eva block {name}: gated attention has no dense-walk adapter")
    if getattr(block.mlp, "fc2", None) is None:
        raise WeightsError(f"timm Eva block {name}: its MLP has no fc2 output layer")
    return "post" if isinstance(block, EvaBlockPostNorm) else "pre"


def rope_embed(rope: nn.Module, grid: tuple[int, int]) -> torch.Tensor:
    """timm's rotary embedding of a ``(gh, gw)`` patch grid, ``(gh*gw, 2 * rot_dim)`` (sines then cosines).

    At the grid the module caches (the tower's native one) it is the cache, as the tower's own forward reads it;
    a module without a cache builds it for the grid (``get_embed(shape=...)``, as a ``dynamic_img_size`` tower
    does); a cached ``RotaryEmbeddingCat`` at another grid builds it from its frequency bands for that grid
    (what ``dynamic_img_size`` and ``set_input_size`` give for a tower of that size)."""
    from timm.layers import RotaryEmbeddingCat

    feat = getattr(rope, "feat_shape", None)
    if feat is not None and tuple(feat) == tuple(grid):
        return rope.get_embed()
    if feat is None:
        return rope.get_embed(shape=list(grid))
    if isinstance(rope, RotaryEmbeddingCat):
        return rope._build_embed_cat(list(grid), rope.bands)
    raise WeightsError(f"{type(rope).__name__}: no rule for its rotary embedding at a {grid[0]}x{grid[1]} grid")


class TimmEva(TimmViT):
    """The :class:`~gclip.backbones.base.Backbone` of a timm ``Eva`` (see the module docstring).

    Args:
        model: the tower (only read, never modified).
        mean, std: the normalisation of the images it is given (0..1 scale, RGB); by default the model's
            ``pretrained_cfg``'s, else ImageNet's.
        projection: into an embedding space, a ``(width, E)`` matrix or a module; ``None``: none (identity).

    Attributes:
        rope: the tower's rotary embedding module (``None``: absolute positions only).
    """

    _layout = staticmethod(_eva_layout)

    def __init__(
        self,
        model: nn.Module,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        projection: torch.Tensor | nn.Module | None = None,
    ) -> None:
        super().__init__(model, mean, std, projection)
        self.rope = getattr(model, "rope", None)
        if getattr(model, "rope_mixed", False):
            raise WeightsError("timm Eva with per-depth (mixed) RoPE: no dense-walk adapter")
        self._grids: dict[int, tuple[int, int]] = {}
        self._rope_cache: dict[tuple[int, int, torch.device], torch.Tensor] = {}

    # --- tokens -------------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, pos_rule: str = "sclip") -> tuple[torch.Tensor, tuple[int, int]]:
        """:meth:`TimmViT.embed <gclip.backbones.timm_vit.TimmViT.embed>`, and the grid recorded for the
        rotation of these tokens' q and k (:meth:`qkv`)."""
        x, grid = super().embed(images, pos_rule)
        self._grids[grid[0] * grid[1]] = grid
        return x, grid

    def token_layout(self, tokens: torch.Tensor) -> tuple[int, tuple[int, int]]:
        """``(prefix, grid)`` of ``(B, T, D)`` tokens: ``T = prefix_tokens + N`` tokens of a grid of ``N`` patches
        that :meth:`embed` made (the latest such grid), else ``T = N`` patch tokens alone (a method's purified or
        pooled patches, prefix 0), else a square grid after the prefix tokens; a one-line error otherwise."""
        t, p = tokens.shape[1], self.prefix_tokens
        if t - p in self._grids:
            return p, self._grids[t - p]
        if t in self._grids:
            return 0, self._grids[t]
        side = int(round(math.sqrt(t - p)))
        if side * side != t - p:
            raise ConfigError(f"{t} tokens that no embed() made: their patch grid, which RoPE needs, is unknown")
        return p, (side, side)

    def rotation(self, grid: tuple[int, int], device: torch.device) -> torch.Tensor | None:
        """The rotary embedding of a grid (:func:`rope_embed`), once per grid and device; ``None`` without RoPE."""
        if self.rope is None:
            return None
        key = (int(grid[0]), int(grid[1]), torch.device(device))
        if key not in self._rope_cache:
            self._rope_cache[key] = rope_embed(self.rope, key[:2]).to(device)
        return self._rope_cache[key]

    # --- one block ----------------------------------------------------------------------------------------
    def _module_block(self, index: int, x: torch.Tensor, overrides: Mapping[str, torch.Tensor]) -> torch.Tensor:
        blk = self.blocks[index]
        rope = self.rotation(self.token_layout(x)[1], x.device)
        if overrides:
            return torch.func.functional_call(blk, dict(overrides), (x,), {"rope": rope})
        return blk(x, rope=rope)

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` for its input tokens ``x``, each ``(B, heads, P+N, head_dim)``: ``norm1``
        (pre-norm blocks), the fused ``qkv`` (with Eva's separate biases) or ``q_proj``/``k_proj``/``v_proj``,
        ``q_norm``/``k_norm``, then RoPE on the patch tokens' q and k (:meth:`rotation` of their grid,
        :meth:`token_layout`: patch tokens without their prefix, as some methods attend among, are rotated by their
        grid positions as well); grouped key/value heads repeated to every head."""
        from timm.layers import apply_rot_embed_cat

        attn = self.blocks[index].attn
        y = self.pre_norm(index, x)
        b, n, _ = y.shape
        heads = attn.num_heads
        kv_heads = getattr(attn, "num_kv_heads", heads)
        if attn.qkv is not None:
            bias = getattr(attn, "q_bias", None)
            if bias is None:
                qkv = attn.qkv(y)
            elif getattr(attn, "qkv_bias_separate", False):
                qkv = attn.qkv(y) + torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
            else:
                qkv = F.linear(y, attn.qkv.weight, torch.cat((attn.q_bias, attn.k_bias, attn.v_bias)))
            q, k, v = qkv.reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = attn.q_proj(y).reshape(b, n, heads, -1).transpose(1, 2)
            k = attn.k_proj(y).reshape(b, n, kv_heads, -1).transpose(1, 2)
            v = attn.v_proj(y).reshape(b, n, kv_heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        p, grid = self.token_layout(x)
        rope = self.rotation(grid, x.device)
        if rope is not None:
            half = bool(getattr(attn, "rotate_half", False))
            q = torch.cat([q[:, :, :p], apply_rot_embed_cat(q[:, :, p:], rope, half=half)], dim=2).type_as(v)
            k = torch.cat([k[:, :, :p], apply_rot_embed_cat(k[:, :, p:], rope, half=half)], dim=2).type_as(v)
        if kv_heads != heads:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
        return q, k, v

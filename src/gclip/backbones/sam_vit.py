"""The :class:`~gclip.backbones.base.Backbone` of SAM's image encoder (segment-anything's ``ImageEncoderViT``): the
third implementation of the adapter, and the walk of the SAM second model (Trident's guidance).

SAM's encoder differs from a CLIP or timm ViT in three ways, each handled here:

- tokens live on the patch grid: ``(B, h, w, D)`` inside the module, ``(B, N, D)`` through the adapter (no prefix
  token: no CLS); the grid is the square one SAM's padded square input gives, recovered from ``N``;
- most blocks attend within 14 x 14 windows: those run only as the module runs them (a method's own attention there
  is a one-line error); the global blocks take any attention;
- its position information is partly an additive bias of the attention logits (decomposed relative positions), not
  a rotation of q and k: :meth:`SamViT.attention_logits` gives a block's own logits with it, and the block's own
  attention uses them; an attention a method writes from ``qkv`` has no relative positions.

The output is the neck (two convolutions and their norms) on the grid: :meth:`SamViT.projection`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .base import Attention, Backbone

__all__ = ["SamViT", "SAM_MEAN", "SAM_STD"]

SAM_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


class SamViT(Backbone):
    """The adapter of segment-anything's ``ImageEncoderViT`` (see the module docstring).

    Args:
        model: the image encoder (only read, never modified).
        mean, std: the normalisation of the images it is given (0..1 scale, RGB); SAM's by default.
    """

    prefix_tokens = 0
    has_cls = False

    def __init__(
        self, model: nn.Module, mean: tuple[float, ...] = SAM_MEAN, std: tuple[float, ...] = SAM_STD
    ) -> None:
        self.module = model
        self.mean, self.std = tuple(mean), tuple(std)
        proj = model.patch_embed.proj
        self.patch_size, self.width = int(proj.kernel_size[0]), int(proj.out_channels)
        self.depth, self.heads = len(model.blocks), int(model.blocks[0].attn.num_heads)

    @staticmethod
    def grid_of(tokens: torch.Tensor) -> tuple[int, int]:
        """The square ``(h, w)`` patch grid of ``(B, N, D)`` tokens (SAM's input is a padded square)."""
        side = math.isqrt(tokens.shape[1])
        if side * side != tokens.shape[1]:
            raise ConfigError(f"SAM's encoder works on a square patch grid, got {tokens.shape[1]} tokens")
        return side, side

    def _on_grid(self, tokens: torch.Tensor) -> torch.Tensor:
        h, w = self.grid_of(tokens)
        return tokens.reshape(tokens.shape[0], h, w, tokens.shape[-1])

    # --- tokens -------------------------------------------------------------------------------------------
    def embed(self, images: torch.Tensor, pos_rule: str = "sclip") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, S, S)`` images at SAM's input size -> ``(B, N, D)`` patch tokens with SAM's absolute
        position embedding (``pos_rule`` is not used: SAM's input size is fixed), and the ``(h, w)`` grid."""
        x = self.module.patch_embed(images)  # (B, h, w, D)
        pos = self.module.pos_embed
        if pos is not None:
            if tuple(pos.shape[1:3]) != tuple(x.shape[1:3]):
                raise ConfigError(
                    f"SAM's encoder takes {pos.shape[1] * self.patch_size} px square inputs, got "
                    f"{images.shape[-2]}x{images.shape[-1]}"
                )
            x = x + pos
        b, h, w, d = x.shape
        return x.reshape(b, h * w, d), (h, w)

    # --- blocks -------------------------------------------------------------------------------------------
    def windowed(self, index: int) -> bool:
        """Whether block ``index`` attends within windows (its own attention only)."""
        return self.module.blocks[index].window_size > 0

    def pre_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.module.blocks[index].norm1(x)

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Block ``index``'s ``(B, heads, N, d)`` q, k, v over the whole grid (global blocks only)."""
        if self.windowed(index):
            raise ConfigError(
                f"SAM block {index} attends within {self.module.blocks[index].window_size}x"
                f"{self.module.blocks[index].window_size} windows: only its own attention runs there"
            )
        attn = self.module.blocks[index].attn
        b, n, _ = x.shape
        qkv = attn.qkv(self.pre_norm(index, x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def attention_logits(self, index: int, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s own attention logits ``(B, heads, N, N)`` before the softmax: ``q kᵀ d^-½`` plus the
        decomposed relative positions, computed as SAM computes them."""
        attn_mod = self.module.blocks[index].attn
        logits = (q * attn_mod.scale) @ k.transpose(-2, -1)
        if not attn_mod.use_rel_pos:
            return logits
        from segment_anything.modeling.image_encoder import add_decomposed_rel_pos

        b, h, n, d = q.shape
        side = math.isqrt(n)
        flat = add_decomposed_rel_pos(
            logits.reshape(b * h, n, n), q.reshape(b * h, n, d), attn_mod.rel_pos_h, attn_mod.rel_pos_w,
            (side, side), (side, side),
        )  # fmt: skip
        return flat.view(b, h, n, n)

    def out_proj(self, index: int, heads_out: torch.Tensor) -> torch.Tensor:
        if heads_out.dim() == 4:
            b, h, n, d = heads_out.shape
            heads_out = heads_out.transpose(1, 2).reshape(b, n, h * d)
        return self.module.blocks[index].attn.proj(heads_out)

    def attn_residual(self, index: int, attn_out: torch.Tensor) -> torch.Tensor:
        return attn_out  # SAM's blocks have no layer scale

    def ffn(self, index: int, x: torch.Tensor, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        blk = self.module.blocks[index]
        mlp = blk.mlp
        hidden = mlp.act(mlp.lin1(blk.norm2(x)))
        return F.linear(hidden, mlp.lin2.weight if out_weight is None else out_weight, mlp.lin2.bias)

    def ffn_out_weight(self, index: int) -> torch.Tensor:
        return self.module.blocks[index].mlp.lin2.weight

    def ffn_module(self, index: int) -> nn.Module:
        return self.module.blocks[index].mlp

    def block(
        self,
        index: int,
        x: torch.Tensor,
        attention: Attention | None = None,
        residual: bool = True,
        ffn: bool = True,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Block ``index`` on ``(B, N, D)`` tokens. Unchanged, it runs as the module runs it (windows included); a
        change needs a global block, whose own attention (``attention=None``) keeps its relative positions."""
        if attention is None and residual and ffn and not overrides:
            blk = self.module.blocks[index]
            return blk(self._on_grid(x)).reshape(x.shape)
        if self.windowed(index):
            self.qkv(index, x)  # the one-line error: a windowed block only runs as it is
        if attention is None:

            def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
                return torch.softmax(self.attention_logits(index, q, k), dim=-1) @ v

        return super().block(index, x, attention, residual, ffn, overrides)

    # --- output -------------------------------------------------------------------------------------------
    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # SAM's norms are in its neck

    def projection(self, tokens: torch.Tensor) -> torch.Tensor:
        """The neck on the grid: ``(B, N, D)`` -> ``(B, N, out_chans)``."""
        out = self.module.neck(self._on_grid(tokens).permute(0, 3, 1, 2))
        return out.flatten(2).transpose(1, 2)

"""The dense walk through an open_clip ViT: patch embedding, position-embedding resampling, blocks 0..L-2.

Every method shares this walk; they differ only in what the last block does (see ``gclip.methods``).
q/k/v are computed from ``in_proj_weight``/``in_proj_bias`` so that the walk works with both of open_clip's
attention blocks (``nn.MultiheadAttention`` and its own ``Attention``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DenseViT", "resample_pos_embed"]


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Resample a ``(1 + G*G, D)`` position embedding to a ``gh x gw`` patch grid.

    The SCLIP/ClearCLIP rule: bicubic, ``scale_factor = (g + 0.1) / G``, ``align_corners=False``, no
    antialias; the CLS embedding is kept as is.

    Returns:
        ``(1 + gh*gw, D)``.
    """
    gh, gw = grid
    n = pos.shape[0] - 1
    side = int(round(math.sqrt(n)))
    if side * side != n:
        raise ValueError(f"position embedding of {n} patches is not a square grid")
    if (gh, gw) == (side, side):
        return pos
    cls_pos, patch_pos = pos[:1], pos[1:]
    grid_pos = patch_pos.reshape(1, side, side, -1).permute(0, 3, 1, 2)
    dtype = grid_pos.dtype
    resized = F.interpolate(
        grid_pos.float(),
        scale_factor=((gh + 0.1) / side, (gw + 0.1) / side),
        mode="bicubic",
        align_corners=False,
    ).to(dtype)
    if resized.shape[-2:] != (gh, gw):  # guard against rounding surprises
        raise RuntimeError(f"resampled grid {tuple(resized.shape[-2:])} != {(gh, gw)}")
    return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)


class DenseViT:
    """A view on an open_clip ``VisionTransformer`` that yields dense (per-patch) tokens.

    Args:
        visual: ``clip_model.visual`` of an open_clip CLIP ViT. It is only read, never modified.

    Attributes:
        patch_size, width, depth, heads: read from the model.
    """

    def __init__(self, visual: nn.Module) -> None:
        self.visual = visual
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.width = int(visual.conv1.out_channels)
        self.blocks: nn.ModuleList = visual.transformer.resblocks
        self.depth = len(self.blocks)
        self.heads = int(self.blocks[0].attn.num_heads)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self._pos_cache: dict[tuple[int, int, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    def pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """The position embedding for a grid, resampled once and cached."""
        pos = self.visual.positional_embedding
        key = (grid[0], grid[1], pos.dtype, pos.device)
        if key not in self._pos_cache:
            self._pos_cache[key] = resample_pos_embed(pos.detach(), grid)
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, H, W)`` images (H, W multiples of the patch) -> ``(B, 1+N, D)`` tokens after ln_pre."""
        v = self.visual
        x = v.conv1(images.to(self.dtype))
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid).to(x.dtype)
        return v.ln_pre(x), grid

    def run_block(
        self, index: int, x: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """One block on NLD tokens, optionally with some of its parameters replaced (functionally)."""
        block = self.blocks[index]
        if not self.batch_first:
            x = x.transpose(0, 1)
        if overrides:
            out = torch.func.functional_call(block, dict(overrides), (x,))
        else:
            out = block(x)
        return out if self.batch_first else out.transpose(0, 1)

    def walk(
        self,
        x: torch.Tensor,
        keep: frozenset[int] | set[int] = frozenset(),
        overrides: Mapping[int, Mapping[str, torch.Tensor]] | None = None,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Run blocks ``0..L-2``.

        Args:
            x: ``(B, 1+N, D)`` tokens from :meth:`embed`.
            keep: indices of blocks whose INPUT tokens should be returned.
            overrides: per block index, parameters to use instead of the model's (e.g. a suppressed FFN).

        Returns:
            ``(x_last, kept)``: the tokens entering the last block, and ``{i: input of block i}``.
        """
        kept: dict[int, torch.Tensor] = {}
        overrides = overrides or {}
        for i in range(self.depth - 1):
            if i in keep:
                kept[i] = x
            x = self.run_block(i, x, overrides.get(i))
        return x, kept

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` for NLD tokens ``x`` (its input), each ``(B, heads, N, head_dim)``."""
        block = self.blocks[index]
        y = block.ln_1(x)
        attn = block.attn
        qkv = F.linear(y, attn.in_proj_weight, attn.in_proj_bias)
        b, n, _ = qkv.shape
        q, k, v = qkv.reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        return q, k, v

    def out_proj(self, index: int, heads_out: torch.Tensor) -> torch.Tensor:
        """Merge ``(B, heads, N, head_dim)`` and apply block ``index``'s attention output projection."""
        b, h, n, d = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(b, n, h * d)
        return self.blocks[index].attn.out_proj(merged)

    def ffn(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s FFN branch with its layer scale: ``ls_2(mlp(ln_2(x)))``."""
        block = self.blocks[index]
        return block.ls_2(block.mlp(block.ln_2(x)))

    def attn_residual(self, index: int, attn_out: torch.Tensor) -> torch.Tensor:
        """What the block adds to the residual stream from an attention output (layer scale, optional norm)."""
        block = self.blocks[index]
        ln_attn = getattr(block, "ln_attn", None)
        if ln_attn is not None:
            attn_out = ln_attn(attn_out)
        return block.ls_1(attn_out)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, N, D)`` -> CLIP embedding space ``(B, N, E)`` through ln_post and proj."""
        return self.visual.ln_post(tokens) @ self.visual.proj

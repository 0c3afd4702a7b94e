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

CS_OVERRIDE = "mlp.c_proj.weight"
"""The parameter Channel Suppression replaces, computed by :meth:`DenseViT.run_block` itself."""


def _manual_ok(block: nn.Module) -> bool:
    """Whether :meth:`DenseViT.run_block` reproduces ``block`` (else the module is called)."""
    attn = getattr(block, "attn", None)
    if attn is None or getattr(attn, "in_proj_weight", None) is None:
        return False
    if isinstance(attn, nn.MultiheadAttention):
        return attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
    return getattr(attn, "logit_scale", None) is None  # open_clip's scaled cosine attention: the module's own


def _head_scale(attn: nn.Module, heads_out: torch.Tensor) -> torch.Tensor:
    """open_clip's per-head output scale (``scale_heads``), when the attention has one."""
    scale = getattr(attn, "head_scale", None)
    return heads_out if scale is None else heads_out * scale


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
        """One block on NLD tokens, optionally with some of its parameters replaced (functionally).

        The block is computed here (``ln_1`` -> q/k/v -> ``scaled_dot_product_attention`` -> ``out_proj`` ->
        layer scale; ``ln_2`` -> MLP -> layer scale) rather than by calling the module: on a CPU
        ``nn.MultiheadAttention``'s inference fast path materialises the N x N attention map of every head,
        while ``scaled_dot_product_attention`` works in blocks. The one override computed here is
        ``"mlp.c_proj.weight"`` (Channel Suppression); any other override, and attention options this walk does
        not reproduce (open_clip's scaled cosine attention, attention masks on the module), go through the
        module itself (``torch.func.functional_call``).
        """
        block = self.blocks[index]
        overrides = dict(overrides or {})
        c_proj_weight = overrides.pop(CS_OVERRIDE, None)
        if overrides or not _manual_ok(block):
            if c_proj_weight is not None:
                overrides[CS_OVERRIDE] = c_proj_weight
            return self._module_block(block, x, overrides)
        q, k, v = self.qkv(index, x)
        attn = _head_scale(block.attn, F.scaled_dot_product_attention(q, k, v))
        out = x + self.attn_residual(index, self.out_proj(index, attn))
        del q, k, v, attn
        y = block.ln_2(out)
        if c_proj_weight is None:
            y = block.mlp(y)
        else:
            for name, module in block.mlp.named_children():
                if name == "c_proj":
                    y = F.linear(y, c_proj_weight, module.bias)
                else:
                    y = module(y)
        out += block.ls_2(y)
        return out

    def _module_block(self, block: nn.Module, x: torch.Tensor, overrides: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = torch.func.functional_call(block, dict(overrides), (x,)) if overrides else block(x)
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
        ln_q, ln_k = getattr(attn, "ln_q", None), getattr(attn, "ln_k", None)  # qk_norm (custom Attention)
        if ln_q is not None and not isinstance(ln_q, nn.Identity):
            q = ln_q(q)
        if ln_k is not None and not isinstance(ln_k, nn.Identity):
            k = ln_k(k)
        return q, k, v

    def out_proj(self, index: int, heads_out: torch.Tensor) -> torch.Tensor:
        """Merge ``(B, heads, N, head_dim)`` and apply block ``index``'s attention output projection."""
        b, h, n, d = heads_out.shape
        merged = heads_out.transpose(1, 2).reshape(b, n, h * d)
        attn = self.blocks[index].attn
        ln_inner = getattr(attn, "ln_inner", None)  # scale_attn_inner (custom Attention)
        if ln_inner is not None:
            merged = ln_inner(merged)
        return attn.out_proj(merged)

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

"""The :class:`~gclip.backbones.base.Backbone` of open_clip's ``VisionTransformer``: patch embedding,
position-embedding resampling, one block at a time.

q/k/v are computed from ``in_proj_weight``/``in_proj_bias`` so that the walk works with both of open_clip's
attention blocks (``nn.MultiheadAttention`` and its own ``Attention``), and every attention output goes through
one projection helper (:meth:`DenseViT.out_proj`: per-head scale, inner norm, output projection).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..inference.preprocess import OPENAI_MEAN, OPENAI_STD
from .base import FFN_OUT_WEIGHT, Attention, Backbone

__all__ = ["DenseViT", "Attention", "resample_pos_embed"]

CS_OVERRIDE = FFN_OUT_WEIGHT
"""The override key of the FFN output weight that Channel Suppression replaces (open_clip's ``mlp.c_proj.weight``)."""
_MODULE_CS_NAME = "mlp.c_proj.weight"


def _manual_ok(block: nn.Module) -> bool:
    """Whether :meth:`DenseViT.run_block` reproduces ``block`` (else the module is called)."""
    attn = getattr(block, "attn", None)
    if attn is None or getattr(attn, "in_proj_weight", None) is None:
        return False
    if isinstance(attn, nn.MultiheadAttention):
        return attn._qkv_same_embed_dim and attn.bias_k is None and not attn.add_zero_attn
    return getattr(attn, "logit_scale", None) is None  # open_clip's scaled cosine attention: the module's own


def resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int], rule: str = "sclip") -> torch.Tensor:
    """Resample a ``(1 + G*G, D)`` position embedding to a ``gh x gw`` patch grid.

    ``rule="sclip"``: the SCLIP/ClearCLIP rule, bicubic with ``scale_factor = (g + 0.1) / G``,
    ``align_corners=False``, no antialias. ``rule="antialias"``: timm's ``resample_abs_pos_embed`` as GEM uses
    it, bicubic to the size with ``antialias=True`` (a different cubic kernel, also when upsampling).
    ``rule="size"``: bicubic to the size, no antialias (MAE's ``interpolate_pos_embed``). ``rule="bilinear"``:
    bilinear to the size, no antialias (CLIPer). The CLS embedding is kept as is.

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
    if rule == "sclip":
        scale = ((gh + 0.1) / side, (gw + 0.1) / side)
        resized = F.interpolate(grid_pos.float(), scale_factor=scale, mode="bicubic", align_corners=False)
    elif rule in ("antialias", "size"):
        resized = F.interpolate(grid_pos.float(), size=(gh, gw), mode="bicubic", antialias=rule == "antialias")
    elif rule == "bilinear":
        resized = F.interpolate(grid_pos.float(), size=(gh, gw), mode="bilinear", align_corners=False)
    else:
        raise ValueError(f"position embedding rule must be 'sclip', 'antialias', 'size' or 'bilinear', got {rule!r}")
    resized = resized.to(dtype)
    if resized.shape[-2:] != (gh, gw):  # guard against rounding surprises
        raise RuntimeError(f"resampled grid {tuple(resized.shape[-2:])} != {(gh, gw)}")
    return torch.cat([cls_pos, resized.permute(0, 2, 3, 1).reshape(gh * gw, -1)], dim=0)


class DenseViT(Backbone):
    """The :class:`~gclip.backbones.base.Backbone` of an open_clip ``VisionTransformer`` (one CLS token, absolute
    position embeddings resampled to any grid, ``ln_post`` and ``proj``).

    Args:
        visual: ``clip_model.visual`` of an open_clip CLIP ViT. It is only read, never modified.
        mean, std: the normalisation of the images it is given (0..1 scale, RGB; OpenAI's by default), for
            methods that look at the pixels again (e.g. to feed a second model).

    Attributes:
        patch_size, width, depth, heads: read from the model.
    """

    def __init__(
        self,
        visual: nn.Module,
        mean: tuple[float, ...] = OPENAI_MEAN,
        std: tuple[float, ...] = OPENAI_STD,
    ) -> None:
        self.visual = self.module = visual
        self.mean, self.std = tuple(mean), tuple(std)
        self.prefix_tokens, self.has_cls = 1, True
        self.patch_size = int(visual.conv1.kernel_size[0])
        self.width = int(visual.conv1.out_channels)
        self.blocks: nn.ModuleList = visual.transformer.resblocks
        self.depth = len(self.blocks)
        self.heads = int(self.blocks[0].attn.num_heads)
        self.batch_first = bool(getattr(visual.transformer, "batch_first", True))
        self._pos_cache: dict[tuple[int, int, str, torch.dtype, torch.device], torch.Tensor] = {}

    @property
    def dtype(self) -> torch.dtype:
        return self.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.visual.conv1.weight.device

    @property
    def native_grid(self) -> tuple[int, int]:
        side = int(round(math.sqrt(self.visual.positional_embedding.shape[0] - 1)))
        return side, side

    def pos_embed(self, grid: tuple[int, int], rule: str = "sclip") -> torch.Tensor:
        """The position embedding for a grid (:func:`resample_pos_embed` ``rule``), resampled once and cached."""
        pos = self.visual.positional_embedding
        key = (grid[0], grid[1], rule, pos.dtype, pos.device)
        if key not in self._pos_cache:
            self._pos_cache[key] = resample_pos_embed(pos.detach(), grid, rule)
        return self._pos_cache[key]

    def embed(self, images: torch.Tensor, pos_rule: str = "sclip") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, H, W)`` images (H, W multiples of the patch) -> ``(B, 1+N, D)`` tokens after ln_pre,
        the position embedding resampled by ``pos_rule`` (:func:`resample_pos_embed`)."""
        v = self.visual
        x = v.conv1(images.to(self.dtype))
        grid = (int(x.shape[-2]), int(x.shape[-1]))
        x = x.flatten(2).transpose(1, 2)
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed(grid, pos_rule).to(x.dtype)
        return v.ln_pre(x), grid

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
        parameter of the open_clip block (``"mlp.c_proj.weight"`` is the FFN output weight), used functionally
        through the module itself.

        The standard block is computed by the walk (``ln_1`` -> q/k/v -> ``scaled_dot_product_attention`` ->
        :meth:`out_proj` -> layer scale; ``ln_2`` -> MLP -> layer scale) rather than by calling the module: on a
        CPU ``nn.MultiheadAttention``'s inference fast path materialises the N x N attention map of every head,
        while ``scaled_dot_product_attention`` works in blocks. Attention options this walk does not reproduce
        (open_clip's scaled cosine attention, attention masks on the module) go through the module itself, for
        the unchanged block only.
        """
        blk = self.blocks[index]
        overrides = dict(overrides or {})
        out_weight = overrides.pop(CS_OVERRIDE, overrides.pop(_MODULE_CS_NAME, None))
        standard = attention is None and residual and ffn
        if standard and (overrides or not _manual_ok(blk)):
            if out_weight is not None:
                overrides[_MODULE_CS_NAME] = out_weight
            return self._module_block(blk, x, overrides)
        if overrides:
            raise ValueError(f"block {index}: only {CS_OVERRIDE!r} can be overridden in a changed block")
        cs = None if out_weight is None else {CS_OVERRIDE: out_weight}
        return super().block(index, x, attention, residual, ffn, cs)

    def _module_block(self, block: nn.Module, x: torch.Tensor, overrides: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if not self.batch_first:
            x = x.transpose(0, 1)
        out = torch.func.functional_call(block, dict(overrides), (x,)) if overrides else block(x)
        return out if self.batch_first else out.transpose(0, 1)

    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` for NLD tokens ``x`` (its input), each ``(B, heads, N, head_dim)``."""
        block = self.blocks[index]
        y = self.pre_norm(index, x)
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
        """Block ``index``'s attention output projection of ``(B, heads, N, head_dim)`` heads (or heads already
        merged to ``(B, N, heads*head_dim)``): per-head scale (``scale_heads``), merge, inner norm
        (``scale_attn_inner``), ``out_proj``. Every method's attention output goes through here."""
        attn = self.blocks[index].attn
        scale = getattr(attn, "head_scale", None)
        if heads_out.dim() == 3 and scale is not None:  # split the heads again to scale them
            b, n, c = heads_out.shape
            heads_out = heads_out.reshape(b, n, self.heads, c // self.heads).transpose(1, 2)
        if heads_out.dim() == 4:
            if scale is not None:
                heads_out = heads_out * scale
            b, h, n, d = heads_out.shape
            merged = heads_out.transpose(1, 2).reshape(b, n, h * d)
        else:
            merged = heads_out
        ln_inner = getattr(attn, "ln_inner", None)  # scale_attn_inner (custom Attention)
        if ln_inner is not None:
            merged = ln_inner(merged)
        return attn.out_proj(merged)

    def ffn(self, index: int, x: torch.Tensor, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``index``'s FFN branch with its layer scale: ``ls_2(mlp(ln_2(x)))``, optionally with the MLP's
        output weight replaced (Channel Suppression)."""
        blk = self.blocks[index]
        y = blk.ln_2(x)
        if out_weight is None:
            y = blk.mlp(y)
        else:
            for name, module in blk.mlp.named_children():
                y = F.linear(y, out_weight, module.bias) if name == "c_proj" else module(y)
        return blk.ls_2(y)

    def ffn_out_weight(self, index: int) -> torch.Tensor:
        return self.blocks[index].mlp.c_proj.weight

    def ffn_module(self, index: int) -> nn.Module:
        return self.blocks[index].mlp

    def pre_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[index].ln_1(x)

    def attn_residual(self, index: int, attn_out: torch.Tensor) -> torch.Tensor:
        """What the block adds to the residual stream from an attention output (layer scale, optional norm)."""
        block = self.blocks[index]
        ln_attn = getattr(block, "ln_attn", None)
        if ln_attn is not None:
            attn_out = ln_attn(attn_out)
        return block.ls_1(attn_out)

    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.visual.ln_post(tokens)

    def projection(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens @ self.visual.proj

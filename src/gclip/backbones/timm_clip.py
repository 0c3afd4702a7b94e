"""The :class:`~gclip.backbones.base.Backbone` of open_clip's ``TimmModel`` image towers: SigLIP 2
(``ViT-B-16-SigLIP2``: a timm ``VisionTransformer``), PE-Core (``PE-Core-B-16``, ``PE-Core-L-14-336``: a timm ``Eva``
with RoPE) and EVA-02-CLIP (``EVA02-B-16``: a timm ``Eva`` with RoPE, separate q/k/v and SwiGLU with a sub-norm).

open_clip's ``TimmModel.forward`` is ``head(trunk(x))``: the timm trunk's ``forward_features`` (blocks, final
``norm``), its ``forward_head`` (pool, ``fc_norm``, its own ``head``: PE-Core's and EVA-02's projection is this
``Linear``) and open_clip's ``head`` (empty for these three towers; a projection for others). The walk is the trunk's
(:class:`~gclip.backbones.timm_vit.TimmViT` or :class:`~gclip.backbones.timm_eva.TimmEva`); this module adds the
tower's output:

- the dense projection of patch tokens (:meth:`TimmClipViT.projection`). A tower that pools by token (EVA-02:
  ``global_pool="token"``, the CLS token) or by average projects each patch token as it projects the pooled one:
  ``fc_norm``, the trunk's ``head``, open_clip's ``head``. A tower that pools with a MAP attention-pool head
  (SigLIP 2, PE-Core: ``AttentionPoolLatent``, one latent query) reads each patch as TextRegion
  (avaxiao/TextRegion, ``siglip_value_with_sam2_attn``/``pe_value_with_sam2_attn``) reads a region: the pool's
  value projection (the value half of its ``kv``) and its output projection ``proj`` applied to the token, then
  ``fc_norm`` and the heads. TextRegion replaces the pool's keys by one constant key, so the latent query attends
  uniformly and a region's feature is the mean of ``proj(v)`` over its tokens; the pool's residual MLP
  (``x + mlp(norm(x))``) is not applied, there or here.
- the pooled embedding (:meth:`TimmClipViT.pooled`): the tower's own ``forward_head`` and open_clip's ``head`` on
  the last block's tokens, which is ``clip.encode_image``. On a tower without a CLS token (SigLIP 2) this is the
  documented substitute for the CLS token's projection: :meth:`~TimmClipViT.cls` refuses in one line and names it.

Position embeddings are resampled by the tower's own rule, timm's ``resample_abs_pos_embed`` (bicubic with
antialias, the ``"antialias"`` rule of :func:`~gclip.backbones.openclip.resample_pos_embed`), whatever rule a
method asks for (:attr:`TimmClipViT.tower_pos_rule`).

What each tower does with RoPE and the CLS token:

- SigLIP 2: no RoPE (absolute positions only), no CLS token (``prefix_tokens == 0``): ``cls()`` refuses,
  ``pooled()`` is the MAP head's embedding.
- PE-Core: RoPE on q and k of the patch tokens (not the CLS token) in every block, plus absolute positions; a CLS
  token that the MAP head attends to with the patches (its pooled embedding is not the CLS token's projection).
- EVA-02: RoPE on q and k of the patch tokens in every block, plus absolute positions; the CLS token is what the
  tower pools (``pooled()`` is the CLS token's projection).
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError, WeightsError
from .timm_eva import TimmEva, is_timm_eva
from .timm_vit import TimmViT, is_timm_vit

__all__ = ["TimmClipEva", "TimmClipViT", "is_timm_clip", "timm_clip_backbone"]


def is_timm_clip(visual: nn.Module) -> bool:
    """Whether ``visual`` is open_clip's ``TimmModel`` (open_clip is not imported for this)."""
    timm_model = sys.modules.get("open_clip.timm_model")
    return timm_model is not None and isinstance(visual, timm_model.TimmModel)


class _TimmClip:
    """What open_clip's ``TimmModel`` adds to its trunk's walk (see the module docstring); mixed into the trunk's
    adapter class."""

    tower_pos_rule: str | None = "antialias"
    """The position-embedding rule of every walk on this tower (timm's own); ``None``: the method's."""

    sigmoid_logits: tuple[float, float] | None = None
    """A sigmoid-loss tower's (SigLIP 2's) image-text logits, ``exp(logit_scale)`` and ``logit_bias`` of its CLIP
    model (``scale * cosine + bias``), set by :func:`~gclip.backbones.backbone_for` from the model; ``None``: not
    known (an adapter built from the tower alone) or a contrastive tower (no bias)."""

    trunk: nn.Module
    module: nn.Module
    has_cls: bool

    def _init_tower(self, visual: nn.Module, mean, std) -> tuple:
        trunk = visual.trunk
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            if getattr(pool, "pos_embed", None) is not None or not isinstance(pool.proj, nn.Linear):
                raise WeightsError(
                    "open_clip timm tower: its attention pool adds position embeddings or has no output projection: "
                    "no dense reading of it"
                )
        cfg = getattr(visual, "preprocess_cfg", None) or {}
        mean = mean if mean is not None else cfg.get("mean")
        std = std if std is not None else cfg.get("std")
        return trunk, mean, std

    @property
    def visual(self) -> nn.Module:
        """open_clip's ``TimmModel`` (``clip.visual``)."""
        return self.module

    @property
    def pools_with_attention(self) -> bool:
        """Whether the tower pools with a MAP attention-pool head (SigLIP 2, PE-Core)."""
        return getattr(self.trunk, "attn_pool", None) is not None

    def pos_embed(self, grid: tuple[int, int], rule: str = "sclip"):
        """The position embedding of a grid by the tower's rule (:attr:`tower_pos_rule`), whatever ``rule``."""
        return super().pos_embed(grid, self.tower_pos_rule or rule)  # type: ignore[misc]

    def embed(self, images: torch.Tensor, pos_rule: str = "sclip"):
        """:meth:`TimmViT.embed <gclip.backbones.timm_vit.TimmViT.embed>` of the whole patches of the images: pixels
        past the last whole patch are ignored, as open_clip's ViT ignores them (its stride-``patch`` convolution)."""
        p = self.patch_size  # type: ignore[attr-defined]
        h, w = images.shape[-2] // p * p, images.shape[-1] // p * p
        return super().embed(images[..., :h, :w], pos_rule)  # type: ignore[misc]

    def cls(self, tokens: torch.Tensor) -> torch.Tensor:
        if not self.has_cls:
            raise ConfigError(
                f"{type(self).__name__}: this tower has no CLS token (it pools with an attention head; "
                "Backbone.pooled gives its pooled embedding)"
            )
        return tokens[:, 0]

    def projection(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-normed ``(B, N, D)`` tokens -> ``(B, N, E)``: the MAP head's value and output projections (a
        tower pooling with attention), then ``fc_norm``, the trunk's ``head`` and open_clip's ``head``."""
        trunk = self.trunk
        pool = getattr(trunk, "attn_pool", None)
        if pool is not None:
            width = pool.proj.in_features
            bias = None if pool.kv.bias is None else pool.kv.bias[width:]
            tokens = pool.proj(F.linear(tokens, pool.kv.weight[width:], bias))
        return self.post_pool(tokens)

    def post_pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """What follows the trunk's pool: ``fc_norm``, the trunk's ``head`` and open_clip's ``head`` (PE-Core's
        projection is the trunk's ``head``)."""
        trunk = self.trunk
        return self.module.head(trunk.head(trunk.head_drop(trunk.fc_norm(tokens))))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's pooled embedding ``(B, E)`` from the last block's ``(B, P+N, D)`` tokens: the final norm, the
        trunk's ``forward_head`` (its pool: the MAP head or the CLS token, ``fc_norm``, ``head``) and open_clip's
        ``head``: ``clip.encode_image`` of the images the tokens were walked from."""
        return self.module.head(self.trunk.forward_head(self.final_norm(tokens)))  # type: ignore[attr-defined]


class TimmClipViT(_TimmClip, TimmViT):
    """open_clip ``TimmModel`` over a timm ``VisionTransformer`` (SigLIP 2): :class:`TimmViT`'s walk, the tower's
    output (module docstring).

    Args:
        visual: ``clip.visual``, open_clip's ``TimmModel`` (only read, never modified).
        mean, std: the normalisation of its inputs; by default ``visual.preprocess_cfg``'s (set by
            :func:`~gclip.backbones.models.load_model`), else the trunk's ``pretrained_cfg``'s.
    """

    def __init__(self, visual: nn.Module, mean=None, std=None) -> None:
        trunk, mean, std = self._init_tower(visual, mean, std)
        TimmViT.__init__(self, trunk, mean, std)
        self.module = visual


class TimmClipEva(_TimmClip, TimmEva):
    """open_clip ``TimmModel`` over a timm ``Eva`` (PE-Core, EVA-02): :class:`TimmEva`'s walk (RoPE on q and k),
    the tower's output (module docstring). Arguments as :class:`TimmClipViT`'s."""

    def __init__(self, visual: nn.Module, mean=None, std=None) -> None:
        trunk, mean, std = self._init_tower(visual, mean, std)
        TimmEva.__init__(self, trunk, mean, std)
        self.module = visual


def timm_clip_backbone(visual: nn.Module, mean=None, std=None) -> TimmViT:
    """The adapter of an open_clip ``TimmModel``: :class:`TimmClipViT` or :class:`TimmClipEva` by its trunk; a
    one-line :class:`~gclip.errors.WeightsError` for any other trunk (a ResNet, a ConvNeXt)."""
    trunk = getattr(visual, "trunk", None)
    if trunk is not None and is_timm_eva(trunk):
        return TimmClipEva(visual, mean, std)
    if trunk is not None and is_timm_vit(trunk):
        return TimmClipViT(visual, mean, std)
    raise WeightsError(
        f"open_clip timm tower {type(trunk).__name__}: no dense-walk adapter (timm VisionTransformer and Eva only)"
    )

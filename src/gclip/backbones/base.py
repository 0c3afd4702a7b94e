"""The backbone adapter: the one interface every method walks a vision transformer through.

A method never reads a tower's modules; it asks its :class:`Backbone` for the pieces of the dense walk:

- :meth:`Backbone.embed`: images -> tokens (the prefix tokens first: CLS and registers, then the patch grid);
- per block ``i``: :meth:`~Backbone.qkv` (with the tower's own position rotation applied to q and k, so that a
  method's own attention is positioned as the tower's), :meth:`~Backbone.out_proj`,
  :meth:`~Backbone.attn_residual`, :meth:`~Backbone.ffn`, and :meth:`~Backbone.block`, which composes them
  with any attention, with or without residual and FFN;
- :meth:`~Backbone.project`: patch tokens -> the image-text embedding space (final norm and projection);
  :meth:`~Backbone.pooled`: the last block's tokens -> the tower's own image embedding (``encode_image``).

Tokens are ``(B, P + N, D)``: ``P = prefix_tokens`` tokens (CLS and register tokens, ``P = 0`` for a tower
without them) followed by the ``N = gh * gw`` patches in row-major order. :meth:`~Backbone.patches` and
:meth:`~Backbone.cls` read them; a method that needs a CLS token on a tower without one gets a one-line
:class:`~gclip.errors.ConfigError` from :meth:`~Backbone.cls`.

open_clip's ``VisionTransformer`` is :class:`gclip.backbones.openclip.DenseViT`, open_clip's timm towers (SigLIP 2,
PE-Core, EVA-02) are :mod:`gclip.backbones.timm_clip`'s; :func:`backbone_for` picks the adapter of a tower.
"""

from __future__ import annotations

import abc
import hashlib
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import ConfigError

__all__ = ["Attention", "Backbone", "fingerprint"]

Attention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``(q, k, v) -> heads``: q/k/v ``(B, H, N, d)`` of a block -> ``(B, H, N, d)`` (or merged ``(B, N, H*d)``)."""


class Backbone(abc.ABC):
    """The dense walk through a vision transformer (see the module docstring).

    Attributes:
        module: the tower itself (only read, never modified).
        patch_size, width, depth, heads: its geometry.
        prefix_tokens: tokens before the patch grid (1 for a CLS token alone; CLS plus registers; 0 for none).
        has_cls: whether the first prefix token is a CLS token.
        mean, std: the normalisation of the images it is given (0..1 scale, RGB).
    """

    module: nn.Module
    patch_size: int
    width: int
    depth: int
    heads: int
    prefix_tokens: int = 1
    has_cls: bool = True
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    @property
    def native_grid(self) -> tuple[int, int]:
        """The patch grid the tower was trained at (its position embedding's)."""
        raise NotImplementedError

    # --- tokens -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def embed(self, images: torch.Tensor, pos_rule: str = "sclip") -> tuple[torch.Tensor, tuple[int, int]]:
        """Normalised ``(B, 3, H, W)`` images (H, W multiples of the patch) -> ``(B, P+N, D)`` tokens ready for
        block 0, and the ``(gh, gw)`` patch grid; ``pos_rule`` names how absolute position embeddings are
        resampled to the grid (:func:`gclip.backbones.openclip.resample_pos_embed`)."""

    def patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, P+N, ...)`` tokens -> the ``(B, N, ...)`` patch tokens."""
        return tokens[:, self.prefix_tokens :]

    def cls(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, P+N, D)`` tokens -> the ``(B, D)`` CLS token; a one-line error on a tower without one."""
        if not self.has_cls:
            raise ConfigError(f"{type(self).__name__}: this tower has no CLS token")
        return tokens[:, 0]

    # --- one block ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def qkv(self, index: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v of block ``index`` for its input tokens ``x``, each ``(B, heads, P+N, head_dim)``, q and k
        normalised and position-rotated as the block itself does it."""

    @abc.abstractmethod
    def out_proj(self, index: int, heads_out: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s attention output projection of ``(B, heads, N, head_dim)`` heads (or heads already
        merged to ``(B, N, heads*head_dim)``) -> ``(B, N, D)``."""

    @abc.abstractmethod
    def attn_residual(self, index: int, attn_out: torch.Tensor) -> torch.Tensor:
        """What block ``index`` adds to the residual stream from a projected attention output (layer scale,
        post-norm)."""

    @abc.abstractmethod
    def ffn(self, index: int, x: torch.Tensor, out_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``index``'s FFN branch on its input ``x`` (norm, MLP, layer scale), optionally with the MLP's
        output weight replaced (``out_weight``, shape of :meth:`ffn_out_weight`: Channel Suppression)."""

    @abc.abstractmethod
    def ffn_out_weight(self, index: int) -> torch.Tensor:
        """Block ``index``'s FFN output weight ``(width, hidden)`` (the rows are the residual channels)."""

    @abc.abstractmethod
    def ffn_module(self, index: int) -> nn.Module:
        """Block ``index``'s MLP module (for forward hooks that record its output)."""

    @abc.abstractmethod
    def pre_norm(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """Block ``index``'s attention input norm of ``x`` (what q/k/v are computed from)."""

    def block(
        self,
        index: int,
        x: torch.Tensor,
        attention: Attention | None = None,
        residual: bool = True,
        ffn: bool = True,
        overrides: Mapping[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Block ``index`` on tokens ``x``, optionally changed.

        Args:
            attention: ``(q, k, v) -> heads`` replacing the block's ``softmax(q kᵀ s) v`` (``None``: the block's).
            residual: add the attention output to ``x`` (with the block's layer scale); ``False`` returns the
                projected attention output alone (the ClearCLIP form), then the FFN on that if ``ffn``.
            ffn: run the FFN branch (added to its input).
            overrides: ``{"ffn_out_weight": tensor}`` replaces the FFN output weight (Channel Suppression); an
                adapter may accept more (see its own docs).
        """
        overrides = dict(overrides or {})
        out_weight = overrides.pop(FFN_OUT_WEIGHT, None)
        if overrides:
            raise ValueError(f"block {index}: only {FFN_OUT_WEIGHT!r} can be overridden here, got {sorted(overrides)}")
        q, k, v = self.qkv(index, x)
        heads = torch.nn.functional.scaled_dot_product_attention(q, k, v) if attention is None else attention(q, k, v)
        del q, k, v
        attn_out = self.out_proj(index, heads)
        del heads
        out = x + self.attn_residual(index, attn_out) if residual else attn_out
        if not ffn:
            return out
        return out + self.ffn(index, out, out_weight)

    def run_block(self, index: int, x: torch.Tensor, overrides: Mapping[str, torch.Tensor] | None = None):
        """The unchanged block ``index`` (with optional ``overrides``): :meth:`block` with its defaults."""
        return self.block(index, x, overrides=overrides)

    # --- output -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def final_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's final norm of ``(B, N, D)`` tokens (before the projection)."""

    @abc.abstractmethod
    def projection(self, tokens: torch.Tensor) -> torch.Tensor:
        """The projection of already :meth:`final_norm`-ed ``(B, N, D)`` tokens into the embedding space."""

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens ``(B, N, D)`` -> embedding space ``(B, N, E)``: :meth:`final_norm`, then :meth:`projection`."""
        return self.projection(self.final_norm(tokens))

    def pooled(self, tokens: torch.Tensor) -> torch.Tensor:
        """The tower's own image embedding ``(B, E)`` from the last block's ``(B, P+N, D)`` tokens (what its CLIP's
        ``encode_image`` gives): here the projection of the CLS token; a tower that pools otherwise (an
        attention-pool head) says so in its adapter. A one-line error where there is neither."""
        return self.project(self.cls(tokens)[:, None])[:, 0]

    def fingerprint(self) -> str:
        """A short hash of the tower's weights (:func:`fingerprint`)."""
        return fingerprint(self.module)


FFN_OUT_WEIGHT = "ffn_out_weight"
"""The override key of :meth:`Backbone.block` that replaces the FFN output weight (Channel Suppression)."""


def fingerprint(module: nn.Module) -> str:
    """A short hash of a module's weights: every tensor's name, shape and dtype, its sum (to 7 significant digits)
    and up to 4096 of its values at an even stride.

    One fingerprint for every kind of weights (CLIP towers, second models): it keys the disk caches
    (:mod:`gclip.cache`), so an in-place change of a tensor changes it.
    """
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        t = tensor.detach()
        digest.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        if t.numel() and t.is_floating_point():
            flat = t.flatten()
            digest.update(f"{float(flat.double().sum()):.7g}".encode())
            sample = flat[:: max(1, flat.numel() // 4096)].float().cpu().contiguous()
            digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]

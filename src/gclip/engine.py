"""Dense features and logits for a batch of crops: embed -> blocks 0..L-2 -> method's last block -> proj."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .backbone import DenseViT
from .methods import Method

__all__ = ["dense_features", "dense_logits"]


@torch.no_grad()
def dense_features(vit: DenseViT, method: Method, crops: torch.Tensor) -> torch.Tensor:
    """Projected patch features.

    Args:
        vit: the backbone view.
        method: the last-block variant.
        crops: ``(B, 3, H, W)`` normalised images; pixels past the last whole patch are ignored.

    Returns:
        ``(B, H // p, W // p, E)`` float32 features (not normalised).
    """
    x, grid = vit.embed(crops)
    x, kept = vit.walk(x, keep=method.keep_blocks(vit), overrides=method.overrides(vit))
    tokens = method.last_block(vit, x, kept, grid)
    feats = vit.project(tokens[:, 1:]).float()
    return feats.reshape(feats.shape[0], grid[0], grid[1], -1)


@torch.no_grad()
def dense_logits(vit: DenseViT, method: Method, crops: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every patch with every query embedding.

    Args:
        text: ``(Q, E)`` unit query embeddings.

    Returns:
        ``(B, Q, H // p, W // p)`` float32 logits (before any logit scale).
    """
    feats = F.normalize(dense_features(vit, method, crops), dim=-1)
    return torch.einsum("bhwe,qe->bqhw", feats, text.to(feats.device, torch.float32))

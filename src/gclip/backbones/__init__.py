"""Backbones: the adapter every method walks a tower through (:mod:`.base`), open_clip's ViT (:mod:`.openclip`),
timm's ViT (:mod:`.timm_vit`), loading CLIP models (:mod:`.models`), the second models some methods pair with CLIP
(:mod:`.second_models`), and the per-tag presets (:mod:`.presets`)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..errors import WeightsError
from .base import Backbone, fingerprint
from .openclip import DenseViT
from .presets import Preset, get_preset, list_presets
from .timm_clip import TimmClipEva, TimmClipViT, is_timm_clip, timm_clip_backbone
from .timm_eva import TimmEva, is_timm_eva
from .timm_vit import TimmViT, is_timm_vit

__all__ = [
    "Backbone",
    "DenseViT",
    "Preset",
    "TimmClipEva",
    "TimmClipViT",
    "TimmEva",
    "TimmViT",
    "backbone_for",
    "fingerprint",
    "get_preset",
    "list_presets",
    "weights_used",
]


def weights_used(model: Any, method_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The weights files behind a run, as gclip's JSON outputs record them: ``{"clip": {"path", "sha256"}}`` (``None``
    for random weights) and one entry per second model of ``method_options`` (``proxy``, ``sam``,
    ``mask_generator``: :func:`gclip.backbones.second_models.second_model_weights`). Each file is hashed once per
    process."""
    from .second_models import second_model_weights

    record = getattr(model, "weights_record", None)
    return {"clip": record() if record else None, **second_model_weights(method_options or {})}


def backbone_for(
    visual: nn.Module,
    mean: tuple[float, ...] | None = None,
    std: tuple[float, ...] | None = None,
    clip: nn.Module | None = None,
):
    """The :class:`Backbone` adapter of an image tower: open_clip's ``VisionTransformer`` (``clip.visual``) ->
    :class:`DenseViT`; open_clip's ``TimmModel`` (SigLIP 2, PE-Core, EVA-02) -> :class:`TimmClipViT` or
    :class:`TimmClipEva` by its trunk; timm's ``VisionTransformer`` -> :class:`TimmViT`, timm's ``Eva`` ->
    :class:`TimmEva`; with the normalisation of its inputs (by default OpenAI's for open_clip's ViT, the tower's
    ``preprocess_cfg``'s for a ``TimmModel``, the model's ``pretrained_cfg``'s or ImageNet's for timm). ``clip``: the
    CLIP model holding ``visual``; a ``TimmModel`` adapter reads a sigmoid-loss model's (SigLIP's) logit scale and
    bias from it (:attr:`TimmClipViT.sigmoid_logits`)."""
    norm = {k: tuple(v) for k, v in (("mean", mean), ("std", std)) if v is not None}
    if all(hasattr(visual, a) for a in ("conv1", "class_embedding", "positional_embedding", "transformer")):
        return DenseViT(visual, **norm)
    if is_timm_clip(visual):
        vit = timm_clip_backbone(visual, **norm)
        bias = getattr(clip, "logit_bias", None)
        if bias is not None:  # SigLIP: scale * cosine + bias
            vit.sigmoid_logits = (float(clip.logit_scale.detach().exp()), float(bias.detach()))
        return vit
    if is_timm_vit(visual):
        return TimmViT(visual, **norm)
    if is_timm_eva(visual):
        return TimmEva(visual, **norm)
    raise WeightsError(
        f"{type(visual).__name__}: no dense-walk adapter for this image tower (open_clip and timm ViTs only)"
    )

"""Backbone presets: the supported CLIP ViTs, their pretrained tags, and what each needs.

The list is data (``data/backbones.json``); QuickGELU and normalisation come from open_clip's pretrained
config of each tag, and the architecture (patch size, depth, width, native size) from its model config,
so they cannot drift from what :func:`gclip.load_model` actually builds.

>>> from gclip.backbones.presets import list_presets
>>> [p.name for p in list_presets()]  # doctest: +SKIP
['ViT-B/16', 'ViT-B/32', 'ViT-L/14', 'ViT-L/14-336', 'ViT-H/14']
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

from ..errors import ConfigError

__all__ = ["TagInfo", "Preset", "architecture", "list_presets", "get_preset", "preset_settings", "tag_family"]

_FAMILIES = (
    ("openai", "OpenAI"),
    ("laion", "LAION"),
    ("datacomp", "DataComp"),
    ("metaclip", "MetaCLIP"),
    ("dfn", "DFN"),
    ("webli", "WebLI"),
    ("meta", "Meta PE"),
    ("merged2b", "Merged-2B"),
)


def tag_family(tag: str) -> str:
    """``"openai"`` -> ``"OpenAI"``, ``"laion2b_s34b_b88k"`` -> ``"LAION"``, ``"webli"`` -> ``"WebLI"`` (SigLIP),
    ``"meta"`` -> ``"Meta PE"`` (PE-Core), ``"merged2b_*"`` -> ``"Merged-2B"`` (EVA02), ...; ``"other"`` otherwise."""
    for prefix, family in _FAMILIES:
        if tag.startswith(prefix):
            return family
    return "other"


@dataclass
class TagInfo:
    """One pretrained tag of a preset, as open_clip describes it.

    Attributes:
        tag: the open_clip tag (``--pretrained``).
        family: OpenAI, LAION, DataComp, MetaCLIP, DFN, WebLI, Meta PE or Merged-2B (:func:`tag_family`).
        quick_gelu: the weights were trained with QuickGELU (``load_model`` switches it on by itself; the
            ``<model>-quickgelu`` name is the same architecture).
        mean, std: image normalisation in 0..1 units.
        resize_mode: open_clip's resize mode of the tag (``shortest`` or ``squash``).
    """

    tag: str
    family: str
    quick_gelu: bool
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize_mode: str


@dataclass
class Preset:
    """A supported backbone.

    Attributes:
        name: display name, e.g. ``"ViT-L/14-336"``.
        model: open_clip model name, e.g. ``"ViT-L-14-336"``.
        patch_size, depth, width, image_size: the image tower (``image_size``: the native resolution).
        tags: the supported pretrained tags.
        settings: :class:`gclip.Settings` overrides this backbone needs (crop and stride multiples of the patch).
        notes: what differs from ViT-B/16.
        tower: ``"open_clip"`` (open_clip's ``VisionTransformer``) or the timm class of a ``TimmModel`` tower
            (``"VisionTransformer"``, ``"Eva"``).
        tokenizer: the Hugging Face repository of its tokenizer (``--tokenizer DIR`` offline), ``""`` for
            open_clip's built-in one.
    """

    name: str
    model: str
    patch_size: int
    depth: int
    width: int
    image_size: int
    tags: list[TagInfo] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    notes: str = ""
    tower: str = "open_clip"
    tokenizer: str = ""

    @property
    def quickgelu_model(self) -> str:
        """The open_clip name with QuickGELU built in."""
        return f"{self.model}-quickgelu"


def _tag_info(model: str, tag: str) -> TagInfo:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model, tag)
    if not cfg:
        raise ConfigError(f"preset tag {model}/{tag} is not listed by this open_clip version")
    return TagInfo(
        tag=tag,
        family=tag_family(tag),
        quick_gelu=bool(cfg.get("quick_gelu", False)),
        mean=tuple(float(v) for v in cfg.get("mean", open_clip.OPENAI_DATASET_MEAN)),
        std=tuple(float(v) for v in cfg.get("std", open_clip.OPENAI_DATASET_STD)),
        resize_mode=str(cfg.get("resize_mode", "shortest")),
    )


def architecture(model: str) -> dict[str, Any]:
    """``{patch_size, depth, width, image_size, tower}`` of open_clip model ``model``'s image tower: from its model
    config, or for a timm tower (SigLIP 2, PE-Core, EVA02) from the timm model built on the meta device (no memory,
    no weights)."""
    import open_clip

    vision = open_clip.get_model_config(model)["vision_cfg"]
    if not vision.get("timm_model_name"):
        return {
            "patch_size": int(vision["patch_size"]),
            "depth": int(vision["layers"]),
            "width": int(vision["width"]),
            "image_size": int(vision["image_size"]),
            "tower": "open_clip",
        }
    import timm
    import torch

    with torch.device("meta"):
        trunk = timm.create_model(vision["timm_model_name"], pretrained=False, img_size=vision["image_size"])
    return {
        "patch_size": int(trunk.patch_embed.patch_size[0]),
        "depth": len(trunk.blocks),
        "width": int(trunk.embed_dim),
        "image_size": int(vision["image_size"]),
        "tower": type(trunk).__name__,
    }


@lru_cache(maxsize=1)
def list_presets() -> list[Preset]:
    """The supported backbones, in the order of ``data/backbones.json``."""
    from .tokenizer import hub_tokenizer_name

    text = (resources.files("gclip") / "data" / "backbones.json").read_text()
    presets = []
    for entry in json.loads(text)["presets"]:
        arch = architecture(entry["model"])
        patch = arch["patch_size"]
        settings = dict(entry.get("settings", {}))
        for key in ("crop", "stride"):
            if settings.get(key, 0) % patch:
                raise ConfigError(f"preset {entry['name']}: {key} {settings[key]} is not a multiple of patch {patch}")
        presets.append(
            Preset(
                name=entry["name"],
                model=entry["model"],
                **arch,
                tags=[_tag_info(entry["model"], t) for t in entry["tags"]],
                settings=settings,
                notes=entry.get("notes", ""),
                tokenizer=hub_tokenizer_name(entry["model"]) or "",
            )
        )
    return presets


def get_preset(name: str) -> Preset:
    """A preset by display name (``"ViT-B/16"``) or open_clip name (``"ViT-B-16"``, ``"ViT-B-16-quickgelu"``)."""
    base = name.removesuffix("-quickgelu")
    for preset in list_presets():
        if base in (preset.name, preset.model):
            return preset
    names = ", ".join(p.name for p in list_presets())
    raise ConfigError(f"no backbone preset {name!r}: the presets are {names} (any other open_clip ViT still loads)")


def preset_settings(model: str) -> dict[str, Any]:
    """The settings the preset of an open_clip model name gives (``{}`` for a model without a preset)."""
    base = model.removesuffix("-quickgelu")
    for preset in list_presets():
        if base in (preset.name, preset.model):
            return dict(preset.settings)
    return {}

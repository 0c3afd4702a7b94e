"""A picklable recipe for a Segmenter, so each worker process or Ray actor can build its own."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones.models import LoadedModel, load_model
from ..inference.segmenter import Segmenter
from ..methods import Method
from ..text import ClassList, ClassSpec

__all__ = ["SegmenterSpec"]


@dataclass
class SegmenterSpec:
    """Everything needed to build a :class:`~gclip.Segmenter` elsewhere (one model load per process).

    Attributes:
        model: an open_clip model name (loaded by each process) or a :class:`~gclip.LoadedModel` (shipped
            whole, e.g. a model whose config was registered only in this process).
        pretrained, precision, quick_gelu: as for :func:`gclip.load_model`.
        device: ``None`` picks CUDA where the process has a GPU.
        method, method_options, templates, classes: as for :class:`~gclip.Segmenter`.
        settings: fields of :class:`~gclip.Settings`.

    >>> spec = SegmenterSpec("ViT-B-16", "/ckpt/ViT-B-16.pt", classes=["cat", "dog"], settings={"batch_size": 32})
    >>> seg = spec.build()  # doctest: +SKIP
    """

    model: str | LoadedModel = "ViT-B-16"
    pretrained: str | None = "openai"
    method: str | Method = "gclip"
    method_options: dict[str, Any] | None = None
    precision: str = "fp32"
    device: str | None = None
    quick_gelu: bool | None = None
    templates: str | list[str] = "openai_imagenet_80"
    classes: ClassSpec | ClassList | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_segmenter(cls, segmenter: Segmenter) -> SegmenterSpec:
        """A spec that rebuilds ``segmenter`` (its loaded model, method object, templates, classes, settings)."""
        return cls(
            model=segmenter.model,
            method=segmenter.method,
            templates=list(segmenter.text.templates),
            classes=segmenter.classes,
            settings=dataclasses.asdict(segmenter.settings),
        )

    def build(self) -> Segmenter:
        """Load the model (unless it is already loaded) and return a Segmenter with the classes set."""
        model = self.model
        if not isinstance(model, LoadedModel):
            pretrained = str(self.pretrained) if isinstance(self.pretrained, Path) else self.pretrained
            model = load_model(model, pretrained, self.precision, self.device, quick_gelu=self.quick_gelu)
        return Segmenter(
            model,
            method=self.method,
            method_options=self.method_options,
            templates=self.templates,
            classes=self.classes,
            **self.settings,
        )

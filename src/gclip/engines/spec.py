"""The one recipe that builds a Segmenter from settings: :class:`SegmenterSpec`.

Every place that makes a Segmenter from settings goes through it: ``gclip segment`` and
:func:`gclip.segment_folder` (a spec is picklable, so each worker process or Ray actor builds its own),
``gclip bench`` (:func:`gclip.diagnostics.bench.build_segmenter`), the demo (one Segmenter per method over
one shared model) and :func:`gclip.evaluate` (one per method and dataset, each under its protocol preset).
So the model is loaded, the method made, the backbone preset applied (by the Segmenter, when no resize or
window setting is given), the settings checked, the classes set, the forward compiled and the second models
checked (:meth:`SegmenterSpec.check_resources`, where a caller checks them before any image) the same way for
all of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..backbones.models import LoadedModel, any_tag_quick_gelu, load_model
from ..inference.segmenter import Segmenter
from ..methods import Method, get_method
from ..text import ClassList, ClassSpec, TextEncoder

__all__ = ["SegmenterSpec"]


@dataclass
class SegmenterSpec:
    """Everything needed to build a :class:`~gclip.Segmenter`, here or elsewhere (one model load per process).

    Attributes:
        model: an open_clip model name (loaded by :meth:`build`) or a :class:`~gclip.LoadedModel` (used as it
            is; shipped whole to other processes, e.g. a model whose config was registered only in this one).
        pretrained, precision, quick_gelu, tokenizer: as for :func:`gclip.load_model`.
        device: ``None`` picks CUDA where the process has a GPU.
        method, method_options, templates, classes, text_embeddings: as for :class:`~gclip.Segmenter`.
        settings: fields of :class:`~gclip.Settings`; none of ``short_side``, ``crop``, ``stride``: the
            backbone's preset (with a :class:`~gclip.inference.segmenter.PresetNotice`).
        random_seed: instead of ``pretrained``, the deterministic random weights of this seed
            (:func:`gclip.testing.random_model`: tests and benchmarks without a checkpoint).
        model_configs: folders of open_clip model configs registered before the model loads.
        compile: run the per-window forward through ``torch.compile`` (:meth:`~gclip.Segmenter.compile`).

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
    tokenizer: str | None = None
    text_embeddings: str | None = None
    templates: str | Sequence[str] = "openai_imagenet_80"
    classes: ClassSpec | ClassList | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    random_seed: int | None = None
    model_configs: list[str] = field(default_factory=list)
    compile: bool = False

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

    def load(self) -> LoadedModel:
        """The model: :attr:`model` itself when it is loaded, else loaded from the checkpoint (or random)."""
        if isinstance(self.model, LoadedModel):
            return self.model
        if self.model_configs:
            import open_clip

            for folder in self.model_configs:
                open_clip.add_model_config(folder)
        if self.random_seed is not None:
            from ..testing import random_model

            quick_gelu = self.quick_gelu
            if quick_gelu is None:  # as the model's own weights: QuickGELU where one of its tags uses it (OpenAI's)
                quick_gelu = any_tag_quick_gelu(self.model)
            return random_model(
                self.model, self.precision, self.device, self.random_seed, quick_gelu, tokenizer=self.tokenizer
            )
        pretrained = str(self.pretrained) if isinstance(self.pretrained, Path) else self.pretrained
        return load_model(
            self.model, pretrained, self.precision, self.device, quick_gelu=self.quick_gelu, tokenizer=self.tokenizer
        )

    def check_resources(self) -> None:
        """Load (into the per-process cache) or check what the method needs besides CLIP, its second models,
        before any image (:meth:`gclip.methods.Method.check_resources`: a one-line
        :class:`~gclip.errors.WeightsError` or :class:`~gclip.errors.ConfigError`)."""
        model = self.load()
        get_method(self.method, **(self.method_options or {})).check_resources(model.device, model.dtype)

    def build(self, text: TextEncoder | None = None) -> Segmenter:
        """Load the model (unless it is already loaded) and return the Segmenter, its classes set when given.

        Args:
            text: a text encoder to share (its embedding cache) with other Segmenters of the same model and
                templates, e.g. one per dataset in an evaluation.
        """
        seg = Segmenter(
            self.load(),
            method=self.method,
            method_options=self.method_options,
            templates=self.templates,
            text_embeddings=self.text_embeddings,
            **self.settings,
        )
        if text is not None:
            seg.text = text
        if self.classes is not None:
            seg.set_classes(self.classes)
        if self.compile:
            seg.compile()
        return seg

"""Methods x datasets under their protocols: the library call behind ``gclip eval``.

>>> import gclip
>>> results = gclip.evaluate(["clearclip", "sclip"], "voc20", "data", pretrained="/ckpt/ViT-B-16.pt")  # doctest: +SKIP
>>> print(results[0].summary["mIoU"])  # doctest: +SKIP
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..backbones.models import LoadedModel
from ..engines.spec import SegmenterSpec
from ..errors import ConfigError, WeightsError
from ..methods import get_method, list_methods
from ..text import TextEncoder, read_class_file
from .check import EXPECTED_IMAGES, check_samples
from .distributed import DistContext
from .layouts import FAMILIES, PAPER_ORDER, DatasetError, DatasetMissing, DatasetSpec, get_dataset, list_samples
from .protocols import resolve_preset
from .scoring import EvalResult, score

__all__ = ["evaluate", "expand_datasets", "expand_methods", "for_dataset", "runnable_methods"]

Say = Callable[..., None]


def expand_methods(methods: str | Sequence[str]) -> list[str]:
    """Comma-separated names (or a list), or ``"all"``: every registered method."""
    if isinstance(methods, str):
        if methods.strip().lower() == "all":
            return list_methods()
        methods = methods.split(",")
    return [m.strip() for m in methods if m.strip()]


def expand_datasets(datasets: str | Sequence[str]) -> list[DatasetSpec]:
    """Comma-separated names (or a list); ``"all"``: the eight benchmarks in the papers' order; a family's name
    (``large``, ``remote``: :data:`~gclip.evaluation.layouts.FAMILIES`): its sets. Each set once."""
    if isinstance(datasets, str):
        datasets = datasets.split(",")
    names: list[str] = []
    for d in (d.strip().lower() for d in datasets if d.strip()):
        names += PAPER_ORDER if d == "all" else FAMILIES[d] if d in FAMILIES and d != "classic" else [d]
    return list({spec.name: spec for spec in map(get_dataset, names)}.values())


def _is_family(datasets: str | Sequence[str]) -> bool:
    """Whether ``datasets`` names ``all`` or a family (then a set missing under the data root is skipped)."""
    parts = datasets.split(",") if isinstance(datasets, str) else list(datasets)
    return any(p.strip().lower() == "all" or p.strip().lower() in FAMILIES for p in parts)


def for_dataset(options: Mapping[str, Any], dataset: str) -> dict[str, Any]:
    """Method options with ``{dataset}`` in each text value replaced by the set's name (e.g. ITACLIP's per-set
    description files: ``"defs/{dataset}_definitions.txt"``)."""
    return {k: v.replace("{dataset}", dataset) if isinstance(v, str) else v for k, v in options.items()}


def _quiet(*args: Any, **kwargs: Any) -> None:
    pass


def evaluate(
    methods: str | Sequence[str] = "gclip",
    datasets: str | Sequence[str] = "all",
    data_root: str | Path = "data",
    model: str | LoadedModel = "ViT-B-16",
    pretrained: str | None = "openai",
    *,
    precision: str = "fp32",
    device: str | None = None,
    quick_gelu: bool | None = None,
    tokenizer: str | None = None,
    text_embeddings: str | Path | None = None,
    method_options: Mapping[str, Mapping[str, Any]] | None = None,
    settings: Mapping[str, Any] | None = None,
    protocol: str | None = None,
    classes_dir: str | Path | None = None,
    templates: str | Sequence[str] = "openai_imagenet_80",
    limit: int | None = None,
    images_per_step: int = 1,
    workers: int = 0,
    skip_bad: bool = False,
    save_predictions: str | Path | None = None,
    ctx: DistContext | None = None,
    progress: bool = False,
    say: Say = _quiet,
    on_result: Callable[[EvalResult], None] | None = None,
) -> list[EvalResult]:
    """Score methods on benchmark datasets, each method under its protocol preset (mmseg's mIoU).

    Args:
        methods: names, comma-separated names, or ``"all"`` (a method that cannot run here, e.g. without its
            second model's weights, is then skipped with a notice; named, it is an error).
        datasets: names, comma-separated names, ``"all"`` (the eight classic sets) or a family (``large``,
            ``remote``); the sets of ``all`` or a family are those found under ``data_root`` (a missing one
            is skipped with a notice; named alone, it is an error).
        data_root: the folder holding ``VOCdevkit/``, ``ade/``, ...
        model, pretrained, precision, device, quick_gelu, tokenizer: the CLIP model (:func:`gclip.load_model`), or a
            loaded one.
        text_embeddings: class embeddings made beforehand (``gclip embed-text``; :class:`gclip.text.TextEncoder`).
        method_options: per method name, its options (``{dataset}`` in a text value becomes each set's name).
        settings: settings that win over every preset (fields of :class:`gclip.Settings` and ``centre_crop``).
        protocol: force one protocol file for every method (default: each method's own).
        classes_dir: class-name files from this folder instead of the protocol's.
        templates: prompt templates.
        limit: score only the first ``limit`` images of each set.
        images_per_step, workers, skip_bad, ctx, progress: see :func:`gclip.evaluation.score`.
        save_predictions: write ``<save_predictions>/<method>/<dataset>/<image>.png`` label maps.
        say: where notices go (``print``-like; default: nowhere).
        on_result: called with each result as soon as it is scored.

    Returns:
        One :class:`~gclip.evaluation.EvalResult` per (method, dataset), methods outer.
    """
    if limit is not None and limit < 1:
        raise ConfigError("limit must be >= 1")
    names, specs = expand_methods(methods), expand_datasets(datasets)
    every_method = isinstance(methods, str) and methods.strip().lower() == "all"
    every_set = _is_family(datasets)
    if not names or not specs:
        raise ConfigError("give at least one method and one dataset")
    options = {m: dict((method_options or {}).get(m, {})) for m in names}
    for m in names:
        get_method(m, **options[m])
    plans = []
    for spec in specs:
        try:
            samples = list_samples(spec, data_root)
        except DatasetMissing as e:
            if not every_set:
                raise
            say(f"gclip: {spec.name} skipped: {e}", file=sys.stderr)
            continue
        samples = samples[:limit] if limit else samples
        full = EXPECTED_IMAGES.get(spec.name)
        checked = check_samples(spec, samples, expected=None if full is None else min(limit or full, full))
        if checked.broken and not skip_bad:
            raise DatasetError(f"{checked.verdict()} (see `gclip data check`; --skip-bad scores the rest)")
        if checked.broken or checked.modes:  # the count is in each run's header line
            say(f"gclip: {checked.verdict()}", file=sys.stderr)
        plans.append((spec, samples))
    if not plans:
        raise ConfigError(f"no benchmark dataset found under {data_root}")

    if not isinstance(model, LoadedModel):
        model = SegmenterSpec(
            model, pretrained, precision=precision, device=device, quick_gelu=quick_gelu, tokenizer=tokenizer
        ).load()
    names = runnable_methods(names, options, [spec.name for spec, _ in plans], model, every_method, say)
    text = TextEncoder(model, templates, text_embeddings)  # one text-embedding cache for every method
    results = []
    for method in names:
        for spec, samples in plans:
            preset = resolve_preset(method, spec, dict(settings or {}), protocol, classes_dir)
            recipe = SegmenterSpec(
                model,
                method=method,
                method_options={**preset.method_options, **for_dataset(options[method], spec.name)},
                templates=templates,
                classes=read_class_file(preset.classes_file, allow_duplicates=True, key=preset.classes_key),
                settings=preset.settings,
            )
            seg = recipe.build(text)
            described = {**preset.describe(), **seg.describe(), "dataset": spec.name, "data_root": str(data_root)}
            world = ctx.world_size if ctx is not None else 1
            described.update(limit=limit, images_per_step=images_per_step, world_size=world)
            shown = " ".join(f"{k}={v}" for k, v in preset.describe().items() if k != "method_options")
            say(f"== {method} on {spec.name} ({len(samples)} images): {shown}")
            save = Path(save_predictions) / method / spec.name if save_predictions else None
            result = score(
                seg,
                spec,
                samples,
                images_per_step=images_per_step,
                workers=workers,
                skip_bad=skip_bad,
                save_dir=save,
                ctx=ctx,
                progress=progress,
                **preset.scoring,
            )
            result.settings = described
            if on_result is not None:
                on_result(result)
            results.append(result)
    return results


def runnable_methods(
    methods: list[str], options: dict, datasets: list[str], model: LoadedModel, every: bool, say: Say
) -> list[str]:
    """Load the second models (and check the mask sources) of each method that has them, before any image is
    scored (:meth:`~gclip.methods.Method.check_resources`); with ``every`` a method that cannot run here is
    skipped with a one-line notice (named: an error)."""
    kept = []
    for m in methods:
        try:
            for name in datasets:
                SegmenterSpec(model, method=m, method_options=for_dataset(options[m], name)).check_resources()
        except (WeightsError, ConfigError) as e:
            message = f"{m}: {e}"
            if not every:
                raise type(e)(message) from e
            say(f"gclip: skipped {message}", file=sys.stderr)
            continue
        kept.append(m)
    return kept

"""One recipe builds every Segmenter made from settings (:class:`gclip.engines.SegmenterSpec`): ``gclip segment``,
``gclip bench``, the demo and ``gclip eval`` all go through it, and the settings and method options each is given
reach the Segmenter the same way."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image

from conftest import TINY, tiny_second_models
from gclip.cli import main
from gclip.demo import DemoService, Limits
from gclip.demo.service import DemoSettings
from gclip.diagnostics.bench import BenchConfig, run_bench
from gclip.engines import SegmenterSpec
from gclip.errors import WeightsError
from gclip.evaluation import evaluate
from gclip.inference.segmenter import Segmenter, Settings
from test_datasets import write_layout

SETTINGS = {"short_side": 32, "crop": 32, "stride": 16, "logit_scale": 42.0, "prob_thd": 0.125}
OPTIONS = {"fusion": "per_head", "channel_suppression": False}
FLAGS = ["--short-side", "32", "--crop", "32", "--stride", "16", "--logit-scale", "42", "--prob-thd", "0.125"]


@pytest.fixture
def built(monkeypatch):
    """Every (spec, Segmenter) the recipe builds during the test."""
    seen: list[tuple[SegmenterSpec, Segmenter]] = []
    build = SegmenterSpec.build

    def spy(self, *args, **kwargs):
        seg = build(self, *args, **kwargs)
        seen.append((self, seg))
        return seg

    monkeypatch.setattr(SegmenterSpec, "build", spy)
    return seen


@pytest.fixture(scope="module")
def one_template(tmp_path_factory):
    path = tmp_path_factory.mktemp("templates") / "one.txt"
    path.write_text("a photo of a {c}.\n")
    return str(path)


def given(seg: Segmenter) -> None:
    """SETTINGS and OPTIONS reached ``seg``; every other setting is the default."""
    assert dataclasses.asdict(seg.settings) == dataclasses.asdict(Settings(**SETTINGS))
    assert {k: seg.method.options()[k] for k in OPTIONS} == OPTIONS
    assert seg.model.name == TINY and seg.method.name == "gclip"


def test_segment_builds_through_the_recipe(built, tiny_checkpoint, one_template, tmp_path):
    image = tmp_path / "in" / "a.png"
    image.parent.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(image)
    argv = ["segment", str(image.parent), "--out", str(tmp_path / "out"), "--model", TINY, "--device", "cpu"]
    argv += ["--pretrained", str(tiny_checkpoint), "--classes", "cat,dog", "--templates", one_template]
    argv += ["--workers", "0"]
    argv += ["--method-options", '{"fusion": "per_head", "channel_suppression": false}', "--no-progress", *FLAGS]
    assert main(argv) == 0
    ((spec, seg),) = built
    assert spec.settings == SETTINGS and spec.method_options == OPTIONS
    given(seg)
    assert seg.classes.names == ["cat", "dog"]  # type: ignore[union-attr]


def test_bench_builds_through_the_recipe(built, one_template):
    config = BenchConfig(model=TINY, method_options=OPTIONS, settings=SETTINGS, templates=one_template, count=1)
    config = dataclasses.replace(config, synthetic=(40, 48), warmup=0, reference=False, workers=0, device="cpu")
    record = run_bench(config)
    ((spec, seg),) = built
    assert spec.random_seed == config.seed and spec.model == TINY and spec.classes is None  # bench times the text
    given(seg)
    assert seg.model.pretrained == "random:0" and record["settings"]["logit_scale"] == 42.0


def test_the_demo_builds_through_the_recipe(built, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    service = DemoService(tiny_model, Limits(work_side=64), workdir=tmp_path / "w", method_options={"gclip": OPTIONS})
    image = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    service.segment(image, "cat, dog", "gclip", DemoSettings(short_side=32, crop=32, prob_thd=0.125))
    ((spec, seg),) = built
    assert spec.model is tiny_model and spec.settings == {"max_pixels": service.limits.max_pixels}
    assert {k: seg.method.options()[k] for k in OPTIONS} == OPTIONS
    s = seg.settings  # the request's settings
    assert (s.short_side, s.crop, s.stride, s.prob_thd) == (32, 32, 16, 0.125)


def test_eval_builds_through_the_recipe(built, tiny_checkpoint, one_template, tmp_path, monkeypatch):
    write_layout(tmp_path, "voc", n=2, size=(30, 40), seed=3)
    checked: list[SegmenterSpec] = []
    monkeypatch.setattr(SegmenterSpec, "check_resources", lambda self: checked.append(self))
    settings = {**SETTINGS, "area_thd": None}  # the protocol's area_thd otherwise
    results = evaluate(
        "gclip", "voc20", tmp_path, TINY, str(tiny_checkpoint), device="cpu", templates=one_template,
        method_options={"gclip": OPTIONS}, settings=settings,
    )  # fmt: skip
    ((spec, seg),) = built
    assert spec.settings.items() >= settings.items()  # over the protocol's (the ClearCLIP defaults here)
    assert spec.method_options == OPTIONS and spec.model is seg.model
    assert [(c.method, c.method_options, c.model) for c in checked] == [("gclip", OPTIONS, seg.model)]
    given(seg)
    assert len(seg.classes) == 20 and results[0].settings["logit_scale"] == 42.0  # type: ignore[arg-type]


def test_the_recipe_gives_what_the_segmenter_gives(tiny_model, one_template):
    """The recipe is the Segmenter's constructor plus the model load, the classes and compile."""
    spec = SegmenterSpec(tiny_model, method_options=OPTIONS, templates=one_template, classes=["cat"], settings=SETTINGS)
    seg, plain = spec.build(), Segmenter(tiny_model, method_options=OPTIONS, templates=one_template, **SETTINGS)
    assert seg.describe() == plain.describe() and seg.classes.names == ["cat"]  # type: ignore[union-attr]
    assert seg._compiled is None and dataclasses.replace(spec, compile=True).build()._compiled is not None
    shared = seg.text
    assert dataclasses.replace(spec, classes=["dog"]).build(shared).text is shared


def test_the_recipe_checks_the_second_models(tiny_model):
    proxy = dict(tiny_second_models("proxyclip"))
    SegmenterSpec(tiny_model, method="proxyclip", method_options=proxy).check_resources()
    missing = {**proxy, "proxy_checkpoint": "/nonexistent/dino.pth"}
    with pytest.raises(WeightsError, match="dino.pth"):
        SegmenterSpec(tiny_model, method="proxyclip", method_options=missing).check_resources()

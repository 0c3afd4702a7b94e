"""Engine v2 pieces: presets with method options, backbone presets applied, the one preprocessor, description files."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.evaluation import resolve_preset
from gclip.inference.preprocess import Preprocessor, normalise, pixel_constants
from gclip.inference.segmenter import PresetNotice
from gclip.methods import get_method
from gclip.methods.itaclip import read_definitions
from gclip.text import parse_classes


def test_presets_carry_per_dataset_method_options():
    voc = resolve_preset("resclip", "voc21")
    assert voc.method_options == {"temp_thd": 0.5, "rcs_weights": [2.0, 0.3], "sfr_weights": [2.2, 0.7]}
    assert (voc.settings["crop"], voc.settings["prob_thd"]) == (2048, 0.1)
    assert resolve_preset("resclip", "ade20k").method_options["temp_thd"] == 0.25
    assert resolve_preset("itaclip", "cityscapes").method_options["img_eng_coefficient"] == 0.7
    assert resolve_preset("scclip", "coco_object").settings["logit_scale"] == 55.0
    assert resolve_preset("sfp", "ade20k").settings["short_side"] == 384
    get_method("resclip", **voc.method_options)  # the preset's options are the method's


def test_openai_constants_are_the_peers_three_decimals():
    mean, std = pixel_constants((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert mean == (122.771, 116.746, 104.094) and std == (68.501, 66.632, 70.323)
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    out = normalise(image, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert torch.allclose(
        out[:, 0, 0],
        torch.tensor([(200 - 122.771) / 68.501, (200 - 116.746) / 66.632, (200 - 104.094) / 70.323]),
        rtol=0,
        atol=1e-6,
    )
    assert pixel_constants((0.5,) * 3, (0.5,) * 3) == ((127.5,) * 3, (127.5,) * 3)


def test_the_segmenter_owns_a_picklable_preprocessor(tiny_model, rgb_image):
    import pickle

    seg = Segmenter(tiny_model, method="clip", short_side=40)
    pre = pickle.loads(pickle.dumps(seg.preprocessor))
    assert isinstance(pre, Preprocessor) and pre.short_side == 40
    a, b = seg.prepare(rgb_image), pre(rgb_image)
    assert torch.equal(a.image, b.image) and a.size == b.size


def test_backbone_preset_is_applied_when_no_geometry_is_given(tiny_model, monkeypatch):
    import gclip.inference.segmenter as segmenter

    monkeypatch.setattr(segmenter, "preset_settings", lambda name: {"short_side": 336, "crop": 336, "stride": 168})
    with pytest.warns(PresetNotice, match="short_side=336, crop=336, stride=168"):
        seg = Segmenter(tiny_model, method="clip")
    assert (seg.settings.short_side, seg.settings.crop, seg.settings.stride) == (336, 336, 168)
    chosen = Segmenter(tiny_model, method="clip", crop=224)  # any geometry given: the preset stays out
    assert (chosen.settings.short_side, chosen.settings.crop) == (448, 224)


def test_itaclip_description_files(tiny_model, tmp_path):
    good = tmp_path / "defs.txt"
    good.write_text("cat >=a small furry animal\ndog >=a loyal animal\n", encoding="utf-8")
    assert read_definitions(good) == ["a small furry animal", "a loyal animal"]
    seg = Segmenter(tiny_model, method="itaclip", method_options={"definitions": str(good)}, templates=["{c}"])
    seg.set_classes(["cat", "dog"])
    names = seg.text.embed(["cat", "dog"])
    descs = seg.text.embed(["a small furry animal", "a loyal animal"])
    torch.testing.assert_close(seg._queries.cpu(), 0.8 * names + 0.2 * descs)
    with_bg = Segmenter(tiny_model, method="itaclip", method_options={"definitions": str(good)}, templates=["{c}"])
    with_bg.set_classes(["background", "cat", "dog"])  # one line fewer than classes: class 0 keeps its name
    torch.testing.assert_close(with_bg._queries[0].cpu(), seg.text.embed(["background"])[0])
    bad = tmp_path / "bad.txt"
    bad.write_text("cat: an animal\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line 1"):
        read_definitions(bad)
    with pytest.raises(ConfigError, match="3 descriptions for 1 classes"):
        good.write_text("a >=x\nb >=y\nc >=z\n", encoding="utf-8")
        seg.set_classes(parse_classes(["cat"]))
    with pytest.raises(ConfigError, match="cannot read"):
        read_definitions(tmp_path / "missing.txt")


def test_itaclip_closing_fills_one_pixel_holes():
    method = get_method("itaclip")
    labels = torch.full((7, 7), 3, dtype=torch.int64)
    labels[3, 3] = 1
    assert (method.refine_labels(labels) == 3).all()
    assert torch.equal(get_method("itaclip", closing=False).refine_labels(labels), labels)


@pytest.mark.parametrize("compiled", [False, True])
def test_label_contexts_reach_the_label_step_as_in_the_reference_loop(tiny_model, compiled):
    """A method's per-window context (CLIPtrase's affinity) crosses the batched, optionally compiled, engine to
    its label step: the engine's labels equal the plain loop's, and the refinement changed them."""
    from gclip.inference.reference import reference_labels

    rng = np.random.default_rng(5)
    images = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(3)]
    settings = dict(short_side=48, crop=0, logit_scale=100.0)
    options = {"dbscan_eps": 1.2, "dbscan_min_samples": 3}
    seg = Segmenter(tiny_model, method="cliptrase", method_options=options, **settings)
    plain = Segmenter(tiny_model, method="cliptrase", **settings)
    for s in (seg, plain):
        s.set_classes(["a", "b", "c", "d"])
    if compiled:
        seg.compile()
    results = seg.predict_batch(images)
    changed = 0
    for image, result, unrefined in zip(images, results, plain.predict_batch(images)):
        assert (result.labels == reference_labels(seg, image)).all()
        changed += int((result.labels != unrefined.labels).sum())
    assert changed > 0
    sliding = Segmenter(tiny_model, method="cliptrase", method_options={"dbscan_eps": 0.05}, crop=16, stride=8)
    sliding.set_classes(["a", "b"])
    with pytest.raises(ConfigError, match="whole-image mode"):
        sliding.predict(images[0])

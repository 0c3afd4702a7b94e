"""ITACLIP: its class-description files and its label closing. Parity with the authors' code: test_fidelity and
test_pipeline_fidelity."""

from __future__ import annotations

import pytest
import torch

from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.methods import get_method
from gclip.methods.itaclip import read_definitions
from gclip.text import parse_classes


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

"""CLIPer: its class maps against the authors' (linsun449/cliper.code @ c05fa41, tests/data/fidelity/README.md), its
text rows, its label rule and its one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gclip.errors import ConfigError
from gclip.methods import get_method
from gclip.methods.cliper import fused_attention, sinkhorn_step

GOLDEN = Path(__file__).parent / "data" / "fidelity"

# golden file -> (options, sliding-window crop); the authors' CLIPer.forward on the shared 448 x 448 input, text row 0
# as their background text, rows 1..9 as the classes
CASES = {
    "cliper": ({}, 0),
    "cliper_slide224": ({}, 224),
    "cliper_voc20": ({"attention_thr": 0.1}, 336),
    "cliper_s50_nofuse": ({"softmax_scale": 50.0, "fuse_feature": False}, 0),
}


@pytest.fixture(scope="module")
def vitb16(vitb16_checkpoint):
    from gclip.backbones.models import load_model
    from gclip.backbones.openclip import DenseViT

    return DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)


SLOW = [pytest.mark.slow, pytest.mark.skipif(not os.environ.get("GCLIP_SLOW"), reason="GCLIP_SLOW=1 runs it")]


@pytest.mark.golden
@pytest.mark.parametrize("golden", [pytest.param(n, marks=SLOW) if n == "cliper_voc20" else n for n in sorted(CASES)])
def test_class_maps_match_the_authors(vitb16, golden):
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text = torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))
    options, crop = CASES[golden]
    with torch.no_grad():
        got = get_method("cliper", **options).class_maps(vitb16, image, text[1:], text[:1], crop, 112).numpy()
    expected = np.load(GOLDEN / f"{golden}.npy")
    assert got.shape == expected.shape == (9, 28, 28)
    assert np.abs(got - expected).max() <= 1e-4


def test_goldens_differ():
    arrays = {name: np.load(GOLDEN / f"{name}.npy") for name in CASES}
    names = sorted(arrays)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(arrays[a] - arrays[b]).max() > 5e-3, (a, b)


def test_sinkhorn_and_fused_attention():
    s = torch.rand(2, 5, 5) + 0.1
    once = sinkhorn_step(s)
    assert torch.allclose(once.sum(-1), torch.ones(2, 5))
    a = fused_attention(once)
    assert torch.allclose(a.sum(-1), torch.ones(2, 5))
    assert bool((a >= 0).all())
    assert not torch.allclose(fused_attention(sinkhorn_step(once)), a)  # each step changes it: one per layer


def test_label_rule_is_the_authors_cam_to_label():
    method = get_method("cliper", score_threshold=0.3, bkg_thre=0.3)
    maps = torch.tensor([[[0.9, 0.1], [0.2, 0.05]], [[0.1, 0.5], [0.05, 0.1]], [[0.2, 0.25], [0.1, 0.1]]])
    cam, back = method.labels_scores(maps, (2, 2))
    assert cam[2].abs().sum() == 0  # score 0.25 <= 0.3: dropped
    assert torch.allclose(cam[0], torch.tensor([[0.9, 0.0], [0.0, 0.0]]), atol=1e-4)  # 0.1, 0.2 < 0.3 zeroed
    labels = torch.cat([back[None], cam]).argmax(0)
    assert labels.tolist() == [[1, 2], [0, 0]]  # background where no class is left
    cam, back = get_method("cliper", score_threshold=0.0, bkg_thre=0.0).labels_scores(maps, (2, 2))
    assert torch.allclose(back, (1 - cam.amax(0)) ** 2)


def test_text_rows_and_background_words(tmp_path):
    class Encoder:
        def embed(self, names):
            return torch.eye(8)[[hash(n) % 8 for n in names]]

    from gclip.text import parse_classes

    method = get_method("cliper", background_words="sky, wall")
    assert method.background_texts() == ["sky", "wall"]
    rows = method.text_side(Encoder(), parse_classes(["cat", "dog"]))
    assert rows.shape[0] == 4 and method._text_rows == (0, 2)
    method.text_side(Encoder(), parse_classes(["background", "cat", "dog"]))
    assert method._text_rows == (1, 0)
    path = tmp_path / "cls.txt"
    path.write_text("ground, land grass\naeroplane\n")
    assert get_method("cliper", background_words=str(path)).background_texts() == ["ground", "land", "grass"]
    with pytest.raises(ConfigError, match="background_words"):
        get_method("cliper", background_words=str(tmp_path / "missing.txt")).background_texts()
    with pytest.raises(ConfigError, match="softmax_scale"):
        get_method("cliper", softmax_scale=0.0)


def test_segmenter_runs_and_leaves_uncovered_pixels_unlabeled(tiny_model, rgb_image):
    import dataclasses

    from gclip import Segmenter

    seg = Segmenter(tiny_model, method="cliper", short_side=64, crop=32, stride=16, logit_scale=1.0,
                    method_options={"bkg_thre": 1e-6, "score_threshold": 0.0})  # fmt: skip
    seg.set_classes(["cat", "dog", "tree"])
    labels = seg.predict(rgb_image).labels
    assert labels.shape == rgb_image.shape[:2]
    assert (labels >= 0).all()  # every pixel reaches a class
    seg.method = dataclasses.replace(seg.method, bkg_thre=0.999)
    assert (seg.predict(rgb_image).labels == -1).all()  # none does: unlabeled (no background class)
    seg.method = dataclasses.replace(seg.method, _text_rows=None)
    with pytest.raises(ConfigError, match="set_classes"):
        seg.predict(rgb_image)

"""FreeCP: its crop output against the authors' code (chenqi1126/FreeCP @ 6946aa7), its text side and options.

The crop goldens (tests/data/fidelity/freecp*.npy, recipe in the README there) are the authors' ``forward_feature``
on the shared crop with the refinement's mean attention replaced by a fixed local affinity: with random weights the
blocks' attention is nearly uniform, the refined maps span about 1e-5 of their values, and their min-max
normalisation turns fp32 round-off into differences of 3e-2 (between two runs of the authors' own function too).
The mean attention itself is checked against theirs separately (``freecp*__affinity.npy``, its first 32 rows).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gclip.backbones.models import load_model
from gclip.backbones.openclip import DenseViT
from gclip.errors import ConfigError
from gclip.inference.forward import dense_logits
from gclip.methods import get_method
from gclip.methods.freecp import FreeCP, boxes, components, read_descriptions, transition
from gclip.text import ClassList

GOLDEN = Path(__file__).parent / "data" / "fidelity"
SCALE = 100.02986145019531  # exp() of the random weights' logit_scale as the authors' fp16 model holds it
CASES = {  # golden -> options (each base at the authors' thresholds; GEM also at rp 0.1, where two classes stay)
    "freecp": {},
    "freecp_clearclip": {"base": "clearclip"},
    "freecp_maskclip": {"base": "maskclip"},
    "freecp_sclip": {"base": "sclip"},
    "freecp_gem_rp01": {"rp_thres": 0.1},
}


@pytest.fixture(scope="module")
def vitb16(vitb16_checkpoint):
    return DenseViT(load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True).visual)


@pytest.fixture(scope="module")
def inputs():
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    return image, torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))


def local_affinity(rows: int = 28, cols: int = 28) -> torch.Tensor:
    """The goldens' stand-in for the mean attention: ``exp(-|p_i - p_j|² / 8)`` over a ``rows x cols`` patch grid
    (positions in row-major order, as the patch tokens)."""
    idx = torch.arange(rows * cols)
    r, c = (idx // cols).double(), (idx % cols).double()
    return torch.exp(-((r[:, None] - r[None]) ** 2 + (c[:, None] - c[None]) ** 2) / 8.0).float()


def substitute_local_affinity(monkeypatch: pytest.MonkeyPatch, record: bool = False) -> dict:
    """Make ``FreeCP._affinity`` return :func:`local_affinity` of each window's patch grid, as the goldens were made
    (crop goldens here, the pipeline golden in test_pipeline_fidelity.py); with ``record``, the returned dict's
    ``"affinity"`` holds the last real mean attention it replaced."""
    seen: dict = {}
    original = FreeCP._affinity

    def substituted(self, vit, trace):
        if record:
            seen["affinity"] = original(self, vit, trace)
        b, _, h, w = trace.images.shape
        return local_affinity(h // vit.patch_size, w // vit.patch_size)[None].expand(b, -1, -1)

    monkeypatch.setattr(FreeCP, "_affinity", substituted)
    return seen


@pytest.mark.golden
@pytest.mark.parametrize("golden", sorted(CASES))
def test_crop_matches_the_authors(vitb16, inputs, golden, monkeypatch):
    seen = substitute_local_affinity(monkeypatch, record=True)
    got = dense_logits(vitb16, get_method("freecp", logit_scale=SCALE, **CASES[golden]), *inputs).numpy()
    expected = np.load(GOLDEN / f"{golden}.npy")
    assert got.shape == expected.shape == (1, 10, 28, 28)
    assert np.abs(got - expected).max() <= 1e-4
    kept = np.flatnonzero(expected[0].reshape(10, -1).max(axis=1))
    assert (np.flatnonzero(got[0].reshape(10, -1).max(axis=1)) == kept).all() and 0 < len(kept) < 10
    base = golden if golden != "freecp_gem_rp01" else "freecp"
    theirs = np.load(GOLDEN / f"{base}__affinity.npy")
    assert np.abs(seen["affinity"][0, : len(theirs)].numpy() - theirs).max() <= 1e-7


def test_goldens_exercise_both_purification_steps():
    """Each golden keeps some classes and removes others; the ambiguity step merged two classes into one in three of
    them (the authors' run printed its groups: README)."""
    kept = {n: int((np.load(GOLDEN / f"{n}.npy")[0].reshape(10, -1).max(axis=1) > 0).sum()) for n in CASES}
    assert kept == {"freecp": 1, "freecp_clearclip": 1, "freecp_maskclip": 1, "freecp_sclip": 1, "freecp_gem_rp01": 2}


def test_transition_is_doubly_normalised_and_symmetric():
    a = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) + 0.1
    t = transition(a, rounds=0)
    assert torch.allclose(t, t.T)
    one = transition(a, rounds=50)  # Sinkhorn converges: rows and columns sum to one, so does its square
    assert torch.allclose(one.sum(dim=1), torch.ones(6), atol=1e-5)


def test_boxes_follow_the_contours():
    score = np.zeros((8, 8), dtype=np.float32)
    score[1:3, 1:4] = 1.0  # a 2 x 3 blob
    score[5:8, 5:8] = 0.9  # touches the right and bottom edges: clipped to w - 1, h - 1 as the authors
    assert sorted(boxes(score, 0.4)) == [(1, 1, 4, 3), (5, 5, 7, 7)]
    assert boxes(np.zeros((4, 4), dtype=np.float32), 0.4) == [(0, 0, 0, 0)]


def test_components_are_the_connected_groups():
    adjacent = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    assert components(adjacent) == [[0, 2, 3], [1]]


def test_options_are_checked():
    with pytest.raises(ConfigError, match="base must be one of"):
        get_method("freecp", base="naclip")
    with pytest.raises(ConfigError, match="crop_size"):
        get_method("freecp", crop_size=0)


class FakeEncoder:
    """Stands in for TextEncoder: each (template set, name) maps to a fixed 512-d unit vector."""

    def __init__(self, model=None, templates=None):
        self.model, self.templates = model, templates

    def embed(self, names):
        seeds = [sum(map(ord, "|".join(self.templates or []) + "#" + n)) for n in names]
        vecs = [np.random.default_rng(s).standard_normal(512).astype(np.float32) for s in seeds]
        return torch.nn.functional.normalize(torch.from_numpy(np.stack(vecs)), dim=-1)


def test_background_queries_score_one_half(vitb16, inputs):
    """With a background class, its queries get 0.5 in every window: the argmax then gives the background exactly
    where the authors' ``1 - max`` of the class maps is at least their maximum. Without the text side's queries
    (other text), nothing is background."""
    method = get_method("freecp", base="clearclip", rp_thres=0.0, ap_thres=1.1)  # every class kept, no merges
    classes = ClassList((("sky", "wall"), *((f"c{i}",) for i in range(8))), background=True)
    text = method.text_side(FakeEncoder(), classes)
    out = dense_logits(vitb16, method, inputs[0], text)[0]
    assert (out[:2] == 0.5).all() and 0 < out[2:].max() <= 1.0
    assert (dense_logits(vitb16, method, inputs[0], inputs[1])[0] != 0.5).all()


def test_descriptions_file_is_read_as_data(tmp_path):
    path = tmp_path / "voc21.py"
    path.write_text('VOC = {\n    "cat": ["A cat has fur.", "A cat is small."],\n    "dog": ["A dog barks."],\n}\n')
    assert read_descriptions(path) == {"cat": ["A cat has fur.", "A cat is small."], "dog": ["A dog barks."]}
    method = get_method("freecp", descriptions=str(path))
    classes = ClassList((("cat",), ("dog",)))
    method.text_side(FakeEncoder(), classes)
    _, background, described = method._cache["text"]
    assert not background.any()
    expected = FakeEncoder(None, ["{c}A cat has fur.", "{c}A cat is small."]).embed([""])[0]
    assert torch.equal(described[0], expected)  # the sentences as templates without a name
    with pytest.raises(ConfigError, match="no entry for 'bird'"):
        method.text_side(FakeEncoder(), ClassList((("bird",),)))
    (tmp_path / "bad.py").write_text("import os\n")
    with pytest.raises(ConfigError, match="expected NAME"):
        read_descriptions(tmp_path / "bad.py")

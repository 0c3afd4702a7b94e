"""Every method against its authors' code: dense logits on one random-weight ViT-B/16 and one 448x448 crop.

The reference tensors in tests/data/fidelity were produced by running each method's public code on the same
weights and input (see the README there); ``goldens.toml`` says which method and options made each one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from gclip.forward import dense_logits
from gclip.methods import get_method, list_methods
from gclip.models import load_model
from gclip.vit import DenseViT

GOLDEN = Path(__file__).parent / "data" / "fidelity"
TABLE = tomllib.loads((GOLDEN / "goldens.toml").read_text(encoding="utf-8"))
UNMATCHED = {"gclip": "no official code: its defaults follow a third-party reading (README, Methods)"}


@pytest.fixture(scope="module")
def vitb16(vitb16_checkpoint):
    model = load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu")
    assert model.quick_gelu is False  # a plain .pt file: QuickGELU must be asked for ...
    model = load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True)  # ... as OpenAI's is
    return DenseViT(model.visual)


@pytest.fixture(scope="module")
def inputs():
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, 448, 448), dtype=np.float32))
    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    return image, torch.from_numpy(text / np.linalg.norm(text, axis=1, keepdims=True))


def ours(vit: DenseViT, entry: dict, inputs) -> np.ndarray:
    logits = dense_logits(vit, get_method(entry["method"], **entry.get("options", {})), *inputs)
    stride = entry.get("stride", 1)  # goldens at pixel resolution are stored subsampled
    return logits[..., ::stride, ::stride].numpy()


@pytest.mark.parametrize("golden", sorted(TABLE))
def test_dense_logits_match_reference_implementation(vitb16, inputs, golden):
    entry = TABLE[golden]
    expected = np.load(GOLDEN / f"{golden}.npy")
    got = ours(vitb16, entry, inputs)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= entry.get("atol", 1e-4)


def test_every_method_has_a_golden():
    covered = {entry["method"] for entry in TABLE.values()}
    assert set(list_methods()) - covered <= set(UNMATCHED)


def test_goldens_are_distinct():
    """The check above can only pass for the right method: the references differ far beyond the tolerance."""
    arrays = {name: np.load(GOLDEN / f"{name}.npy") for name in TABLE}
    for a in arrays:
        for b in arrays:
            if a < b and arrays[a].shape == arrays[b].shape:
                assert np.abs(arrays[a] - arrays[b]).max() > 1e-2, (a, b)

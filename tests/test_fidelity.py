"""Baselines against the peers' own code: dense logits on one random-weight ViT-B/16 and one 448x448 crop.

The reference tensors in tests/data/fidelity were produced by running SCLIP, ClearCLIP and NACLIP's public
model code on the same weights and input (see the README there).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gclip.forward import dense_logits
from gclip.methods import get_method
from gclip.models import load_model
from gclip.vit import DenseViT

GOLDEN = Path(__file__).parent / "data" / "fidelity"


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


@pytest.mark.parametrize("method", ["clip", "maskclip", "clearclip", "sclip", "naclip"])
def test_dense_logits_match_reference_implementation(vitb16, inputs, method):
    expected = np.load(GOLDEN / f"{method}.npy")
    ours = dense_logits(vitb16, get_method(method), *inputs).numpy()
    assert ours.shape == expected.shape == (1, 10, 28, 28)
    assert np.abs(ours - expected).max() <= 1e-4


def test_goldens_are_distinct(inputs):
    """The check above can only pass for the right method: the references differ far beyond the tolerance."""
    names = ["clip", "maskclip", "clearclip", "sclip", "naclip"]
    arrays = {n: np.load(GOLDEN / f"{n}.npy") for n in names}
    for a in names:
        for b in names:
            if a < b:
                assert np.abs(arrays[a] - arrays[b]).max() > 1e-2

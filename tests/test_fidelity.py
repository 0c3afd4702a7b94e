"""Every method against its authors' code: dense logits on one random-weight ViT-B/16 and one 448x448 crop.

The reference tensors in tests/data/fidelity were produced by running each method's public code on the same
weights and input (see the README there); ``goldens.toml`` says which method and options made each one.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from gclip.backbones.models import load_model
from gclip.backbones.openclip import DenseViT
from gclip.inference.forward import dense_logits
from gclip.methods import get_method, list_methods

pytestmark = pytest.mark.golden

GOLDEN = Path(__file__).parent / "data" / "fidelity"
TABLE = tomllib.loads((GOLDEN / "goldens.toml").read_text(encoding="utf-8"))
UNMATCHED = {
    "gclip": "no official code: its defaults follow a third-party reading (docs/methods/gclip.md)",
    "trident": "runs whole images only: its dense logits are checked on the pipeline photos (pipelines.toml)",
    "corrclip": "runs whole images only: a window's logits in test_corrclip, the pipelines in pipelines.toml",
    "freecp": "random weights make its affinity near-uniform: crop goldens with a local affinity in test_freecp",
    "cliper": "runs whole images only: its class maps against the authors' in test_cliper, pipelines in pipelines.toml",
    "textregion": "runs whole images only: a crop's logits in test_textregion, the pipelines in pipelines.toml",
}


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


def pixel_input() -> torch.Tensor:
    """Random pixels (0..255) normalised with the peers' CLIP constants: for methods that send the crop through
    8-bit PIL (CASS), where normal noise would overflow it."""
    pixels = torch.from_numpy(np.random.default_rng(1).random((1, 3, 448, 448), dtype=np.float32) * 255)
    mean = torch.tensor([122.771, 116.746, 104.094]).view(1, 3, 1, 1)
    std = torch.tensor([68.501, 66.632, 70.323]).view(1, 3, 1, 1)
    return (pixels - mean) / std


def golden_method(entry: dict):
    method = get_method(entry["method"], **entry.get("options", {}))
    if "pairing" in entry:  # CASS: the authors' head pairing, set by rounding on random weights (goldens.toml)
        method = dataclasses.replace(method, _pairing=tuple(entry["pairing"]))
    if "heads" in entry:  # DIH-CLIP: the authors' heads where random weights tie their entropies (goldens.toml)
        method = dataclasses.replace(method, _heads=tuple(tuple(h) for h in entry["heads"]))
    return method


def ours(vit: DenseViT, entry: dict, inputs) -> np.ndarray:
    if entry.get("input") == "pixels":
        inputs = (pixel_input(), inputs[1])
    logits = dense_logits(vit, golden_method(entry), *inputs)
    if "upsample" in entry:  # the authors' crop function ends at pixel resolution: upsampled as the engine does
        logits = torch.nn.functional.interpolate(logits, size=(entry["upsample"],) * 2, mode="bilinear")
    if entry.get("propagate"):  # PEARL: its propagation of the image's logits, with the crop as the image
        logits = golden_method(entry).propagate(inputs[0], logits, inputs[1])
    stride = entry.get("stride", 1)  # goldens at pixel resolution are stored subsampled
    return logits[..., ::stride, ::stride].numpy()


@pytest.mark.parametrize("golden", sorted(TABLE))
def test_dense_logits_match_reference_implementation(vitb16, inputs, golden, request):
    entry = TABLE[golden]
    proxy = entry.get("options", {}).get("proxy")
    if proxy:  # registers the random second model the golden was made with
        request.getfixturevalue(
            {"golden_dinov2": "golden_dinov2", "golden_sam": "golden_sam", "golden_mae": "golden_mae"}.get(
                proxy, "golden_dino"
            )
        )
    expected = np.load(GOLDEN / f"{golden}.npy")
    got = ours(vitb16, entry, inputs)
    assert got.shape == expected.shape
    diff = np.abs(got - expected)
    off = diff > entry.get("atol", 1e-4)
    # `flipped`: the fraction of values allowed off where the method's mask cuts through entries that lie within
    # CPU round-off of its threshold (goldens.toml says which); they must stay within `flipped_atol`
    assert off.mean() <= entry.get("flipped", 0.0), f"{off.sum()} of {off.size} values off, max {diff.max():.2e}"
    assert diff.max() <= entry.get("flipped_atol", entry.get("atol", 1e-4))


def test_cass_costs_equal_the_authors_and_its_pairing_is_as_cheap(vitb16, inputs, golden_dino, monkeypatch):
    """Our Hungarian costs (1 - spectral distance, [DINO head, CLIP head]) equal the authors' on the golden crop,
    and the pairing we choose costs what theirs costs: the cost is separable there, so both are optimal."""
    from scipy.optimize import linear_sum_assignment

    from gclip.methods.cass import Cass

    theirs = np.load(GOLDEN / "cass_cost.npy").astype(np.float64)
    seen = {}
    original = Cass._assignment

    def record(self, cost):
        seen["cost"] = cost[0].numpy().astype(np.float64)
        seen["cols"] = original(self, cost)[0].numpy()
        return original(self, cost)

    monkeypatch.setattr(Cass, "_assignment", record)
    dense_logits(vitb16, get_method("cass", **TABLE["cass"]["options"]), pixel_input(), inputs[1])
    assert np.abs(seen["cost"] - theirs).max() <= 1e-6
    rows = np.arange(theirs.shape[0])
    authors = np.asarray(TABLE["cass"]["pairing"])
    assert abs(theirs[rows, seen["cols"]].sum() - theirs[rows, authors].sum()) <= 1e-5
    assert abs(theirs[rows, linear_sum_assignment(theirs)[1]].sum() - theirs[rows, authors].sum()) <= 1e-5


def test_dihclip_entropies_match_the_authors(vitb16, inputs, monkeypatch):
    """DIH-CLIP's head entropies on the golden crop (prior block, last block, multi-level pass) equal the authors'
    (dihclip__entropy.npy) to fp32 round-off of a sum over 616,225 entries; its selections equal theirs where the
    kept heads' entropies are clear of the others', and the heads it keeps in the last block tie (within that
    round-off) with the ones the authors keep, which goldens.toml imposes."""
    from gclip.methods.dihclip import DihClip

    theirs = np.load(GOLDEN / "dihclip__entropy.npy")
    seen = []
    original = DihClip.selected_heads

    def record(self, maps, which=0):
        seen.append(self.entropies(maps)[0].numpy())
        return original(self, maps, which)

    monkeypatch.setattr(DihClip, "selected_heads", record)
    dense_logits(vitb16, get_method("dihclip"), *inputs)
    ours = np.stack(seen)
    assert np.abs(ours - theirs).max() <= 2e-2  # values about 7000: a relative 3e-6
    for which in (0, 2):  # clear gaps (> 0.29): the same four heads
        assert set(np.argsort(ours[which])[:4]) == set(np.argsort(theirs[which])[:4])
    authors = TABLE["dihclip"]["heads"][1]
    assert np.ptp(theirs[1][authors].tolist() + [np.sort(theirs[1])[4]]) <= 1e-2  # a tie, not a choice


def test_every_method_has_a_golden():
    covered = {entry["method"] for entry in TABLE.values()}
    assert set(list_methods()) - covered <= set(UNMATCHED)


def test_goldens_are_distinct():
    """The check above can only pass for the right method and options: every two references differ by at least
    five times the tolerance (the closest, SFP's three outlier detectors, by about 1e-3)."""
    arrays = {name: np.load(GOLDEN / f"{name}.npy") for name in TABLE}
    for a in arrays:
        for b in arrays:
            if a < b and arrays[a].shape == arrays[b].shape:
                assert np.abs(arrays[a] - arrays[b]).max() > 5e-4, (a, b)


def test_cliptrase_dbscan_refinement_matches_the_authors(vitb16, inputs):
    """CLIPtrase's label refinement on the crop: block L-2's affinity, its DBSCAN clusters (eps 0.8, min 3) and
    the voted labels, each against the authors' run (cliptrase__*.npy, cliptrase_e08m3.npy)."""
    from sklearn.cluster import DBSCAN

    from gclip.inference.forward import encode, head
    from gclip.inference.windows import plan_windows
    from gclip.methods import WindowContext

    image, text = inputs
    method = get_method("cliptrase", dbscan_eps=0.8, dbscan_min_samples=3)
    encoded = encode(vitb16, method, image)
    logits = head(vitb16, method, encoded, text)
    context = method.label_refinement.context(encoded[1])[0]  # (784, 28, 28)
    affinity = context.reshape(784, 784).numpy()
    assert np.abs(affinity[:256] - np.load(GOLDEN / "cliptrase__affinity.npy")).max() <= 1e-5  # first 256 rows kept
    clusters = DBSCAN(eps=0.8, min_samples=3).fit_predict(affinity)
    assert (clusters == np.load(GOLDEN / "cliptrase__dbscan_labels.npy")).all()
    assert len(set(clusters) - {-1}) == 5
    size, windows = plan_windows((448, 448), (448, 448), 0, 0, "symmetric", 16)
    labels = torch.nn.functional.interpolate(logits, size=(448, 448), mode="bilinear").argmax(dim=1)[0]
    refined = method.refine_labels(labels, [WindowContext(windows[0], size, context)]).numpy()
    assert (refined != labels.numpy()).mean() > 0.5  # the vote changes most pixels ...
    assert (refined == np.load(GOLDEN / "cliptrase__refined_labels.npy")).all()  # ... exactly as the authors'
    assert (refined[::8, ::8] == np.load(GOLDEN / "cliptrase_e08m3.npy")[0]).all()


def test_cliptrase_refinement_needs_the_whole_image_mode():
    from gclip.errors import ConfigError
    from gclip.methods import WindowContext

    method = get_method("cliptrase", dbscan_eps=0.8)
    labels = torch.zeros((8, 8), dtype=torch.long)
    two = [WindowContext(None, (8, 8), torch.zeros((4, 2, 2)))] * 2
    with pytest.raises(ConfigError, match="whole-image mode"):
        method.refine_labels(labels, two)
    assert get_method("cliptrase").refine_labels(labels, two) is labels


def test_itaclip_definition_mixing_matches_the_authors():
    """ITACLIP's text side: name embeddings blended with description embeddings (rng 3 stands in for them)."""
    from gclip.methods.itaclip import mix_definitions

    t = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    d = np.random.default_rng(3).standard_normal((10, 512), dtype=np.float32)
    t, d = (torch.from_numpy(a / np.linalg.norm(a, axis=1, keepdims=True)) for a in (t, d))
    with_background = mix_definitions(t, d[1:], list(range(10)), 0.05, background=True)  # voc21's rule and weight
    np.testing.assert_allclose(with_background.numpy(), np.load(GOLDEN / "itaclip_text.npy"), rtol=0, atol=1e-6)
    without = mix_definitions(t, d, list(range(10)), 0.2, background=False)
    np.testing.assert_allclose(without.numpy(), np.load(GOLDEN / "itaclip_text_nobg.npy"), rtol=0, atol=1e-6)

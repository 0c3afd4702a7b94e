"""Whole pipelines against the authors' segmentors: three real VOC photos, random ViT-B/16, random text.

The references in tests/data/fidelity/pipeline were produced by running each method's own inference code (its
resize, sliding windows, logit scale, thresholds and post-processing); ``pipelines.toml`` gives the gclip
settings of each. Skipped without the real data sample.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np
import pytest
import tomllib
import torch

from gclip import Segmenter
from gclip.backbones.models import load_model
from gclip.text import parse_classes

pytestmark = pytest.mark.pipeline

GOLDEN = Path(__file__).parent / "data" / "fidelity"
TABLE = tomllib.loads((GOLDEN / "pipelines.toml").read_text(encoding="utf-8"))
PHOTOS = ["2007_001288", "2007_001321", "2007_001458"]
# CPU cost tiers, so that the default suite stays within minutes on 2 cores (seconds per photo on a 2-core AMD EPYC);
# GCLIP_SLOW=1 runs every entry on every photo its file holds.
FIRST_PHOTO = {  # the first photo only (5 to 28 s each)
    *(
        "trident",
        "corrclip",
        "textregion",
        "proxyclip",
        "proxyclip_dinov2",
        "proxyclip_mae",
        "cass",
        "cliper",
    ),
    *("rfclip_slide", "freecp", "segearth"),
}
SLOW_ONLY = {  # checked only with GCLIP_SLOW=1
    "textregion_siglip",  # 12 s for the first photo; its crop goldens (test_textregion) run by default
    "textregion_pe",  # 11 s for the first photo; likewise
    "glaclip",  # 16 s for the first photo; its crop and 3x3-window cross goldens (test_glaclip) run by default
    "itaclip",  # 115 s: 55 windows x 5 views, PAMR
    "proxyclip_sam",  # 60 s: SAM's encoder at 1024 px for every window
    "trident_halves",  # 53 s: SAM twice (each half)
    "trident_ade",  # 33 s
    "trident_voc20",  # 25 s
    "corrclip_eps001",  # 15 s
    "cliper_slide",  # 30 s: 12 forward passes of all 12 layers' last block a photo
    "cliper_nobkg",  # 30 s: the same
    "lposs",  # 40 s for the first photo on idle cores (107 s under load): the kNN graph over 9 windows' patches
    "lposs_plus",  # 130 to 160 s a photo under load: the pixel propagation over about 290,000 pixels
    "freecp_clearclip",  # FreeCP's other bases: 13 to 20 s a photo (GEM's golden runs by default, first photo)
    "freecp_sclip",
    "freecp_maskclip",
    "segearth_up",  # SegEarth-OV with SimFeatUp: about 5 s a window (6 a photo), its 16x upsampling on one CPU thread
}
SLOW = bool(os.environ.get("GCLIP_SLOW"))
FIXTURES = {name: name for name in ("golden_dinov2", "golden_sam", "golden_mae", "golden_dino16")}  # else golden_dino


@pytest.fixture(scope="module")
def model(vitb16_checkpoint):
    return load_model("ViT-B-16", str(vitb16_checkpoint), device="cpu", quick_gelu=True)


MODELS = {
    "ViT-B-16-SigLIP2": "golden_siglip2",
    "PE-Core-B-16": "golden_pe_core",
}  # an entry's `model`: the fixture of its random model (conftest)


def random_text(width: int = 512) -> torch.Tensor:
    """The 10 random unit text embeddings of the goldens (``default_rng(2)``), ``width`` wide."""
    t = np.random.default_rng(2).standard_normal((10, width), dtype=np.float32)
    return torch.from_numpy(t / np.linalg.norm(t, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def text():
    return random_text()


SLOW_MARKS = [pytest.mark.slow, pytest.mark.skipif(not SLOW, reason="a slow pipeline golden (GCLIP_SLOW=1 runs it)")]


@pytest.mark.parametrize("name", [pytest.param(n, marks=SLOW_MARKS) if n in SLOW_ONLY else n for n in sorted(TABLE)])
def test_pipeline_matches_the_authors_segmentor(model, text, sample_data, name, request, tmp_path, monkeypatch):
    entry = TABLE[name]
    if entry.get("affinity") == "local":  # FreeCP: the refinement's mean attention replaced on both sides (README)
        from test_freecp import substitute_local_affinity

        substitute_local_affinity(monkeypatch)
    options = dict(entry.get("options", {}))
    if "masks" in entry:  # CorrCLIP, TextRegion: the golden's instance (or region) masks, as <stem>.npz files
        with np.load(GOLDEN / "pipeline" / entry["masks"]) as stored:
            for stem in stored.files:
                np.savez(tmp_path / f"{stem}.npz", **{entry.get("masks_array", "instance_mask"): stored[stem]})
        options["masks"] = str(tmp_path)
    if "upsampler_seed" in entry:  # SegEarth-OV's SimFeatUp: the random jbu_one checkpoint the golden was made with
        from test_segearth import upsampler_checkpoint

        options["upsampler_checkpoint"] = upsampler_checkpoint(tmp_path / "jbu.ckpt", seed=entry["upsampler_seed"])
    for key in ("proxy", "sam"):  # registers the random second models the golden was made with
        if key in options:
            request.getfixturevalue(FIXTURES.get(options[key], "golden_dino"))
    if "model" in entry:  # another tower (TextRegion's SigLIP 2 and PE-Core paths), with text of its embedding width
        model = request.getfixturevalue(MODELS[entry["model"]])
        text = random_text(entry["text_width"])
    seg = Segmenter(model, method=entry["method"], method_options=options, **entry["settings"])
    seg.classes = parse_classes(["background"] + [f"class {i}" for i in range(1, 10)])  # VOC21's: prob_thd -> 0
    # the random embeddings stand in for the prompt ensemble, as in the authors' run; a method's text side still runs
    # (FreeCP's records which query is the background's)
    seg._queries = seg.method.text_queries(Embedded(text), seg.classes)
    if "text_rows" in entry:  # CLIPer: which query rows are the background texts (its text side marks them)
        seg.method = dataclasses.replace(seg.method, _text_rows=tuple(entry["text_rows"]))
    golden = np.load(GOLDEN / "pipeline" / f"{name}.npz")
    photos = PHOTOS[:1] if name in FIRST_PHOTO and not SLOW else PHOTOS
    photos = [p for p in photos if f"{p}_labels" in golden]  # a file may hold fewer photos (SAM: the first)
    assert photos, f"{name}: its golden holds none of the photos this tier checks"  # else nothing is compared
    for stem in photos:
        if f"{stem}_pairing" in golden:  # CASS: the authors' head pairing, set by rounding on random weights
            seg.method = dataclasses.replace(seg.method, _pairing=tuple(int(c) for c in golden[f"{stem}_pairing"]))
        path = sample_data / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{stem}.jpg"
        reduced = spy_on_logits(seg)
        result = seg.predict(center_crop(path, entry["center_crop"]) if "center_crop" in entry else path, True)
        labels = golden[f"{stem}_labels"]
        assert result.labels.shape == labels.shape
        assert (result.labels != labels).mean() <= 1e-4, stem
        atol = entry.get("atol", {}).get(stem, 0.0)  # a photo whose logits move at random-weight near-ties (README)
        probs = torch.from_numpy(golden_array(golden, f"{stem}_logits", entry))
        if entry.get("stored") == "logits":  # the authors' argmax sees logits: compare their softmax
            probs = torch.softmax(probs, dim=0)
        assert np.abs(result.probs[:, ::4, ::4] - probs.numpy()).max() <= max(2e-3, atol), stem  # fp16-stored values
        if f"{stem}_dense" in golden:  # the cosine logits themselves, resized to the photo, stored in float32
            assert len(reduced) == 1  # the logits the labels above were made from (one pass, not a second one)
            dense = torch.nn.functional.interpolate(reduced[0][None], size=labels.shape, mode="bilinear")[0]
            difference = np.abs(dense[:, ::4, ::4].numpy() - golden_array(golden, f"{stem}_dense", entry)).max()
            assert difference <= max(entry.get("dense_atol", 1e-4), atol), stem


class Embedded:
    """A text encoder that gives the fixed ``(Q, E)`` embeddings for the ``Q`` queries."""

    def __init__(self, text: torch.Tensor) -> None:
        self.text = text

    def embed(self, names: list[str]) -> torch.Tensor:
        assert len(names) == len(self.text)
        return self.text


def golden_array(golden, key: str, entry: dict) -> np.ndarray:
    """A golden's float32 array; with ``background_query``, the background query's channel (0) set to that score:
    FreeCP's maps leave it at 0 and label background where ``1 - max >= max``, which gclip's constant 0.5 gives."""
    array = golden[key].astype(np.float32)
    if "background_query" in entry:
        array[0] = entry["background_query"]
    return array


def spy_on_logits(seg: Segmenter) -> list[torch.Tensor]:
    """The merged logits each image's labels are reduced from, as :meth:`Segmenter.merged_logits` gives them,
    collected while :meth:`Segmenter.predict` runs (the list fills as images are reduced)."""
    seen: list[torch.Tensor] = []
    reduce = type(seg)._reduce

    def spy(item, logits, return_probs):
        seen.append(logits)
        return reduce(seg, item, logits, return_probs)

    seg._reduce = spy
    return seen


def center_crop(path: Path, size: int) -> np.ndarray:
    """The authors' input for CLIPtrase: torchvision ``Resize(size, BICUBIC)`` then ``CenterCrop(size)``."""
    from PIL import Image
    from torchvision import transforms

    resize = transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC)
    return np.asarray(transforms.CenterCrop(size)(resize(Image.open(path).convert("RGB"))))

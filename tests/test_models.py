"""Loading: tags, local files in every format, identical outputs after a round trip, one-line errors."""

from __future__ import annotations

import time

import numpy as np
import open_clip
import pytest
import torch

from conftest import TINY
from gclip.backbones.models import load_model, read_checkpoint
from gclip.errors import WeightsError
from gclip.inference.segmenter import Segmenter
from gclip.testing import random_state_dict, save_random_checkpoint


def _labels_and_probs(model, image):
    seg = Segmenter(model, method="gclip", classes=["a", "b", "c"], short_side=0, crop=32, stride=16)
    result = seg.predict(image, return_probs=True)
    return result.labels, result.probs


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".safetensors"])
def test_saved_checkpoint_loads_back_identically(tmp_path, rgb_image, suffix):
    path = save_random_checkpoint(tmp_path / f"tiny{suffix}", TINY, seed=5)
    model = load_model(TINY, str(path), device="cpu")
    reference = open_clip.create_model(TINY, pretrained=None)
    reference.load_state_dict(random_state_dict(reference, seed=5))
    for k, v in reference.state_dict().items():
        assert torch.equal(model.clip.state_dict()[k], v), k
    again = load_model(TINY, str(path), device="cpu")
    a, b = _labels_and_probs(model, rgb_image), _labels_and_probs(again, rgb_image)
    assert np.array_equal(a[0], b[0]) and np.abs(a[1] - b[1]).max() == 0


def test_openai_jit_archive_and_nested_state_dict(tmp_path):
    model = open_clip.create_model(TINY, pretrained=None)
    model.load_state_dict(random_state_dict(model, seed=2))
    torch.jit.script(model).save(str(tmp_path / "jit.pt"))
    state, is_jit = read_checkpoint(tmp_path / "jit.pt")
    assert is_jit and torch.equal(state["visual.proj"], model.visual.proj)
    loaded = load_model(TINY, str(tmp_path / "jit.pt"), device="cpu")
    assert loaded.quick_gelu and torch.equal(loaded.clip.visual.proj, model.visual.proj)
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "nested.pt")
    assert torch.equal(load_model(TINY, str(tmp_path / "nested.pt")).clip.visual.proj, model.visual.proj)


def test_precisions_and_fingerprint(tiny_checkpoint):
    fp32 = load_model(TINY, str(tiny_checkpoint), precision="fp32", device="cpu")
    bf16 = load_model(TINY, str(tiny_checkpoint), precision="bf16", device="cpu")
    assert bf16.clip.visual.proj.dtype == torch.bfloat16 and fp32.dtype == torch.float32
    assert fp32.fingerprint == load_model(TINY, str(tiny_checkpoint)).fingerprint
    assert fp32.mean == open_clip.OPENAI_DATASET_MEAN


def test_fp16_on_a_cpu_warns_that_it_is_slow(tiny_checkpoint, recwarn):
    with pytest.warns(UserWarning, match="fp16 on a CPU .* use --precision bf16 or fp32"):
        fp16 = load_model(TINY, str(tiny_checkpoint), precision="fp16", device="cpu")
    assert fp16.dtype == torch.float16
    load_model(TINY, str(tiny_checkpoint), precision="bf16", device="cpu")
    assert not [w for w in recwarn if "fp16 on a CPU" in str(w.message)]


def _garbage(tmp_path):
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"not a checkpoint at all" * 10)
    return path


def _empty(tmp_path):
    path = tmp_path / "empty.safetensors"
    path.touch()
    return path


def _wrong_model(tmp_path):
    return save_random_checkpoint(tmp_path / "b32.pt", "ViT-B-32", seed=0)


def _pickled_object(tmp_path):
    path = tmp_path / "object.pt"
    torch.save({"weights": torch.zeros(2), "config": {"lr": 0.1}}, path)
    return path


@pytest.mark.parametrize(
    ("make", "model", "message"),
    [
        (lambda p: "no-such-tag", TINY, "neither a pretrained tag"),
        (lambda p: "ViT-B-99", None, "unknown model 'ViT-B-99'"),
        (lambda p: str(p / "missing.pt"), TINY, "does not exist"),
        (_garbage, TINY, "cannot read checkpoint"),
        (_empty, TINY, "is empty"),
        (_wrong_model, TINY, "does not fit model gclip-tiny-test"),
        (_pickled_object, TINY, "holds no tensor state dict"),
    ],
)
def test_bad_weights_give_one_line_errors(tmp_path, make, model, message):
    source = make(tmp_path)
    name, pretrained = (source, None) if model is None else (model, str(source))
    with pytest.raises(WeightsError, match=message) as info:
        load_model(name, pretrained, device="cpu")
    assert "\n" not in str(info.value)
    assert model is None or "--pretrained" in str(info.value) or "--model" in str(info.value)


def test_uncached_tag_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    start = time.monotonic()
    match = r"not in the local cache.*`gclip download ViT-B-32 openai --to DIR`.*ViT-B-32.openai.pt.*--pretrained PATH"
    with pytest.raises(WeightsError, match=match):
        load_model("ViT-B-32", "openai", cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 20  # no download retry loop (generous: this includes building nothing)


@pytest.mark.heavy
def test_cached_tag_is_used_without_network(tmp_path, monkeypatch):
    """A tag whose file is in open_clip's URL cache loads offline (the real tag path, weights from disk)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = open_clip.get_pretrained_cfg("ViT-B-32", "openai")
    cache = tmp_path / "cache"
    cache.mkdir()
    save_random_checkpoint(cache / cfg["url"].rsplit("/", 1)[-1], "ViT-B-32", seed=0, quick_gelu=True)
    model = load_model("ViT-B-32", "openai", cache_dir=str(cache), device="cpu")
    assert model.quick_gelu and model.pretrained == "openai"


def test_device_errors():
    if not torch.cuda.is_available():
        with pytest.raises(WeightsError, match="CUDA is not available"):
            load_model(TINY, None, device="cuda")
    with pytest.raises(WeightsError, match="unknown precision"):
        load_model(TINY, None, precision="fp8")


def test_loading_a_checkpoint_drops_open_clips_random_init_notice(tiny_checkpoint, caplog):
    """open_clip warns "No pretrained weights loaded ... initialized randomly" on the model gclip builds before it
    loads the checkpoint itself: that notice is false and is dropped (issue 24, trap 7); without weights it stays."""
    import logging

    with caplog.at_level(logging.WARNING):
        load_model(TINY, str(tiny_checkpoint), device="cpu")
    assert not [r for r in caplog.records if "initialized randomly" in r.getMessage()]
    with caplog.at_level(logging.WARNING):
        load_model(TINY, None, device="cpu")
    assert [r for r in caplog.records if "initialized randomly" in r.getMessage()]


def test_weights_that_do_not_name_their_tag_get_the_normalisation_all_its_tags_share(tmp_path):
    """SigLIP 2's and PE-Core's tags normalise with 0.5 (not OpenAI's CLIP mean): random weights and a local file
    without a `gclip download` sidecar get it too; a model whose tags differ (ViT-L-14) keeps the model's default."""
    from gclip.backbones.models import _shared_normalisation

    assert _shared_normalisation("PE-Core-B-16") == {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert _shared_normalisation("ViT-L-14") == {}
    assert _shared_normalisation("ViT-B-16")["mean"][0] == pytest.approx(0.48145466)
    model = load_model("ViT-B-16-SigLIP2", None, device="cpu", tokenizer=None)
    assert model.mean == model.std == (0.5, 0.5, 0.5)
    path = tmp_path / "siglip2.pt"
    torch.save(model.clip.state_dict(), path)
    local = load_model("ViT-B-16-SigLIP2", str(path), device="cpu")
    assert local.mean == local.std == (0.5, 0.5, 0.5)


def test_random_weights_fill_scalar_parameters():
    """SigLIP's logit_bias is a 0-d parameter: the random weights of tests and benchmarks fill it too (it crashed)."""
    module = torch.nn.Module()
    module.bias = torch.nn.Parameter(torch.zeros(()))
    module.weight = torch.nn.Parameter(torch.zeros(3, 4))
    state = random_state_dict(module, seed=0)
    assert state["bias"].shape == () and state["weight"].shape == (3, 4) and state["weight"].abs().sum() > 0

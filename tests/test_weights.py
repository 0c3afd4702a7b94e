"""One way to find, read and refuse weights for every loader (gclip.backbones.weights): CLIP, second models, SAM."""

from __future__ import annotations

import re

import open_clip
import pytest
import torch

from conftest import TINY, TINY_DINO, TINY_SAM_MASKS, make_tiny_dino
from gclip.backbones import second_models
from gclip.backbones.models import load_model
from gclip.errors import WeightsError
from gclip.testing import random_state_dict

# The shape every missing-weights error has, whatever the loader.
MISSING = re.compile(
    r"^(no weights given for|weights of) (?P<what>.+?)( \(the usual file: [^)]+\))?"
    r"( are not in the local cache and the network is unreachable)?: run `gclip download (?P<args>[^`]+) --to DIR` "
    r"on a connected machine, then pass the file it writes \(DIR/(?P<file>\S+)\) as (?P<option>\w+)=PATH "
    r"\((?P<flag>--[\w-]+) PATH on the command line\)$"
)


def _load_sam(name, checkpoint=None):
    pytest.importorskip("segment_anything")
    from gclip.io.masks import load_sam

    load_sam.cache_clear()
    return load_sam(name, checkpoint)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path / "gclip-cache"))


@pytest.mark.parametrize(
    ("load", "what", "args", "option"),
    [
        (lambda: load_model("ViT-B-32", "openai"), "CLIP ViT-B-32/openai", "ViT-B-32 openai", "pretrained"),
        (
            lambda: second_models.load_second_model("dino_vits16"),
            "proxy dino_vits16 (vit_small_patch16_224.dino)",
            "dino_vits16",
            "proxy_checkpoint",
        ),
        (
            lambda: second_models.load_second_model("sam_vitb", option="sam_checkpoint"),
            "proxy sam_vitb",
            "sam_vitb",
            "sam_checkpoint",
        ),
        (lambda: _load_sam("sam_vitb"), "mask generator sam_vitb", "sam_vitb", "sam_checkpoint"),
    ],
    ids=["clip", "dino", "sam-encoder", "sam-masks"],
)
def test_missing_weights_have_one_shape_for_every_loader(offline, load, what, args, option):
    """CLIP, a second model and SAM: the same one line, naming the weights, the `gclip download` command, the file it
    writes and the option and flag that take it."""
    with pytest.raises(WeightsError) as info:
        load()
    message = str(info.value)
    found = MISSING.match(message)
    assert found, message
    assert (found["what"], found["args"], found["option"]) == (what, args, option)
    assert found["flag"] == "--" + option.replace("_", "-")
    assert found["file"] == ("ViT-B-32.openai.pt" if option == "pretrained" else f"{args}.pt")


@pytest.mark.parametrize(
    ("load", "flag"),
    [
        (lambda path: load_model(TINY, str(path)), "--pretrained"),
        (lambda path: second_models.load_second_model(TINY_DINO, str(path)), "--proxy-checkpoint"),
        (
            lambda path: second_models.load_second_model(TINY_DINO, str(path), option="sam_checkpoint"),
            "--sam-checkpoint",
        ),
        (lambda path: _load_sam(TINY_SAM_MASKS, str(path)), "--sam-checkpoint"),
    ],
    ids=["clip", "dino", "sam-encoder", "sam-masks"],
)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist: pass an existing file to {flag}$"),
        (b"", "is empty .* pass it to {flag}$"),
        (b"garbage" * 9, r"cannot read checkpoint .*\({flag} takes a"),
    ],
    ids=["missing", "empty", "garbage"],
)
def test_a_bad_file_names_the_flag_that_took_it(tmp_path, load, flag, content, message):
    """Each loader reads files through one reader, whose errors name the loader's own flag (a second model's used to
    say --pretrained)."""
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    second_models.load_second_model.cache_clear()
    with pytest.raises(WeightsError, match=message.format(flag=re.escape(flag))) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_gclips_weights_folder_serves_every_loader(offline, monkeypatch):
    """A file in gclip's one weights folder (where `gclip download` writes) is found by name, offline, by the second
    models (a DINO here), SAM's mask generator and CLIP's tags."""
    from gclip.backbones.weights import download_filename, weights_dir

    folder = weights_dir()
    folder.mkdir(parents=True)
    dino = random_state_dict(make_tiny_dino(), seed=4)
    torch.save(dino, folder / "gclip-tiny-dino-folder.pt")
    second_models.register_second_model(
        "gclip-tiny-dino-folder", second_models.SecondModelSpec("tiny", "sometag", build=make_tiny_dino)
    )
    loaded = second_models.load_second_model("gclip-tiny-dino-folder")
    assert torch.equal(loaded.model.pos_embed, dino["pos_embed"])
    assert loaded.path == str(folder / "gclip-tiny-dino-folder.pt") and loaded.weights_record()["sha256"]

    tags = {"tinytag": {"hf_hub": "gclip/not-on-the-hub/", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    clip = open_clip.create_model(TINY)
    state = random_state_dict(clip, seed=6)
    torch.save(state, folder / download_filename(TINY, "tinytag"))
    model = load_model(TINY, "tinytag")
    assert torch.equal(model.clip.visual.proj, state["visual.proj"])
    assert model.quick_gelu and model.mean == (0.5, 0.5, 0.5)

    pytest.importorskip("segment_anything")
    from conftest import make_tiny_full_sam

    torch.save(random_state_dict(make_tiny_full_sam(), seed=3), folder / f"{TINY_SAM_MASKS}.pt")
    assert _load_sam(TINY_SAM_MASKS) is not None


def test_second_models_share_clips_fingerprint():
    from gclip.backbones.base import fingerprint

    dino = second_models.load_second_model(TINY_DINO)
    assert dino.fingerprint == fingerprint(dino.model)

"""``gclip download`` (issue 24, trap 6): the network fetch is replaced by tiny random models; the file it writes loads
offline with the right settings, and the offline errors name the command."""

from __future__ import annotations

import hashlib
import json

import open_clip
import pytest
import torch

from conftest import TINY, TINY_SAM_MASKS, make_tiny_dino, make_tiny_full_sam, make_tiny_hf_tokenizer
from gclip.backbones import download as dl
from gclip.backbones import second_models
from gclip.backbones.models import load_model
from gclip.cli import main
from gclip.errors import WeightsError
from gclip.testing import random_state_dict

TAG = {"hf_hub": "gclip/tiny-test-weights/", "quick_gelu": True, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
TINY_DINO_DL = "gclip-tiny-dino-download"


@pytest.fixture
def network(monkeypatch, tmp_path):
    """A connected machine: open_clip, timm and torch.hub hand out tiny random models instead of downloading, and
    gclip's weights folder is empty."""
    import timm

    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path / "gclip-cache"))
    monkeypatch.setattr(dl, "hub_reachable", lambda host: True)
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, {"tinytag": TAG})
    create_model = open_clip.create_model

    def fake_create(name, pretrained=None, **kwargs):
        model = create_model(name, pretrained=None, **kwargs)
        if pretrained:
            assert (name, pretrained) == (TINY, "tinytag")
            model.load_state_dict(random_state_dict(model, seed=21))
        return model

    def fake_timm(name, pretrained=False, **kwargs):
        assert (name, pretrained) == ("gclip-tiny-arch.tinytag", True)
        model = make_tiny_dino()
        model.load_state_dict(random_state_dict(model, seed=22))
        return model

    def fake_url(url, dst, progress=True):
        assert url.endswith("/sam_tiny_t_0123ab.pth")
        torch.save(random_state_dict(make_tiny_full_sam(), seed=23), dst)

    monkeypatch.setattr(open_clip, "create_model", fake_create)
    monkeypatch.setattr(timm, "create_model", fake_timm)
    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_url)
    spec = second_models.SecondModelSpec("gclip-tiny-arch", "tinytag", build=make_tiny_dino)
    second_models.register_second_model(TINY_DINO_DL, spec)
    monkeypatch.setitem(dl.SAM_URLS, TINY_SAM_MASKS, "https://example.invalid/sam_tiny_t_0123ab.pth")


def test_a_downloaded_clip_loads_from_its_file_alone(network, tmp_path, capsys):
    """`--pretrained DIR/file` needs no --model nor --quick-gelu: the sidecar says the model, its activation and its
    normalisation."""
    assert main(["download", TINY, "tinytag", "--to", str(tmp_path / "w")]) == 0
    path = tmp_path / "w" / f"{TINY}.tinytag.pt"
    assert f"--pretrained {path}" in capsys.readouterr().out
    side = json.loads((tmp_path / "w" / f"{TINY}.tinytag.pt.json").read_text())
    assert (side["kind"], side["model"], side["tag"], side["quick_gelu"]) == ("clip", TINY, "tinytag", True)
    assert side["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert sorted(p.name for p in (tmp_path / "w").iterdir()) == [path.name, path.name + ".json"]  # no temporaries
    model = load_model(None, str(path))  # --model left out
    assert model.name == TINY and model.quick_gelu and model.mean == (0.5,) * 3 and model.std == (0.25,) * 3
    reference = random_state_dict(open_clip.create_model(TINY), seed=21)
    assert all(torch.equal(model.clip.state_dict()[k], v) for k, v in reference.items())
    refused = f"holds the weights of CLIP {TINY}/tinytag, not of CLIP ViT-B-32: pass --model {TINY}, or leave --model"
    with pytest.raises(WeightsError, match=refused):
        load_model("ViT-B-32", str(path))
    del open_clip.pretrained._PRETRAINED[TINY]  # a machine whose open_clip lacks the tag: the sidecar still tells
    assert load_model(None, str(path)).mean == (0.5,) * 3


def test_the_cli_segments_with_a_downloaded_file_and_no_other_flag(network, tmp_path, rgb_image, capsys):
    from PIL import Image

    main(["download", TINY, "tinytag", "--to", str(tmp_path / "w")])
    Image.fromarray(rgb_image).save(tmp_path / "a.png")
    argv = ["segment", str(tmp_path / "a.png"), "--classes", "cat,dog", "--out", str(tmp_path / "out")]
    argv += ["--pretrained", str(tmp_path / "w" / f"{TINY}.tinytag.pt"), "--crop", "32", "--stride", "16"]
    assert main(argv + ["--short-side", "32", "--format", "json", "--no-progress"]) == 0
    settings = json.loads((tmp_path / "out" / "a.json").read_text())["settings"]
    assert (settings["model"], settings["quick_gelu"]) == (TINY, True)


def test_without_to_the_tag_works_offline_from_gclips_folder(network, monkeypatch, capsys):
    """Offline, the tag first says which command fetches it; after `gclip download` (no --to) it loads."""
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = r"\(huggingface.co/gclip/tiny-test-weights\)"
    with pytest.raises(
        WeightsError, match=f"CLIP {TINY}/tinytag {source} .*unreachable: run `gclip download {TINY} tinytag"
    ):
        load_model(TINY, "tinytag")
    assert main(["download", TINY, "tinytag"]) == 0
    assert load_model(TINY, "tinytag").quick_gelu


def test_a_downloaded_second_model_loads_from_its_file_and_by_name(network, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    with pytest.raises(WeightsError, match=f"run `gclip download {TINY_DINO_DL} --to DIR`"):
        second_models.load_second_model(TINY_DINO_DL)
    assert main(["download", TINY_DINO_DL, "--to", str(tmp_path / "w")]) == 0
    path = tmp_path / "w" / f"{TINY_DINO_DL}.pt"
    assert "--proxy-checkpoint" in capsys.readouterr().out
    expected = random_state_dict(make_tiny_dino(), seed=22)
    loaded = second_models.load_second_model(TINY_DINO_DL, str(path))
    assert torch.equal(loaded.model.pos_embed, expected["pos_embed"])
    assert main(["download", TINY_DINO_DL]) == 0  # into gclip's folder: found by name, offline
    second_models.load_second_model.cache_clear()
    assert torch.equal(second_models.load_second_model(TINY_DINO_DL).model.pos_embed, expected["pos_embed"])
    with pytest.raises(WeightsError, match=f"holds the weights of second model {TINY_DINO_DL}, not of proxy"):
        second_models.load_second_model("gclip-tiny-dino", str(path))


def test_a_downloaded_sam_loads_as_the_mask_generator(network, tmp_path, capsys):
    pytest.importorskip("segment_anything")
    from gclip.io.masks import load_sam

    assert main(["download", TINY_SAM_MASKS, "--to", str(tmp_path / "w")]) == 0
    path = tmp_path / "w" / f"{TINY_SAM_MASKS}.pt"
    assert json.loads((tmp_path / "w" / f"{path.name}.json").read_text())["kind"] == "sam"
    load_sam.cache_clear()
    sam = load_sam(TINY_SAM_MASKS, str(path))
    expected = random_state_dict(make_tiny_full_sam(), seed=23)
    assert torch.equal(sam.image_encoder.pos_embed, expected["image_encoder.pos_embed"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["nope"], "unknown model 'nope': give an open_clip model and tag"),
        ([TINY, "no-such-tag"], f"{TINY} has no pretrained tag 'no-such-tag': choose one of tinytag"),
        ([TINY_DINO_DL, "sometag"], "takes no tag"),
    ],
)
def test_bad_downloads_are_one_line_errors(network, argv, message, capsys):
    assert main(["download", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_an_unreachable_network_is_one_line_without_retries(network, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(dl, "hub_reachable", lambda host: False)
    assert main(["download", TINY, "tinytag", "--to", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "huggingface.co is unreachable" in err and err.count("\n") == 1 and not (tmp_path / "w").exists()

    def broken(*a, **k):
        raise ConnectionError("connection reset\nby peer")

    monkeypatch.setattr(dl, "hub_reachable", lambda host: True)
    monkeypatch.setattr(open_clip, "create_model", broken)
    assert main(["download", TINY, "tinytag", "--to", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert "download of CLIP gclip-tiny-test/tinytag failed (ConnectionError: connection reset)" in err
    assert err.count("\n") == 1


def test_a_hub_tokenizer_is_downloaded_beside_the_weights_and_used_offline(network, tmp_path, monkeypatch):
    """A model whose tokenizer comes from the hub (SigLIP's): `gclip download` saves the tokenizer's files beside the
    weights and names them in the sidecar; the file alone then embeds class names offline."""
    from gclip.backbones import tokenizer as tok
    from gclip.text import TextEncoder

    repo = "gclip/tiny-hub-tokenizer"
    monkeypatch.setitem(open_clip.factory._MODEL_CONFIGS[TINY]["text_cfg"], "hf_tokenizer_name", repo)
    source = make_tiny_hf_tokenizer(tmp_path / "hub-files")
    real = tok.hf_tokenizer
    monkeypatch.setattr(tok, "hf_tokenizer", lambda name, src: real(name, str(source) if src == repo else src))
    assert main(["download", TINY, "tinytag", "--to", str(tmp_path / "w")]) == 0
    folder = tmp_path / "w" / f"{TINY}.tinytag.tokenizer"
    side = json.loads((tmp_path / "w" / f"{TINY}.tinytag.pt.json").read_text())
    assert side["tokenizer"] == folder.name and (folder / "tokenizer.json").is_file()
    assert not [p for p in (tmp_path / "w").iterdir() if p.name.startswith(".")]  # no temporaries left
    monkeypatch.setattr(tok, "hf_tokenizer", real)
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    model = load_model(None, str(tmp_path / "w" / f"{TINY}.tinytag.pt"))
    assert model.tokenizer.source == folder
    tokens = model.tokenizer(["a photo of the cat"])
    assert tokens[0, :6].tolist() == [3, 4, 5, 6, 7, 1]  # the tiny tokenizer's ids, then its end token
    assert TextEncoder(model, ["a photo of the {c}"]).embed(["cat"]).shape == (1, model.clip.text_projection.shape[1])

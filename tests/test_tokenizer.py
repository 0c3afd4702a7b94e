"""The text tower's tokenizer offline (``--tokenizer DIR``) and class embeddings made beforehand
(``gclip embed-text`` / ``--text-embeddings``): SigLIP's tokenizer comes from the Hugging Face hub."""

from __future__ import annotations

import numpy as np
import open_clip
import pytest
import torch

from conftest import TINY, TINY_TOKENIZER_WORDS, make_tiny_hf_tokenizer
from gclip.backbones.tokenizer import LazyTokenizer, hub_tokenizer_name, resolve_tokenizer
from gclip.cli import main
from gclip.errors import ConfigError, WeightsError
from gclip.text import TextEncoder, encode_text, read_text_embeddings, write_text_embeddings

SIGLIP2 = "ViT-B-16-SigLIP2"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return make_tiny_hf_tokenizer(tmp_path_factory.mktemp("siglip2-tokenizer"))


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No network and an empty Hugging Face cache."""
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))


def test_siglip2_names_its_hub_tokenizer_and_clip_needs_none():
    assert hub_tokenizer_name(SIGLIP2) == "timm/ViT-B-16-SigLIP2"
    assert hub_tokenizer_name("ViT-B-16") is None
    assert hub_tokenizer_name("PE-Core-B-16") is None  # open_clip's BPE tokenizer, no file


def test_a_local_tokenizer_folder_gives_open_clips_tokens(tokenizer_dir):
    tokens = resolve_tokenizer(SIGLIP2, tokenizer_dir)(["A photo of the  CAT.", "sky"])
    context = open_clip.get_model_config(SIGLIP2)["text_cfg"]["context_length"]
    assert tokens.shape == (2, context) and tokens.dtype == torch.long
    ids = {w: i + 3 for i, w in enumerate(TINY_TOKENIZER_WORDS)}
    # "canonicalize" cleaning (SigLIP 2's config) drops the punctuation and lower-cases; then the end token, padding
    expected = [ids["a"], ids["photo"], ids["of"], ids["the"], ids["cat"], 1]
    assert tokens[0, : len(expected)].tolist() == expected and not tokens[0, len(expected) :].any()
    assert tokens[1, :2].tolist() == [ids["sky"], 1]


def test_the_siglip2_text_tower_embeds_with_the_local_tokenizer(tokenizer_dir):
    clip = open_clip.create_model(SIGLIP2, pretrained=None).eval()
    tokens = resolve_tokenizer(SIGLIP2, tokenizer_dir)(["a photo of the cat", "a photo of the dog"])
    with torch.no_grad():
        out = encode_text(clip, tokens)
    assert out.shape == (2, 768) and torch.isfinite(out).all() and not torch.allclose(out[0], out[1])


def test_offline_without_a_tokenizer_is_one_line_naming_both_remedies(offline):
    with pytest.raises(WeightsError) as e:
        resolve_tokenizer(SIGLIP2)
    text = str(e.value)
    assert "\n" not in text and "--tokenizer DIR" in text and "--text-embeddings" in text and "timm/ViT-B-16" in text


def test_the_tokenizer_is_found_on_first_use_only(offline, tokenizer_dir):
    lazy = LazyTokenizer(SIGLIP2)  # nothing looked for yet: no error
    with pytest.raises(WeightsError, match="--tokenizer DIR"):
        lazy(["a cat"])
    given = LazyTokenizer(SIGLIP2, tokenizer_dir)
    assert given(["a cat"]).shape[0] == 1


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p / "missing", "no such folder"),
        (lambda p: (p / "file.txt").write_text("x") and p / "file.txt", "not a folder"),
        (lambda p: p, "no tokenizer files"),
    ],
)
def test_a_bad_tokenizer_folder_is_one_line(tmp_path, make, message):
    with pytest.raises(ConfigError, match=message) as e:
        resolve_tokenizer(SIGLIP2, make(tmp_path))
    assert "\n" not in str(e.value) and "--tokenizer" in str(e.value)


def test_a_tokenizer_folder_for_a_builtin_tokenizer_model_is_refused(tokenizer_dir):
    with pytest.raises(ConfigError, match="built-in tokenizer.*leave --tokenizer out"):
        resolve_tokenizer("ViT-B-16", tokenizer_dir)


def test_load_model_checks_a_given_tokenizer_folder_at_once(tmp_path):
    from gclip import load_model

    with pytest.raises(ConfigError, match="built-in tokenizer"):  # before any image or class name
        load_model("ViT-B-16", None, device="cpu", tokenizer=tmp_path / "nope")


def _broken_tokenizer(*_args, **_kwargs):
    raise WeightsError("tokenizer unavailable here")


def test_text_embeddings_made_beforehand_need_no_tokenizer(tiny_model, tmp_path):
    import dataclasses

    made = TextEncoder(tiny_model, ["a photo of a {c}.", "{c}"])
    path = write_text_embeddings(tmp_path / "emb.npz", made, ["cat", "dog", "cat"])
    model = dataclasses.replace(tiny_model, tokenizer=_broken_tokenizer)
    used = TextEncoder(model, ["a photo of a {c}.", "{c}"], embeddings=path)
    assert torch.equal(used.embed(["dog", "cat"]), made.embed(["dog", "cat"]))
    with pytest.raises(WeightsError) as e:  # a name the file lacks needs the tokenizer
        used.embed(["sky"])
    assert "has no embedding for 'sky'" in str(e.value) and "tokenizer unavailable here" in str(e.value)


def test_text_embeddings_of_other_weights_or_templates_are_refused(tiny_model, tmp_path):
    import dataclasses

    path = write_text_embeddings(tmp_path / "emb.npz", TextEncoder(tiny_model, ["{c}"]), ["cat"])
    with pytest.raises(ConfigError, match="same --templates"):
        TextEncoder(tiny_model, ["a {c}"], embeddings=path)
    other = dataclasses.replace(tiny_model, fingerprint="0123456789abcdef")
    with pytest.raises(ConfigError, match="weights 0123456789abcdef.*gclip embed-text"):
        TextEncoder(other, ["{c}"], embeddings=path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="not a gclip text-embeddings file"):
        TextEncoder(tiny_model, ["{c}"], embeddings=tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", names=np.array(["cat"]))
    with pytest.raises(ConfigError, match="no format, embeddings"):
        read_text_embeddings(tmp_path / "other.npz", TextEncoder(tiny_model, ["{c}"]))
    with pytest.raises(ConfigError, match="no such file"):
        TextEncoder(tiny_model, ["{c}"], embeddings=tmp_path / "missing.npz")


def test_embed_text_then_segment_with_the_file(tiny_checkpoint, tmp_path, rgb_image, capsys):
    from PIL import Image

    Image.fromarray(rgb_image).save(tmp_path / "img.png")
    model = ["--model", TINY, "--pretrained", str(tiny_checkpoint), "--device", "cpu"]
    emb = tmp_path / "voc.npz"
    assert main(["embed-text", "--classes", "cat,sky", "--out", str(emb), *model]) == 0
    assert "2 names" in capsys.readouterr().out
    # the same file with the two embeddings swapped: if segment reads it, the two labels swap
    with np.load(emb) as data:
        swapped = {k: data[k] for k in data.files}
    swapped["embeddings"] = swapped["embeddings"][::-1].copy()
    np.savez(tmp_path / "swapped.npz", **swapped)
    run = ["segment", str(tmp_path / "img.png"), "--classes", "cat,sky", "--method", "clip", "--format", "png", *model]
    labels = {}
    for name, extra in {
        "plain": [],
        "file": ["--text-embeddings", str(emb)],
        "swapped": ["--text-embeddings", str(tmp_path / "swapped.npz")],
    }.items():
        assert main([*run, "--out", str(tmp_path / name), *extra]) == 0
        labels[name] = np.asarray(Image.open(next((tmp_path / name).rglob("*.png"))))
    assert np.array_equal(labels["plain"], labels["file"])
    assert len(np.unique(labels["plain"])) == 2 and np.array_equal(labels["swapped"], 1 - labels["plain"])
    # other templates than the file's: one line, so the flag reaches the text encoder
    (tmp_path / "templates.txt").write_text("a {c}\n")
    code = main(
        [
            *run,
            "--out",
            str(tmp_path / "t"),
            "--text-embeddings",
            str(emb),
            "--templates",
            str(tmp_path / "templates.txt"),
        ]
    )
    assert code == 2 and "same --templates" in capsys.readouterr().err

"""Class lists, synonyms, templates and the text-embedding cache."""

from __future__ import annotations

import pytest
import torch

from gclip.errors import ClassesError, ConfigError
from gclip.text import TextEncoder, cache_dir, load_templates, parse_classes, read_class_file


@pytest.mark.parametrize(
    ("spec", "names", "queries"),
    [
        ("cat,dog,sky", ["cat", "dog", "sky"], ["cat", "dog", "sky"]),
        (" cat , dog ", ["cat", "dog"], ["cat", "dog"]),
        ("person, people; car", ["person", "car"], ["person", "people", "car"]),
        (["person, people", "car"], ["person", "car"], ["person", "people", "car"]),
        ([["sky", "clouds"], "sea"], ["sky", "sea"], ["sky", "clouds", "sea"]),
    ],
)
def test_parse_classes(spec, names, queries):
    classes = parse_classes(spec)
    assert classes.names == names and classes.queries == queries
    assert len(classes.query_to_class) == len(queries)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "is empty"),
        (" , ,", "is empty"),
        ([], "is empty"),
        ("cat,dog,Cat", "names 'Cat' twice"),
        (["sky, clouds", "clouds"], "names 'clouds' twice"),
    ],
)
def test_bad_class_lists(spec, message):
    with pytest.raises(ClassesError, match=message):
        parse_classes(spec)


def test_a_first_class_named_background_is_a_background_class():
    assert parse_classes("background,cat").background and parse_classes("Background, void; cat").background
    assert not parse_classes("cat,background").background and not parse_classes("cat,dog").background


def test_class_file_with_synonyms_and_comments(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("# vocabulary\nsky, clouds\n\nsea\nperson,people, man\n", encoding="utf-8")
    classes = read_class_file(path)
    assert classes.names == ["sky", "sea", "person"]
    assert classes.query_to_class == [0, 0, 1, 2, 2, 2]
    assert parse_classes(str(path)).synonyms == classes.synonyms


def test_unreadable_class_file(tmp_path):
    with pytest.raises(ClassesError, match="cannot read class file"):
        read_class_file(tmp_path / "missing.txt")
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ClassesError, match="cannot read class file"):
        read_class_file(tmp_path / "bin.txt")


def test_bundled_templates_are_the_80_openai_ones():
    templates = load_templates()
    assert len(templates) == 80 and len(set(templates)) == 80
    assert all("{c}" in t for t in templates)
    assert templates[0] == "a bad photo of a {c}."
    with pytest.raises(ConfigError, match="must each contain"):
        load_templates(["a photo of a thing."])


def test_text_embeddings_are_unit_mean_of_templates_and_cached(tiny_model, monkeypatch):
    encoder = TextEncoder(tiny_model, ["a photo of a {c}.", "a {c}."])
    emb = encoder.embed(["cat", "dog"])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=-1), torch.ones(2))
    tokens = tiny_model.tokenizer(["a photo of a cat.", "a cat."])
    with torch.no_grad():
        feats = tiny_model.clip.encode_text(tokens)
    feats = feats / feats.norm(dim=-1, keepdim=True)
    expected = feats.mean(0) / feats.mean(0).norm()
    assert torch.allclose(emb[0], expected, atol=1e-5)
    calls = []
    monkeypatch.setattr(encoder, "_encode", lambda name: calls.append(name) or torch.zeros(32))
    encoder.embed(["dog", "cat", "bird"])
    assert calls == ["bird"]


def test_encode_text_on_the_causal_prefix_equals_open_clip(tiny_model):
    from gclip.text import _causal_prefix, encode_text

    clip = tiny_model.clip
    tokens = tiny_model.tokenizer(["a photo of a cat.", "a rendering of the big traffic light in a street.", "dog"])
    keep = _causal_prefix(clip, tokens)
    assert keep == int(tokens.argmax(dim=-1).max()) + 1 < tokens.shape[1]
    with torch.no_grad():
        expected = clip.encode_text(tokens)
        ours = encode_text(clip, tokens)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)


def test_encode_text_falls_back_without_a_causal_mask(tiny_model):
    from conftest import make_tiny
    from gclip.text import _causal_prefix, encode_text

    clip = make_tiny()
    tokens = tiny_model.tokenizer(["a cat."])
    assert _causal_prefix(clip, tokens) is not None
    clip.attn_mask = torch.zeros(77, 77)  # a bidirectional text tower: every position matters
    assert _causal_prefix(clip, tokens) is None
    with torch.no_grad():
        assert torch.equal(encode_text(clip, tokens), clip.encode_text(tokens))


CACHE_TEMPLATES = ["a photo of a {c}.", "a {c}."]


def test_disk_cache_is_reused_and_keyed(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GCLIP_NO_CACHE", raising=False)
    first = TextEncoder(tiny_model, CACHE_TEMPLATES)
    fresh = first.embed(["cat", "dog"])
    files = sorted((tmp_path / "text").rglob("*.npy"))
    assert len(files) == 2 and not list((tmp_path / "text").rglob("*.tmp"))
    second = TextEncoder(tiny_model, CACHE_TEMPLATES)
    assert torch.equal(second.embed(["dog", "cat"]), fresh.flip(0)) and second.disk_hits == 2
    other = TextEncoder(tiny_model, CACHE_TEMPLATES[:1])  # other templates: another key, computed again
    assert not torch.equal(other.embed(["cat"])[0], fresh[0]) and other.disk_hits == 0
    files[0].write_bytes(b"broken")  # an unreadable entry is recomputed and rewritten
    third = TextEncoder(tiny_model, CACHE_TEMPLATES)
    assert torch.allclose(third.embed(["cat", "dog"]), fresh)


def test_disk_cache_can_be_turned_off(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GCLIP_NO_CACHE", "1")
    assert cache_dir() is None
    TextEncoder(tiny_model, CACHE_TEMPLATES).embed(["cat"])
    assert not (tmp_path / "text").exists()


def test_many_new_classes_show_progress_with_the_cached_count(tiny_model, tmp_path, monkeypatch):
    """Issue 24 fault 4: embedding many names is no longer silent; the bar says how many the disk cache holds."""
    import tqdm

    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GCLIP_NO_CACHE", raising=False)
    names = [f"thing {i}" for i in range(5)]
    TextEncoder(tiny_model, CACHE_TEMPLATES).embed(names[:2])  # two of them on disk already
    bars = []

    class Recorder:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.updates = total, desc, 0
            bars.append(self)

        def update(self, n=1):
            self.updates += n

        def close(self):
            pass

    monkeypatch.setattr(tqdm, "tqdm", Recorder)
    encoder = TextEncoder(tiny_model, CACHE_TEMPLATES)
    encoder.progress_min = 3
    embedded = encoder.embed(names + names[:1])
    assert [(b.total, b.desc, b.updates) for b in bars] == [
        (5, f"text: 5 classes x {len(CACHE_TEMPLATES)} templates (2 cached)", 5)
    ]
    assert encoder.disk_hits == 2 and embedded.shape[0] == 6
    torch.testing.assert_close(embedded[:5], TextEncoder(tiny_model, CACHE_TEMPLATES).embed(names))
    encoder.embed(names[:4])  # nothing new: no bar
    assert len(bars) == 1

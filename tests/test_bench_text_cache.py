"""Text embeddings are cached on disk per (model, templates, name), and the cache can be moved or turned off."""

from __future__ import annotations

import torch

from gclip.text import TextEncoder, cache_dir

TEMPLATES = ["a photo of a {c}.", "a {c}."]


def test_disk_cache_is_reused_and_keyed(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("GCLIP_NO_CACHE", raising=False)
    first = TextEncoder(tiny_model, TEMPLATES)
    fresh = first.embed(["cat", "dog"])
    files = sorted((tmp_path / "text").rglob("*.npy"))
    assert len(files) == 2 and not list((tmp_path / "text").rglob("*.tmp"))
    second = TextEncoder(tiny_model, TEMPLATES)
    assert torch.equal(second.embed(["dog", "cat"]), fresh.flip(0)) and second.disk_hits == 2
    other = TextEncoder(tiny_model, TEMPLATES[:1])  # other templates: another key, computed again
    assert not torch.equal(other.embed(["cat"])[0], fresh[0]) and other.disk_hits == 0
    files[0].write_bytes(b"broken")  # an unreadable entry is recomputed and rewritten
    third = TextEncoder(tiny_model, TEMPLATES)
    assert torch.allclose(third.embed(["cat", "dog"]), fresh)


def test_disk_cache_can_be_turned_off(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("GCLIP_NO_CACHE", "1")
    assert cache_dir() is None
    TextEncoder(tiny_model, TEMPLATES).embed(["cat"])
    assert not (tmp_path / "text").exists()

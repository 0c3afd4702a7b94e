"""The method interface of Engine v3: a few hooks, and pieces a method names (gclip.methods.pieces)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import gclip
from gclip.errors import ConfigError
from gclip.inference.forward import dense_features
from gclip.methods import (
    BlockChange,
    LabelRefinement,
    Method,
    SecondModelPass,
    TextSide,
    attend,
    get_method,
)
from gclip.methods.base import _NOT_HOOKS

HOOKS = {"blocks", "features", "logits", "window_multiple", "image_logits", "input_shape"}


def test_method_has_six_hooks_and_derives_the_rest_from_its_pieces():
    public = {n for n, v in vars(Method).items() if not n.startswith("_") and (callable(v) or isinstance(v, property))}
    derived = {n for n in public if n in _NOT_HOOKS} | {"whole_image", "cross_window"}
    assert public - derived == HOOKS
    pieces = {"second_model", "text_side", "label_refinement", "image_context"}
    assert all(getattr(Method, p) is None for p in pieces)


@pytest.mark.parametrize(
    ("hook", "replacement"),
    [("keep_blocks", "BlockChange(keep=True)"), ("text_queries", "text_side"), ("refine_labels", "label_refinement")],
)
def test_a_hook_from_before_engine_v3_is_a_one_line_error_naming_its_replacement(hook, replacement):
    with pytest.raises(ConfigError) as e:
        type("Old", (Method,), {"name": "old", "protocol": "clearclip", hook: lambda self, *a: None})
    assert replacement in str(e.value) and "\n" not in str(e.value)


def test_last_block_still_works_with_a_deprecation_notice(tiny_model):
    with pytest.warns(DeprecationWarning, match="last_block"):

        @dataclass
        class OldClear(Method):
            name = "test_old_clear"
            protocol = "clearclip"

            def last_block(self, vit, x, trace):
                qq = lambda q, k, v: attend(q, q, v)  # noqa: E731
                return vit.block(vit.depth - 1, x, attention=qq, residual=False, ffn=False)

    vit = gclip.Segmenter(tiny_model, method="clearclip", classes=["a"]).vit
    crops = torch.randn(2, 3, 32, 32)
    expected = dense_features(vit, get_method("clearclip"), crops)
    torch.testing.assert_close(dense_features(vit, OldClear(), crops), expected)


def test_the_window_flags_before_engine_v3_become_window_mode():
    with pytest.warns(DeprecationWarning, match="window_mode"):
        cls = type("Whole", (Method,), {"name": "whole", "protocol": "clearclip", "whole_image": True})
    assert cls.window_mode == "image" and cls().whole_image and not cls().cross_window


@dataclass
class Edited(Method):
    """Block changes on a tiny model: tokens entering block 1 read or replaced, block 0's input kept."""

    name = "test_edited"
    protocol = "clearclip"
    shift: float = 0.0
    seen: list = dataclasses.field(default_factory=list, repr=False, compare=False)

    def blocks(self, vit, trace):
        def before(x):
            self.seen.append(x.shape)
            return x + self.shift if self.shift else None

        return {0: BlockChange(keep=True), 1: BlockChange(before=before, keep=True)}


def test_block_changes_read_replace_and_keep_tokens(tiny_model):
    from gclip.inference.forward import encode, head

    vit = gclip.Segmenter(tiny_model, method="clip", classes=["a"]).vit
    crops = torch.randn(2, 3, 32, 32)
    plain = dense_features(vit, get_method("clip"), crops)
    read = Edited()
    torch.testing.assert_close(dense_features(vit, read, crops), plain)  # read only: nothing changes
    assert read.seen and read.seen[0][0] == 2
    shifted = Edited(shift=1.0)
    x, trace = encode(vit, shifted, crops)
    head(vit, shifted, (x, trace))  # block 1 is the tiny model's last: run in the features
    assert len(shifted.seen) == 1
    embedded, _ = vit.embed(crops)
    torch.testing.assert_close(trace.inputs[0], embedded)
    torch.testing.assert_close(trace.inputs[1], vit.block(0, embedded) + 1.0)  # kept after the replacement
    assert not torch.allclose(dense_features(vit, Edited(shift=1.0), crops), plain)


class Doubled(TextSide):
    def __call__(self, encoder, classes):
        return 2 * encoder.embed(classes.queries)


class AllZero(LabelRefinement):
    def __call__(self, labels, windows=()):
        return torch.zeros_like(labels)


class Coarse(SecondModelPass):
    def __call__(self, vit, trace):
        trace.extras["coarse"] = True

    def multiple(self, vit):
        return 3 * vit.patch_size


@dataclass
class WithPieces(Method):
    name = "test_with_pieces"
    protocol = "clearclip"
    text_side = Doubled()
    label_refinement = AllZero()
    second_model = Coarse()


def test_pieces_reach_the_engine(tiny_model, rgb_image):
    seg = gclip.Segmenter(tiny_model, method=WithPieces(), classes=["a", "b", "c"], crop=48, stride=24)
    plain = gclip.Segmenter(tiny_model, method="clip", classes=["a", "b", "c"], crop=48, stride=24)
    torch.testing.assert_close(seg.query_embeddings(), 2 * plain.query_embeddings())  # the text side's
    assert seg.method.window_multiple(seg.vit) == 3 * seg.vit.patch_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = seg.predict(rgb_image)
    assert not result.labels.any() and plain.predict(rgb_image).labels.any()
    from gclip.inference.reference import reference_labels

    assert np.array_equal(reference_labels(seg, rgb_image), result.labels)


@pytest.mark.parametrize("method", ["gclip", "gem", "itaclip", "cliptrase"])
def test_a_pass_leaves_no_reference_cycle(tiny_model, method):
    """Block changes are closures over the pass's trace: once the pass ends its trace (kept block inputs, crops) is
    freed at once, not by the cyclic garbage collector (a cycle that held them raised the bench's peak RSS)."""
    import gc
    import weakref

    from gclip.inference.forward import encode, head

    seg = gclip.Segmenter(tiny_model, method="clip", classes=["a", "b", "c"])
    vit, text = seg.vit, seg.query_embeddings()
    m = get_method(method, **({"dbscan_eps": 0.5} if method == "cliptrase" else {}))
    gc.collect()
    gc.disable()
    try:
        encoded = encode(vit, m, torch.randn(2, 3, 32, 32))
        trace = weakref.ref(encoded[1])
        head(vit, m, encoded, text)
        del encoded
        assert trace() is None
    finally:
        gc.enable()

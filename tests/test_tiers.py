"""The quick tier (``pytest -m quick``) keeps one representative method per mechanism of each per-method matrix; the
full suite keeps every method."""

from __future__ import annotations

import pytest

from conftest import NOT_QUICK, crop_methods, mechanisms, method_matrix, representative_methods
from gclip.methods import list_methods


@pytest.mark.parametrize("methods", [list_methods(), crop_methods()], ids=["all", "crop"])
def test_the_representatives_cover_every_mechanism_and_the_matrix_keeps_every_method(methods):
    chosen = representative_methods(methods)
    assert set().union(*(mechanisms(m) for m in chosen)) == set().union(*(mechanisms(m) for m in methods))
    assert "gclip" in chosen and len(chosen) < len(methods)
    assert any(not mechanisms(m) for m in chosen)  # a method that changes only its last block
    params = method_matrix(methods)
    names = [p if isinstance(p, str) else p.values[0] for p in params]
    assert names == methods  # the full suite runs every method
    assert {p.values[0] for p in params if not isinstance(p, str)} == set(methods) - set(chosen)
    assert all([m.name for m in p.marks] == ["matrix"] for p in params if not isinstance(p, str))


def test_the_quick_marker_is_on_the_tests_outside_every_other_tier(request):
    assert request.node.get_closest_marker("quick") is not None
    assert {"matrix", "heavy"} <= set(NOT_QUICK)

"""The published numbers are data (src/gclip/data/published.toml): every row names a registered method and known
datasets, its numbers are mIoU percentages, its means are computed, and the docs' tables and method pages show it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gclip.docs import generate
from gclip.errors import ConfigError
from gclip.evaluation import DATASETS, PAPER_ORDER, SEED_SETS, published
from gclip.evaluation.published import parse
from gclip.methods import list_methods

ROOT = Path(__file__).parent.parent


# The means the hand-written table of docs/evaluation.md printed before it was generated: the computed ones match.
PRINTED_MEANS = {
    ("gclip", ""): 39.0,
    ("clearclip", ""): 37.5,
    ("sclip", ""): 37.1,
    ("naclip", "no PAMR"): 38.2,
    ("maskclip", ""): 28.0,
    ("clip", ""): 12.6,
    ("resclip", "on NACLIP"): 40.3,
    ("resclip", "on ClearCLIP"): 40.0,
    ("resclip", "on SCLIP"): 39.3,
}


def test_every_row_names_a_registered_method_and_known_datasets():
    rows = published()
    assert rows
    for row in rows:
        assert row.method in list_methods(), f"published.toml names {row.method!r}, which is not registered"
        assert row.label and row.source, row
        assert set(row.miou) <= set(DATASETS), row
        assert all(0 <= v <= 100 for v in row.miou.values()), row
        order = [*PAPER_ORDER, *(d for d in DATASETS if d not in PAPER_ORDER)]
        assert list(row.miou) == [d for d in order if d in row.miou], "kept in paper order, then the other sets"
        assert row.miou or row.note, f"{row.method}: a row with no numbers says why in its note"
    assert published("resclip") == tuple(r for r in rows if r.method == "resclip") and len(published("resclip")) == 3
    assert published("no-such-method") == ()


def test_means_are_computed_and_match_the_printed_ones():
    means = {(r.method, r.variant): r.mean() for r in published() if r.mean() is not None}
    assert {k: means[k] for k in PRINTED_MEANS} == PRINTED_MEANS
    corrclip = published("corrclip")[0]
    assert corrclip.mean(PAPER_ORDER) == 51.0  # its README's mean over the eight sets
    cliptrase = published("cliptrase")[0]
    assert "cityscapes" not in cliptrase.miou and cliptrase.mean() is None  # not all five: no mean
    assert parse('[[entry]]\nmethod="x"\nlabel="l"\nsource="s"\nmiou={voc20=0.05,voc21=0.1}\n')[0].mean(
        ["voc20", "voc21"]
    ) == pytest.approx(0.1)  # rounded half up, as the papers print


@pytest.mark.parametrize(
    "entry, message",
    [
        ("miou = { voc = 50.0 }", "unknown dataset 'voc'"),
        ("miou = { voc20 = 181.3 }", "not an mIoU in 0..100"),
        ('miou = { voc20 = "81.3" }', "not an mIoU in 0..100"),
        ("mean = 39.0", "unknown key 'mean'"),
    ],
)
def test_bad_rows_are_refused(entry, message):
    with pytest.raises(ConfigError, match=message):
        parse(f'[[entry]]\nmethod = "gclip"\nlabel = "paper"\nsource = "s"\n{entry}\n')
    with pytest.raises(ConfigError, match="no 'source'"):
        parse('[[entry]]\nmethod = "gclip"\nlabel = "paper"\n')


def test_the_tables_and_method_pages_show_every_row():
    pages = generate(ROOT)
    main, other = pages["docs/generated/published.md"], pages["docs/generated/published-other.md"]
    for row in published():
        title_cells = [line for line in (main + other).splitlines() if f"(methods/{row.method}.md#" in line]
        shown = " ".join(title_cells)
        assert all(str(v) in shown for v in row.miou.values()), row
        assert not row.note or row.note in other, row
        page = pages[f"docs/methods/{row.method}.md"]
        assert all(str(v) in page for v in row.miou.values()) and (not row.note or row.note in page), row
    for line in main.splitlines()[4:]:
        assert line.count(" | ") == len(SEED_SETS) + 2 and line.endswith("| not yet measured |"), line
    for name in list_methods():
        page = pages[f"docs/methods/{name}.md"]
        assert "## Published numbers" in page and page.index("## Protocol") < page.index("## Published numbers")
        if not published(name):
            assert "No published numbers are recorded" in page

"""The published numbers are data (src/gclip/data/published.toml): every row names a registered method and known
datasets, its numbers are mIoU percentages, its means are computed, and the docs' tables and method pages show it."""

from __future__ import annotations

from pathlib import Path

import pytest

from gclip.docs import PUBLISHED_FAMILIES, generate, published_groups
from gclip.errors import ConfigError
from gclip.evaluation import DATASETS, PAPER_ORDER, SEED_SETS, published
from gclip.evaluation.layouts import TABLE_ORDER
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

# The means of the eight classic sets that the sources print next to the rows (read from the same tables): the computed
# ones match, which checks the transcription of each row.
PRINTED_MEANS_8 = {
    ("glaclip", ""): 44.0,
    ("glaclip", 'dataset-specific u, w (Table 1\'s "Best")'): 44.3,
    ("glaclip", "in ProxyCLIP's setting (448 px resize, 336 px windows, stride 112)"): 42.9,
    ("cass", ""): 44.4,
    ("trident", ""): 45.8,
    ("trident", "OpenCLIP ViT-H/14"): 48.6,
    ("proxyclip", ""): 42.3,
    ("proxyclip", "OpenCLIP ViT-H/14"): 44.4,  # its abstract's 44.4
    ("lposs", "as PEARL's table names it (LPOSS*)"): 41.3,
    ("dihclip", ""): 43.6,
    ("pearl", ""): 43.2,
}

# SegEarth-OV's Table 1 "Average" column (its eight multi-class remote-sensing sets) for the baselines it re-ran.
PRINTED_REMOTE_MEANS = {"clip": 11.4, "maskclip": 27.2, "sclip": 31.1, "gem": 32.3, "clearclip": 33.4}


def test_every_row_names_a_registered_method_and_known_datasets():
    rows = published()
    assert rows
    for row in rows:
        assert row.method in list_methods(), f"published.toml names {row.method!r}, which is not registered"
        assert row.label and row.source, row
        assert set(row.miou) <= set(DATASETS), row
        assert all(0 <= v <= 100 for v in row.miou.values()), row
        assert list(row.miou) == [d for d in TABLE_ORDER if d in row.miou], "kept in table order"
        assert row.miou or row.note, f"{row.method}: a row with no numbers says why in its note"
    assert published("resclip") == tuple(r for r in rows if r.method == "resclip") and len(published("resclip")) == 3
    assert published("no-such-method") == ()


def test_means_are_computed_and_match_the_printed_ones():
    means = {(r.method, r.variant): r.mean() for r in published() if r.mean() is not None}
    assert {k: means[k] for k in PRINTED_MEANS} == PRINTED_MEANS
    corrclip = published("corrclip")[0]
    assert corrclip.mean(PAPER_ORDER) == 51.0  # its README's mean over the eight sets
    eight = {(r.method, r.variant or r.backbone): r.mean(PAPER_ORDER) for r in published()}
    assert {k: eight[k] for k in PRINTED_MEANS_8} == PRINTED_MEANS_8
    multi = [d for d in TABLE_ORDER if DATASETS[d].family == "remote" and DATASETS[d].num_classes > 2]
    remote = {r.method: r.mean(multi) for r in published() if r.variant == "remote sensing, SegEarth-OV's protocol"}
    assert remote == PRINTED_REMOTE_MEANS
    ten = [r for r in published("corrclip") if "ade847" in r.miou]  # CorrCLIPv2's README: the mean of its ten sets
    assert [r.mean(list(r.miou)) for r in ten] == [44.5, 47.8] and all(len(r.miou) == 10 for r in ten)
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
    families = {f: pages[f"docs/generated/published-{f}.md"] for f in PUBLISHED_FAMILIES}
    tables = main + other + "".join(families.values())
    for row in published():
        title_cells = [line for line in tables.splitlines() if f"(methods/{row.method}.md#" in line]
        shown = " ".join(title_cells)
        assert all(str(v) in shown for v in row.miou.values()), row
        assert not row.note or row.note in other or any(row.note in f for f in families.values()), row
        page = pages[f"docs/methods/{row.method}.md"]
        assert all(str(v) in page for v in row.miou.values()) and (not row.note or row.note in page), row
    for line in main.splitlines()[4:]:
        assert line.count(" | ") == len(SEED_SETS) + 2 and line.endswith("| not yet measured |"), line
    for name in list_methods():
        page = pages[f"docs/methods/{name}.md"]
        assert "## Published numbers" in page and page.index("## Protocol") < page.index("## Published numbers")
        if not published(name):
            assert "No published numbers are recorded" in page


def test_each_family_has_its_own_table_and_the_classic_tables_keep_to_the_classic_sets():
    """Numbers on the large-vocabulary, remote-sensing and MESS sets are in their family's table, one column per set
    that a row gives (the single-class remote-sensing sets, where the sources report the foreground class's IoU, in a
    table of their own), not in the Evaluation page's two tables of the classic sets."""
    pages = generate(ROOT)
    classic = pages["docs/generated/published.md"] + pages["docs/generated/published-other.md"]
    assert not any(DATASETS[d].title in classic for d in TABLE_ORDER if DATASETS[d].family != "classic")
    groups = [g for f in PUBLISHED_FAMILIES for g in published_groups(f)]
    assert sorted(d for _, sets, _ in groups for d in sets) == sorted(d for d in DATASETS if d not in PAPER_ORDER)
    single = [sets for title, sets, _ in groups if "single-class" in title]
    assert single and all(DATASETS[d].num_classes == 2 for d in single[0])
    for family in PUBLISHED_FAMILIES:
        text = pages[f"docs/generated/published-{family}.md"]
        for title, sets, metric in published_groups(family):
            rows = [r for r in published() if any(d in r.miou for d in sets)]
            if not rows:
                assert f"**{title}.** No published numbers are recorded" in text
                continue
            section = text[text.index(f"**{title}** ({metric}") :]
            header = next(line for line in section.splitlines() if line.startswith("| method |"))
            columns = [d for d in sets if any(d in r.miou for r in rows)]
            assert header == "| method | " + " | ".join(DATASETS[d].title for d in columns) + " | mean | gclip |"
            for r in rows:
                line = next(x for x in section.splitlines() if f"{r.title('')}](methods/{r.method}.md#" in x)
                cells = [c.strip() for c in line.strip("|").split("|")][1:]
                expected = [str(r.miou[d]) if d in r.miou else "—" for d in columns]
                mean = r.mean(columns)
                assert cells == [*expected, "—" if mean is None else f"{mean:.1f}", "not yet measured"], line
    assert "OpenEarthMap" in pages["docs/methods/clearclip.md"]  # a method page shows its rows of every family
    assert "ADE-847" in pages["docs/methods/corrclip.md"] and "ADE-847" not in pages["docs/methods/clearclip.md"]

"""``gclip data check``: each fault of a prepared layout is found, named in one line per set, and refused by eval."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import gclip
from gclip.evaluation import DatasetError, get_dataset, list_samples
from gclip.evaluation.check import check_dataset, check_samples
from test_datasets import LAYOUT_OF, write_layout


@pytest.mark.parametrize("name", list(LAYOUT_OF))  # the other families: tests/test_more_datasets.py
def test_a_clean_layout_passes_with_the_count_noted(tmp_path, name):
    write_layout(tmp_path, LAYOUT_OF[name], n=3)
    spec = get_dataset(name)
    assert check_samples(spec, list_samples(spec, tmp_path)).verdict() == f"{name}: OK (3 images checked)"
    result = check_dataset(spec, tmp_path)
    assert not result.broken
    assert result.verdict().startswith(f"{name}: OK with notices (3 images checked): 3 images where the full")


@pytest.fixture
def broken_voc(tmp_path):
    """A VOC21 layout of 6 pairs with one fault each in pairs 2..5."""
    write_layout(tmp_path, "voc", n=6)
    samples = list_samples(get_dataset("voc21"), tmp_path)
    samples[1].label.unlink()  # a missing label
    with Image.open(samples[2].label) as img:
        img.resize((img.width + 5, img.height)).save(samples[2].label)  # a label of another size
    with Image.open(samples[3].label) as img:
        array = np.asarray(img).copy()
        palette = img.getpalette()
    array[2:4, 2:4] = 40  # not a VOC class (0..20, 255)
    out = Image.fromarray(array, mode="P")
    out.putpalette(palette)
    out.save(samples[3].label)
    with Image.open(samples[4].image) as img:
        img.convert("L").save(samples[4].image)  # a grayscale photo in an RGB set
    return tmp_path, [s.name for s in samples]


def test_every_fault_is_found_and_named(broken_voc):
    root, names = broken_voc
    result = check_dataset(get_dataset("voc21"), root)
    assert result.broken
    assert [n for n, _ in result.missing] == [names[1]]
    assert [n for n, _ in result.sizes] == [names[2]] and "label " in result.sizes[0][1]
    assert result.values == {40: 4} and result.value_files == [names[3]]
    assert result.modes == [(names[4], "L")]
    line = result.verdict()
    assert "\n" not in line and line.startswith("voc21: BROKEN (6 images checked): 1 labels missing or unreadable")
    for part in ("not the size of their image", "outside 0..20 and 255: 40 (4 px)", "1 images not RGB",
                 "6 images where the full validation split has 1,449"):  # fmt: skip
        assert part in line


def test_the_cli_prints_one_line_per_set_and_fails_on_a_broken_one(broken_voc, tmp_path_factory):
    root, _ = broken_voc
    cmd = [sys.executable, "-m", "gclip", "data", "check", "voc21,ade20k", "--data-root", str(root)]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    assert run.returncode == 1, run.stderr
    assert [line.split(":")[0] for line in lines] == ["voc21", "ade20k"]
    assert "BROKEN" in lines[0] and lines[1].startswith("ade20k: MISSING") and "Traceback" not in run.stderr
    clean = tmp_path_factory.mktemp("clean")
    write_layout(clean, "ade", n=2)
    cmd = [sys.executable, "-m", "gclip", "data", "check", "ade20k", "--data-root", str(clean), "--limit", "2"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert (run.returncode, run.stdout.strip()) == (0, "ade20k: OK (2 images checked)")


def test_eval_refuses_a_broken_layout_with_that_line_before_loading_a_model(broken_voc, tiny_model):
    root, _ = broken_voc
    with pytest.raises(DatasetError) as e:
        gclip.evaluate("clip", "voc21", root, "no-such-model")  # the model would fail to load: it is not reached
    assert str(e.value).startswith("voc21: BROKEN (6 images checked)") and "gclip data check" in str(e.value)
    said = []
    results = gclip.evaluate("clip", "voc21", root, tiny_model, skip_bad=True, say=lambda *a, **k: said.append(a[0]))
    assert results[0].images == 4 and any("voc21: BROKEN" in s for s in said)  # missing, mismatched: skipped


def test_the_real_sample_is_clean(sample_data):
    for name in ("voc21", "voc20", "ade20k", "coco_stuff"):
        result = check_dataset(get_dataset(name), sample_data)
        assert not result.broken and not result.modes, result.verdict()

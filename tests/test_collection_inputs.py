"""Finding inputs: folders, globs, list files, webdataset shards, key collisions and shards."""

from __future__ import annotations

import io
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from collection_helpers import synthetic_image, write_images
from gclip.engines import collect_inputs, parse_shard, read_input, shard_items
from gclip.errors import ConfigError, ImageError


def test_folder_is_recursive_and_keeps_only_images(tmp_path):
    write_images(tmp_path / "in", ["a/x.jpg", "a/deep/y.png", "z.jpg"])
    (tmp_path / "in" / "notes.txt").write_text("hello")
    (tmp_path / "in" / ".hidden.jpg").write_bytes(b"")
    items = collect_inputs([tmp_path / "in"])
    assert [i.key for i in items] == ["a/deep/y", "a/x", "z"]


def test_same_name_in_two_folders_never_collides(tmp_path):
    write_images(tmp_path, ["a/x.jpg", "b/x.jpg", "a/y.jpg", "a/y.png"])
    folders = collect_inputs([tmp_path / "a", tmp_path / "b"])
    assert [i.key for i in folders] == ["a/x", "a/y.jpg", "a/y.png", "b/x"]
    files = collect_inputs([tmp_path / "a" / "x.jpg", tmp_path / "b" / "x.jpg"])
    assert [i.key for i in files] == ["a/x", "b/x"]
    assert [i.key for i in collect_inputs([tmp_path / "a" / "x.jpg"])] == ["x"]


def test_globs_and_list_files(tmp_path, monkeypatch):
    write_images(tmp_path, ["p/a.jpg", "p/b.jpg", "p/q/c.png"])
    monkeypatch.chdir(tmp_path)
    assert [i.key for i in collect_inputs(["p/**/*.png"])] == ["c"]
    assert len(collect_inputs([str(tmp_path / "p" / "*.jpg")])) == 2
    listing = tmp_path / "list.txt"
    listing.write_text("# photos\np/a.jpg\n\np/q/c.png\n")
    assert [i.key for i in collect_inputs(from_list=listing)] == ["a", "q/c"]
    with pytest.raises(ConfigError, match="matches no files"):
        collect_inputs(["nothing/*.jpg"])
    with pytest.raises(ConfigError, match="no input images"):
        collect_inputs([])


def _tar(path, samples: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in samples.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def _encoded(seed: int, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(synthetic_image(seed)).save(buf, format=fmt)
    return buf.getvalue()


def test_webdataset_shards(tmp_path):
    _tar(
        tmp_path / "shard-000.tar",
        {
            "s1.jpg": _encoded(1, "JPEG"),
            "s1.cls": b"3",
            "dir/s2.png": _encoded(2),
            "dir/s2.json": b"{}",
            "s3.txt": b"no image in this sample",
            "s4.jpg": b"broken",
        },
    )
    items = collect_inputs(wds=[str(tmp_path / "shard-*.tar")])
    assert [i.key for i in items] == ["shard-000/dir/s2", "shard-000/s1", "shard-000/s4"]
    s2 = read_input(items[0])
    assert np.array_equal(s2, synthetic_image(2))
    with pytest.raises(ImageError, match="s4.jpg: cannot decode"):
        read_input(items[2])
    with pytest.raises(ConfigError, match="cannot read the tar shard"):
        (tmp_path / "bad.tar").write_bytes(b"x" * 10)
        collect_inputs(wds=[tmp_path / "bad.tar"])


@pytest.mark.parametrize(
    "spec,expected", [("0/1", (0, 1)), ("2/4", (2, 4)), ("4/4", ConfigError), ("x", ConfigError), ("-1/2", ConfigError)]
)
def test_parse_shard(spec, expected):
    if isinstance(expected, type):
        with pytest.raises(expected):
            parse_shard(spec)
    else:
        assert parse_shard(spec) == expected


def test_shards_partition_the_sorted_inputs(tmp_path):
    write_images(tmp_path, [f"{n:02d}.png" for n in range(11)], size=(4, 4))
    items = collect_inputs([tmp_path])
    parts = [shard_items(list(reversed(items)), i, 3) for i in range(3)]
    keys = [i.key for part in parts for i in part]
    assert sorted(keys) == [i.key for i in items] and len(set(keys)) == 11
    assert [len(p) for p in parts] == [4, 4, 3]
    assert os.path.basename(parts[1][0].path) == "01.png"

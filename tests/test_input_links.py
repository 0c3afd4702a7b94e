"""Links between folders of the inputs: each real folder is read once, a loop ends, skipped links are named."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from collection_helpers import CLI_SETTINGS, write_images
from conftest import HERE, TINY

CLI = """
import sys
import open_clip
open_clip.add_model_config(sys.argv[1])
from gclip.cli import main
sys.exit(main(sys.argv[2:]))
"""


def _tree(root):
    """``a.png``, ``sub/b.png``, two links back to the top (a loop that branches: 2**depth paths when followed)
    and a second link to ``sub``; ``outside`` is reached only through a link and is read once."""
    write_images(root / "in", ["a.png", "sub/b.png"])
    write_images(root, ["outside/c.png"])
    os.symlink("..", root / "in" / "sub" / "up")
    os.symlink(".", root / "in" / "here")
    os.symlink("sub", root / "in" / "again")
    os.symlink("../outside", root / "in" / "ext")
    os.symlink("../ext", root / "in" / "sub" / "ext2")


def test_a_link_loop_ends_and_segments_each_image_once(tmp_path, tiny_checkpoint):
    _tree(tmp_path)
    out = tmp_path / "out"
    args = ["segment", str(tmp_path / "in"), "--out", str(out), "--classes", "cat,dog", "--model", TINY]
    args += ["--pretrained", str(tiny_checkpoint), "--no-quick-gelu"]  # the tiny file would get the activation notice
    args += ["--format", "png,manifest", "--workers", "0", "--no-progress"]
    run = subprocess.run(
        [sys.executable, "-c", CLI, str(HERE / "configs"), *args, *CLI_SETTINGS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    keys = [json.loads(line)["key"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert keys == ["a", "ext/c", "sub/b"]
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png")) == ["a.png", "ext/c.png", "sub/b.png"]
    warnings = [line for line in run.stderr.splitlines() if "warning" in line]
    assert len(warnings) == 1, run.stderr
    for link in ("again", "here", os.path.join("sub", "up"), os.path.join("sub", "ext2")):
        assert os.path.join(str(tmp_path / "in"), link) in warnings[0]
    assert "Traceback" not in run.stderr


def test_collect_inputs_names_the_skipped_links(tmp_path, recwarn):
    from gclip.engines import collect_inputs

    _tree(tmp_path)
    os.symlink("missing", tmp_path / "in" / "broken")  # a dangling link is no folder: not reported
    items = collect_inputs([tmp_path / "in"])
    assert [i.key for i in items] == ["a", "ext/c", "sub/b"]
    assert [i.path for i in items][1] == str(tmp_path / "in" / "ext" / "c.png")
    messages = [str(w.message) for w in recwarn]
    assert len(messages) == 1 and "4 folder links" in messages[0] and "broken" not in messages[0]

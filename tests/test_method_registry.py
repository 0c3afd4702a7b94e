"""A method is one file: a new module in gclip/methods is picked up by the registry, the CLI, the evaluation and
the registry-parametrised tests with no other edit; registration refuses a taken name."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

import gclip.methods
from gclip.cli import main
from gclip.errors import ConfigError
from gclip.methods import base, discover, get_method, list_methods, method_class, register
from gclip.methods.clearclip import ClearClip
from test_eval import run_eval, voc_root  # noqa: F401 - the fixture

HERE = Path(__file__).parent
NAME = "dropin_clearclip"


@pytest.fixture
def dropped_method():
    """A renamed copy of clearclip.py written into the package, removed again afterwards."""
    source = Path(gclip.methods.__file__).parent / "clearclip.py"
    target = source.with_name(f"{NAME}.py")
    text = (
        source.read_text()
        .replace('name = "clearclip"', f'name = "{NAME}"')
        .replace("class ClearClip(", "class Dropin(")
    )
    assert f'name = "{NAME}"' in text and "class Dropin(" in text
    target.write_text(text)
    try:
        yield target
    finally:
        target.unlink()
        base._REGISTRY.pop(NAME, None)  # the test's own cleanup of the registry it grew
        sys.modules.pop(f"gclip.methods.{NAME}", None)


def test_a_new_method_file_is_picked_up_with_no_other_edit(dropped_method, tiny_checkpoint, voc_root, capsys):  # noqa: F811
    assert NAME not in list_methods()
    assert discover() == [NAME]  # what `import gclip.methods` does in a fresh process
    assert method_class(NAME).protocol == "clearclip" and get_method(NAME).attention == "qq"

    assert main(["models"]) == 0
    assert re.search(rf"^  {NAME} +softmax\(q qᵀ s\)", capsys.readouterr().out, re.M)

    code = run_eval(tiny_checkpoint, voc_root, "--dataset", "voc20", "--method", f"clearclip,{NAME}", "--limit", "2")
    assert code == 0
    printed = capsys.readouterr().out
    ours = re.search(rf"{NAME} on voc20: mIoU (\S+)", printed)
    theirs = re.search(r"clearclip on voc20: mIoU (\S+)", printed)
    assert ours and theirs and ours.group(1) == theirs.group(1)  # the same computation under another name

    from gclip.evaluation import expand_methods

    assert NAME in expand_methods("all")

    # the registry-parametrised tests, collected afresh in another process, run the new method too
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(HERE / "test_methods.py"), "-k", NAME],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=HERE.parent,
    )
    assert proc.returncode == 0, proc.stdout[-2000:]
    ran = re.findall(rf"test_methods.py::(\w+)\[{NAME}\] PASSED", proc.stdout)
    assert len(ran) >= 3 and not re.search(r"\d+ (failed|skipped)", proc.stdout), proc.stdout[-2000:]


def test_register_refuses_a_taken_name():
    class Impostor(ClearClip):
        name = "clearclip"

    with pytest.raises(ConfigError, match="method name 'clearclip' is taken by gclip.methods.clearclip.ClearClip"):
        register(Impostor)
    assert method_class("clearclip") is ClearClip


def test_register_needs_a_name_and_a_protocol():
    class Nameless(ClearClip):
        name = ""

    class NoProtocol(ClearClip):
        name = "no_protocol"
        protocol = ""

    for cls in (Nameless, NoProtocol):
        with pytest.raises(ConfigError, match="needs a name and a protocol"):
            register(cls)
    assert "no_protocol" not in list_methods()


@pytest.mark.parametrize(
    "method, options, message",
    [
        ("clearclip", {"attention": "kk"}, "clearclip attention must be one of 'qq', 'qk', got 'kk'"),
        ("gclip", {"fusion": "max"}, "gclip fusion must be one of 'mean', 'per_head', got 'max'"),
        ("gclip", {"emerging_blocks": "automatic"}, "gclip emerging_blocks must be one of 'auto'"),
        ("sfp", {"pm": "l2"}, "sfp pm must be one of 'SOM', 'L2', 'LOF'"),
        ("resclip", {"base": "maskclip"}, "resclip base must be one of"),
        ("gem", {"pos_embed": "bilinear"}, "gem pos_embed must be one of"),
    ],
)
def test_options_are_checked_when_the_method_is_built(method, options, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        get_method(method, **options)


def test_valid_literal_options_and_other_types_pass():
    assert get_method("gclip", emerging_blocks="auto", cs_blocks=[5], fusion="per_head").fusion == "per_head"
    assert get_method("gclip", emerging_blocks=[3, 4]).emerging_blocks == [3, 4]

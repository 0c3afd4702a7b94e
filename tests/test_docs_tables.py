"""The tables the code knows are generated from it: the README's methods table is `gclip models --markdown`, and the
example of docs/adding-a-method.md is a working method."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

from gclip.cli.models import methods_markdown
from gclip.methods import list_methods

ROOT = Path(__file__).parent.parent
README = ROOT / "README.md"
ADDING_A_METHOD = ROOT / "docs" / "adding-a-method.md"


def test_readme_methods_table_is_the_generated_one():
    found = re.search(r"<!-- methods-table:[^\n]*-->\n(.*?)\n<!-- /methods-table -->", README.read_text(), re.S)
    assert found, "README.md has no methods-table block"
    assert found.group(1) == methods_markdown(), "run: gclip models --markdown, and paste it into README.md"


def test_every_method_has_its_row_and_protocol():
    table = methods_markdown()
    for name in list_methods():
        row = next(line for line in table.splitlines() if line.startswith(f"| `{name}` |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 6 and all(cells[:5]), row


def test_the_docs_example_method_is_a_working_method(tiny_model, rgb_image):
    """The example of docs/adding-a-method.md, run as written: it registers, segments, and computes key-key
    attention (checked against the attention written out with explicit matrices)."""
    import torch

    import gclip
    from gclip.inference.forward import dense_features
    from gclip.methods import base, get_method

    code = re.search(r"<!-- adding-a-method:[^\n]*-->\n```python\n(.*?)```", ADDING_A_METHOD.read_text(), re.S)
    assert code, "docs/adding-a-method.md has no adding-a-method example"
    module = types.ModuleType("docs_example")  # as if the example were a file of its own
    sys.modules[module.__name__] = module
    try:
        exec(compile(code.group(1), str(ADDING_A_METHOD), "exec"), module.__dict__)
        assert "keykey" in list_methods()
        options = {"scale": 2.0}
        seg = gclip.Segmenter(
            tiny_model, method="keykey", method_options=options, classes=["a", "b"], crop=32, stride=16
        )
        assert seg.predict(rgb_image).labels.shape == rgb_image.shape[:2]

        vit, crops = seg.vit, torch.randn(2, 3, 32, 32)
        x, _ = vit.embed(crops)
        for i in range(vit.depth - 1):
            x = vit.block(i, x)
        _, k, v = vit.qkv(vit.depth - 1, x)
        probs = torch.softmax(2.0 * k @ k.transpose(-1, -2) * k.shape[-1] ** -0.5, dim=-1)
        out = vit.project(vit.patches(vit.out_proj(vit.depth - 1, probs @ v)))
        expected = out.reshape(2, *dense_features(vit, seg.method, crops).shape[1:3], -1)
        torch.testing.assert_close(
            dense_features(vit, get_method("keykey", scale=2.0), crops), expected, atol=1e-5, rtol=0
        )
    finally:
        base._REGISTRY.pop("keykey", None)  # the example's registration ends with the test
        sys.modules.pop(module.__name__, None)

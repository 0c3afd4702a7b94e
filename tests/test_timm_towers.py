"""open_clip's timm towers through the backbone adapter (:mod:`gclip.backbones.timm_clip`, issue 20): SigLIP 2 (timm
ViT, no CLS token, a MAP head), PE-Core (timm Eva: RoPE, a MAP head) and EVA-02 (timm Eva: RoPE, separate q/k/v,
SwiGLU with a sub-norm), with random weights (``open_clip.create_model(name, pretrained=None)`` filled by
:func:`gclip.testing.random_state_dict`, so that every norm is away from its init).

The walk is checked against the towers themselves: ``clip.encode_image`` at the native size, timm's own block
outputs, timm's attention with its RoPE, timm's ``dynamic_img_size`` forward at another size, the MAP head read as
TextRegion reads it, Channel Suppression's weight replaced in a copy of the block. ``PE-Core-L-14-336`` runs only
with ``GCLIP_SLOW=1``.
"""

from __future__ import annotations

import copy
import os
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
import torch.nn.functional as F

from gclip.backbones import TimmClipEva, TimmClipViT, backbone_for
from gclip.errors import ConfigError, WeightsError
from gclip.testing import random_state_dict

torch.set_grad_enabled(False)

SLOW = pytest.mark.skipif(not os.environ.get("GCLIP_SLOW"), reason="set GCLIP_SLOW=1 to run the large towers")
TOWERS = {
    "ViT-B-16-SigLIP2": TimmClipViT,
    "PE-Core-B-16": TimmClipEva,
    "EVA02-B-16": TimmClipEva,
    "PE-Core-L-14-336": TimmClipEva,
}
PARAMS = [
    pytest.param(name, marks=[pytest.mark.heavy] if "-L-" not in name else [pytest.mark.slow, SLOW]) for name in TOWERS
]
ROPE = [p for p in PARAMS if "SigLIP" not in p.values[0]]
MAP = [p for p in PARAMS if "EVA02" not in p.values[0]]


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


@pytest.fixture(scope="module", params=PARAMS)
def tower(request):
    """One tower at a time (module scope groups the tests by tower): the CLIP model without its text tower, the
    adapter, and one native-size image."""
    name = request.param
    torch.manual_seed(0)
    clip = open_clip.create_model(name, pretrained=None).eval()
    clip.text = None  # encode_image reads the image tower only; the text tower is most of the memory
    clip.visual.load_state_dict(random_state_dict(clip.visual, seed=0))
    vit = backbone_for(clip.visual)
    side = vit.native_grid[0] * vit.patch_size
    images = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 3, side, side))).float()
    yield SimpleNamespace(name=name, clip=clip, vit=vit, trunk=clip.visual.trunk, images=images)


def dynamic_trunk(tower):
    """The tower's trunk as timm builds it for any input size (``dynamic_img_size=True``), with the same weights."""
    import timm

    trunk = tower.trunk
    name = open_clip.get_model_config(tower.name)["vision_cfg"]["timm_model_name"]
    dyn = timm.create_model(name, dynamic_img_size=True, num_classes=trunk.num_classes, global_pool=trunk.global_pool)
    dyn.load_state_dict(trunk.state_dict())
    return dyn.eval()


def test_the_unmodified_walk_is_encode_image(tower):
    """The walk at the native size, its pooled embedding (``Backbone.pooled``) and its dense tokens, against
    ``clip.encode_image`` and timm's ``forward_features`` (fp32, 1e-5)."""
    vit = tower.vit
    assert type(vit) is TOWERS[tower.name] and vit.visual is tower.clip.visual
    x, grid = vit.embed(tower.images)
    assert grid == vit.native_grid and vit.patches(x).shape[1] == grid[0] * grid[1]
    for i in range(vit.depth):
        x = vit.block(i, x)
    torch.testing.assert_close(vit.pooled(x), tower.clip.encode_image(tower.images), rtol=0, atol=1e-5)
    torch.testing.assert_close(vit.final_norm(x), tower.trunk.forward_features(tower.images), rtol=0, atol=1e-5)
    assert vit.fingerprint() != "" and vit.module is tower.clip.visual


def test_each_block_taken_apart_is_timms_block(tower):
    """Every block of the walk taken apart (q/k/v with RoPE, the attention, out_proj, residual, FFN) against the
    output timm's own block gives in the tower's forward."""
    vit, trunk = tower.vit, tower.trunk
    outputs = []
    hooks = [b.register_forward_hook(lambda _m, _i, out: outputs.append(out)) for b in trunk.blocks]
    try:
        trunk.forward_features(tower.images)
    finally:
        for h in hooks:
            h.remove()
    x, _ = vit.embed(tower.images)
    for i in range(vit.depth):
        x = vit.block(i, x, attention=sdpa)
        torch.testing.assert_close(x, outputs[i], rtol=0, atol=1e-4, msg=f"block {i}")


@pytest.mark.parametrize("tower", ROPE, indirect=True)
def test_rope_rotates_q_and_k_as_timms_attention(tower):
    """q and k of :meth:`TimmEva.qkv` carry the tower's RoPE: the block's own attention from them is timm's
    attention module (with the rope its tower passes) at the native grid and, against a ``dynamic_img_size``
    trunk, at another; the CLS token and v are not rotated."""
    vit, trunk = tower.vit, tower.trunk
    x, _ = vit.embed(tower.images)
    last = vit.depth - 1
    blk = trunk.blocks[last]
    ours = vit.out_proj(last, sdpa(*vit.qkv(last, x)))
    torch.testing.assert_close(ours, blk.attn(blk.norm1(x), rope=trunk.rope.get_embed()), rtol=0, atol=1e-5)
    plain = copy.copy(vit)
    plain.rope = None
    q, k, v = vit.qkv(last, x)
    q0, k0, v0 = plain.qkv(last, x)
    p = vit.prefix_tokens
    assert torch.equal(q[:, :, :p], q0[:, :, :p]) and torch.equal(v, v0)
    assert not torch.allclose(q[:, :, p:], q0[:, :, p:], atol=1e-3) and not torch.allclose(k, k0, atol=1e-3)
    dyn = dynamic_trunk(tower)
    images = tower.images[..., : 5 * vit.patch_size, : 7 * vit.patch_size]
    x, grid = vit.embed(images)
    rope = dyn.rope.get_embed(shape=list(grid))
    assert grid == (5, 7) and vit.rotation(grid, x.device).shape == rope.shape
    theirs = dyn.blocks[0].attn(dyn.blocks[0].norm1(x), rope=rope)
    torch.testing.assert_close(vit.out_proj(0, sdpa(*vit.qkv(0, x))), theirs, rtol=0, atol=1e-5)


def test_another_grid_is_timms_dynamic_size_forward(tower):
    """At a non-native grid, the position embedding resampled by the tower's rule (whatever rule a method names)
    and the RoPE of that grid: the walk is timm's ``dynamic_img_size`` forward, pooled and dense."""
    vit = tower.vit
    dyn = dynamic_trunk(tower)
    images = torch.randn(1, 3, 6 * vit.patch_size, 9 * vit.patch_size)
    x, grid = vit.embed(images, "sclip")
    assert grid == (6, 9) and torch.equal(x, vit.embed(images, "antialias")[0])
    for i in range(vit.depth):
        x = vit.block(i, x)
    features = dyn.forward_features(images)
    torch.testing.assert_close(vit.final_norm(x), features, rtol=0, atol=1e-5)
    torch.testing.assert_close(vit.pooled(x), tower.clip.visual.head(dyn.forward_head(features)), rtol=0, atol=1e-5)


def test_channel_suppression_replaces_that_weight_only(tower):
    """The ``ffn_out_weight`` override is the block with its MLP's ``fc2.weight`` replaced (a copy of timm's block,
    called as its tower calls it), in the block as it is and taken apart; the tower itself is left unchanged."""
    vit = tower.vit
    x, grid = vit.embed(tower.images)
    last = vit.depth - 1
    weight = vit.ffn_out_weight(last)
    assert weight is tower.trunk.blocks[last].mlp.fc2.weight and vit.ffn_module(last) is tower.trunk.blocks[last].mlp
    changed = weight.clone()
    changed[int(weight.norm(dim=1).argmax())] = 0
    block = copy.deepcopy(tower.trunk.blocks[last])
    block.mlp.fc2.weight.copy_(changed)
    rope = getattr(vit, "rotation", lambda *a: None)(grid, x.device)
    expected = block(x, rope=rope) if rope is not None else block(x)
    same = vit.block(last, x, overrides={"ffn_out_weight": changed})
    torch.testing.assert_close(same, expected, rtol=0, atol=1e-5)
    apart = vit.block(last, x, attention=sdpa, overrides={"ffn_out_weight": changed})
    torch.testing.assert_close(apart, expected, rtol=0, atol=1e-4)
    assert not torch.allclose(vit.block(last, x), expected, atol=1e-4)
    assert torch.equal(vit.ffn_out_weight(last), weight) and not torch.equal(weight, changed)


@pytest.mark.parametrize("tower", MAP, indirect=True)
def test_the_map_head_is_read_per_patch_as_textregion_reads_a_region(tower):
    """TextRegion's region feature: the MAP head's latent query over the region's tokens with one constant key (so
    uniform weights), the pool's output projection, no MLP, then ``fc_norm`` and the heads. It is the mean over the
    region of the adapter's per-patch projection."""
    vit, trunk = tower.vit, tower.trunk
    pool = trunk.attn_pool
    tokens = trunk.norm(torch.randn(1, 20, vit.width))
    region = torch.zeros(20, dtype=torch.bool)
    region[[1, 4, 5, 11, 17]] = True
    h, d = pool.num_heads, pool.head_dim
    q = pool.q(pool.latent).reshape(1, 1, h, d).transpose(1, 2)
    k, v = pool.kv(tokens).reshape(1, 20, 2, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    k = k.mean(dim=(-2, -1), keepdim=True).expand_as(v)  # one key for every token
    heads = F.scaled_dot_product_attention(q, k, v, attn_mask=region.view(1, 1, 1, 20))
    feature = pool.proj(heads.transpose(1, 2).reshape(1, 1, -1))
    feature = tower.clip.visual.head(trunk.head(trunk.fc_norm(feature)))[0, 0]
    per_patch = vit.projection(tokens)[0]
    torch.testing.assert_close(per_patch[region].mean(dim=0), feature, rtol=0, atol=1e-5)
    assert per_patch.shape == (20, feature.shape[-1]) and not torch.allclose(per_patch[0], per_patch[1])


def test_the_cls_token_is_read_or_refused_in_one_line(tower):
    """SigLIP 2 has no CLS token: ``cls()`` refuses in one line that names the substitute; PE-Core's and EVA-02's
    CLS is the first token; EVA-02 pools its CLS token, PE-Core pools with its MAP head."""
    vit = tower.vit
    x = torch.randn(1, vit.prefix_tokens + 4, vit.width)
    if "SigLIP" in tower.name:
        assert vit.prefix_tokens == 0 and not vit.has_cls
        with pytest.raises(ConfigError, match="no CLS token") as error:
            vit.cls(x)
        assert "\n" not in str(error.value) and "Backbone.pooled" in str(error.value)
        return
    assert vit.has_cls and torch.equal(vit.cls(x), x[:, 0])
    from_cls = vit.project(vit.cls(x)[:, None])[:, 0]
    assert torch.allclose(vit.pooled(x), from_cls, atol=1e-6) == ("EVA02" in tower.name)


def test_a_timm_tower_the_walk_does_not_cover_is_refused_in_one_line():
    from open_clip.timm_model import TimmModel

    visual = TimmModel("resnet18", embed_dim=8, image_size=32, pool="avg", proj="linear")
    with pytest.raises(WeightsError, match=r"^open_clip timm tower ResNet: no dense-walk adapter \(timm") as error:
        backbone_for(visual)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("EVA02-B-16", marks=pytest.mark.heavy),
        pytest.param("PE-Core-B-16", marks=[pytest.mark.slow, SLOW]),
        pytest.param("PE-Core-L-14-336", marks=[pytest.mark.slow, SLOW]),
        pytest.param("ViT-B-16-SigLIP2", marks=[pytest.mark.slow, SLOW]),
    ],
)
def test_segment_runs_from_a_local_random_checkpoint(name, tmp_path, rgb_image):
    """``gclip segment --model NAME --pretrained FILE`` end to end on a timm tower (default method: GCLIP), from a
    random-weight state dict saved to a file (1.5 to 2.5 GB for all but EVA02-B-16: those only with ``GCLIP_SLOW=1``);
    SigLIP 2 with a local tokenizer folder (``--tokenizer DIR``), as it runs offline."""
    import json

    from PIL import Image

    from gclip.cli import main
    from gclip.io.outputs import read_label_png
    from gclip.testing import save_random_checkpoint

    checkpoint = save_random_checkpoint(tmp_path / f"{name}.pt", name, seed=0)
    Image.fromarray(rgb_image).save(tmp_path / "photo.jpg")
    (tmp_path / "templates.txt").write_text("a photo of a {c}.\n")
    args = ["segment", str(tmp_path / "photo.jpg"), "--classes", "cat,dog,sky", "--model", name]
    args += [
        "--pretrained",
        str(checkpoint),
        "--out",
        str(tmp_path / "out"),
        "--templates",
        str(tmp_path / "templates.txt"),
    ]
    if "SigLIP" in name:  # its tokenizer is on the hub: a local folder (--tokenizer DIR), as offline users give it
        from conftest import make_tiny_hf_tokenizer

        args += ["--tokenizer", str(make_tiny_hf_tokenizer(tmp_path / "tok"))]
    assert main([*args, "--short-side", "64", "--crop", "64", "--stride", "32"]) == 0
    record = json.loads((tmp_path / "out" / "photo.json").read_text())
    assert record["settings"]["model"] == name and record["settings"]["method"] == "gclip"
    assert set(record["present"]) <= {"cat", "dog", "sky"} and read_label_png(tmp_path / "out" / "photo.png").shape == (
        61,
        83,
    )


@pytest.mark.heavy
def test_the_segmenter_runs_siglip2_with_a_local_tokenizer(tmp_path, rgb_image):
    """SigLIP 2's tokenizer comes from the Hugging Face hub: here a small one made by the tests, given as a local
    folder (``--tokenizer DIR``), so that the text and image sides (its walk, its MAP head read per patch) run in the
    Segmenter; a method that reads the CLS token refuses in one line."""
    from conftest import make_tiny_hf_tokenizer
    from gclip import Segmenter
    from gclip.backbones.models import load_model

    model = load_model("ViT-B-16-SigLIP2", None, device="cpu", tokenizer=make_tiny_hf_tokenizer(tmp_path / "tok"))
    seg = Segmenter(model, method="clip", templates=["a {c}."], short_side=64, crop=64, stride=32)
    assert isinstance(seg.vit, TimmClipViT) and seg.vit.prefix_tokens == 0
    seg.set_classes(["cat", "dog"])
    result = seg.predict(rgb_image)
    assert result.labels.shape == (61, 83) and set(result.labels.flatten().tolist()) <= {0, 1}
    refusing = Segmenter(model, method="cliptrase", templates=["a {c}."], short_side=64, crop=64, stride=32)
    refusing.set_classes(["cat", "dog"])
    with pytest.raises(ConfigError, match="no CLS token") as error:
        refusing.predict(rgb_image)
    assert "\n" not in str(error.value)


def tower_table() -> dict:
    from importlib import resources

    import tomllib

    return tomllib.loads((resources.files("gclip") / "data" / "timm_towers.toml").read_text(encoding="utf-8"))


@pytest.mark.heavy
@pytest.mark.parametrize(
    "name",
    [
        "ViT-B-16-SigLIP2",
        "PE-Core-B-16",
        "EVA02-B-16",
        pytest.param("PE-Core-L-14-336", marks=[pytest.mark.slow, SLOW]),
    ],
)
def test_every_method_runs_or_refuses_as_the_table_says(name, tmp_path, rgb_image):
    """Every registered method through the Segmenter on the tower (random weights, 64-pixel windows, tiny second
    models; CASS with a DINO of the tower's width and heads): it runs, or it refuses in one line with the reason
    ``data/timm_towers.toml`` gives, and the table names no method that is not registered."""
    import warnings

    from conftest import tiny_second_models
    from gclip import Segmenter
    from gclip.backbones.models import load_model
    from gclip.methods import list_methods
    from test_backbone_presets import dino_like

    table = tower_table()
    entry = table["towers"][name]
    assert set(entry["refuses"]) | set(table["adaptations"]) <= set(list_methods())
    from conftest import make_tiny_hf_tokenizer

    tokenizer = make_tiny_hf_tokenizer(tmp_path / "tok") if "SigLIP" in name else None  # its tokenizer is on the hub
    model = load_model(name, None, device="cpu", tokenizer=tokenizer)
    ran, refused = [], {}
    p = backbone_for(model.visual).patch_size  # windows of whole patches (CLIPer's tile the image's patch grid)
    small = dict(templates=["a {c}."], short_side=64, crop=4 * p, stride=2 * p)
    for method in list_methods():
        options = tiny_second_models(method)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            seg = Segmenter(model, method=method, method_options=options, **small)
            if method == "cass":
                seg = Segmenter(model, method="cass", method_options={"proxy": dino_like(seg.vit)}, **small)
            seg.set_classes(["cat", "dog"])
            try:
                labels = seg.predict(rgb_image).labels
            except ConfigError as error:
                assert "\n" not in str(error), method
                refused[method] = str(error)
                continue
        assert labels.shape == (61, 83), method
        ran.append(method)
    assert sorted(refused) == sorted(entry["refuses"])
    for method, reason in entry["refuses"].items():
        assert reason in refused[method], (method, refused[method])
    assert entry["cls_token"] == backbone_for(model.visual).has_cls and ("rope" in dir(seg.vit)) == entry["rope"]

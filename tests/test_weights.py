"""One way to find, read and refuse weights for every loader (gclip.backbones.weights): CLIP, second models, SAM."""

from __future__ import annotations

import re

import open_clip
import pytest
import torch

from conftest import TINY, TINY_DINO, TINY_SAM_MASKS, make_tiny_dino
from gclip.backbones import second_models
from gclip.backbones.models import load_model
from gclip.errors import WeightsError
from gclip.testing import random_state_dict

# The shape every missing-weights error has, whatever the loader.
MISSING = re.compile(
    r"^(no weights given for|weights of) (?P<what>.+?)( \(the usual file: [^)]+\))?"
    r"( are not in the local cache and the network is unreachable)?: run `gclip download (?P<args>[^`]+) --to DIR` "
    r"on a connected machine, then pass the file it writes \(DIR/(?P<file>\S+)\) as (?P<option>\w+)=PATH "
    r"\((?P<flag>--[\w-]+) PATH on the command line\)$"
)


def _load_sam(name, checkpoint=None):
    pytest.importorskip("segment_anything")
    from gclip.io.masks import load_sam

    load_sam.cache_clear()
    return load_sam(name, checkpoint)


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("GCLIP_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("GCLIP_CACHE_DIR", str(tmp_path / "gclip-cache"))


@pytest.mark.parametrize(
    ("load", "what", "args", "option"),
    [
        (
            lambda: load_model("ViT-B-32", "openai"),
            "CLIP ViT-B-32/openai (huggingface.co/timm/vit_base_patch32_clip_224.openai)",
            "ViT-B-32 openai",
            "pretrained",
        ),
        (
            lambda: second_models.load_second_model("dino_vits16"),
            "proxy dino_vits16 (huggingface.co/timm/vit_small_patch16_224.dino)",
            "dino_vits16",
            "proxy_checkpoint",
        ),
        (
            lambda: second_models.load_second_model("sam_vitb", option="sam_checkpoint"),
            "proxy sam_vitb",
            "sam_vitb",
            "sam_checkpoint",
        ),
        (lambda: _load_sam("sam_vitb"), "mask generator sam_vitb", "sam_vitb", "sam_checkpoint"),
    ],
    ids=["clip", "dino", "sam-encoder", "sam-masks"],
)
def test_missing_weights_have_one_shape_for_every_loader(offline, load, what, args, option):
    """CLIP, a second model and SAM: the same one line, naming the weights, the `gclip download` command, the file it
    writes and the option and flag that take it."""
    with pytest.raises(WeightsError) as info:
        load()
    message = str(info.value)
    found = MISSING.match(message)
    assert found, message
    assert (found["what"], found["args"], found["option"]) == (what, args, option)
    assert found["flag"] == "--" + option.replace("_", "-")
    assert found["file"] == ("ViT-B-32.openai.pt" if option == "pretrained" else f"{args}.pt")


@pytest.mark.parametrize(
    ("load", "flag"),
    [
        (lambda path: load_model(TINY, str(path)), "--pretrained"),
        (lambda path: second_models.load_second_model(TINY_DINO, str(path)), "--proxy-checkpoint"),
        (
            lambda path: second_models.load_second_model(TINY_DINO, str(path), option="sam_checkpoint"),
            "--sam-checkpoint",
        ),
        (lambda path: _load_sam(TINY_SAM_MASKS, str(path)), "--sam-checkpoint"),
    ],
    ids=["clip", "dino", "sam-encoder", "sam-masks"],
)
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist: pass an existing file to {flag}$"),
        (b"", "is empty .* pass it to {flag}$"),
        (b"garbage" * 9, r"cannot read checkpoint .*\({flag} takes a"),
    ],
    ids=["missing", "empty", "garbage"],
)
def test_a_bad_file_names_the_flag_that_took_it(tmp_path, load, flag, content, message):
    """Each loader reads files through one reader, whose errors name the loader's own flag (a second model's used to
    say --pretrained)."""
    path = tmp_path / "weights.pth"
    if content is not None:
        path.write_bytes(content)
    second_models.load_second_model.cache_clear()
    with pytest.raises(WeightsError, match=message.format(flag=re.escape(flag))) as info:
        load(path)
    assert "\n" not in str(info.value)


def test_gclips_weights_folder_serves_every_loader(offline, monkeypatch):
    """A file in gclip's one weights folder (where `gclip download` writes) is found by name, offline, by the second
    models (a DINO here), SAM's mask generator and CLIP's tags."""
    from gclip.backbones.weights import download_filename, weights_dir

    folder = weights_dir()
    folder.mkdir(parents=True)
    dino = random_state_dict(make_tiny_dino(), seed=4)
    torch.save(dino, folder / "gclip-tiny-dino-folder.pt")
    second_models.register_second_model(
        "gclip-tiny-dino-folder", second_models.SecondModelSpec("tiny", "sometag", build=make_tiny_dino)
    )
    loaded = second_models.load_second_model("gclip-tiny-dino-folder")
    assert torch.equal(loaded.model.pos_embed, dino["pos_embed"])
    assert loaded.path == str(folder / "gclip-tiny-dino-folder.pt") and loaded.weights_record()["sha256"]

    tags = {"tinytag": {"hf_hub": "gclip/not-on-the-hub/", "quick_gelu": True, "mean": (0.5,) * 3, "std": (0.5,) * 3}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    clip = open_clip.create_model(TINY)
    state = random_state_dict(clip, seed=6)
    torch.save(state, folder / download_filename(TINY, "tinytag"))
    model = load_model(TINY, "tinytag")
    assert torch.equal(model.clip.visual.proj, state["visual.proj"])
    assert model.quick_gelu and model.mean == (0.5, 0.5, 0.5)

    pytest.importorskip("segment_anything")
    from conftest import make_tiny_full_sam

    torch.save(random_state_dict(make_tiny_full_sam(), seed=3), folder / f"{TINY_SAM_MASKS}.pt")
    assert _load_sam(TINY_SAM_MASKS) is not None


def test_second_models_share_clips_fingerprint():
    from gclip.backbones.base import fingerprint

    dino = second_models.load_second_model(TINY_DINO)
    assert dino.fingerprint == fingerprint(dino.model)


# --- QuickGELU: the activation a checkpoint needs (issue 24, trap 5) ----------------------------------------------


def _tiny_state(seed: int = 2) -> dict[str, torch.Tensor]:
    """A tiny CLIP's weights holding fp16 values in fp32 tensors, as open_clip's `openai` models do."""
    return random_state_dict(open_clip.create_model(TINY), seed=seed)


def test_fp16_rounded_weights_that_say_nothing_get_a_notice_naming_the_flag(tmp_path, recwarn):
    """`torch.save(create_model("ViT-B-16", "openai").state_dict())` used to load with GELU and no word."""
    torch.save(_tiny_state(), tmp_path / "resaved.pt")
    with pytest.warns(UserWarning, match=r"resaved.pt looks like OpenAI's CLIP weights.*pass --quick-gelu") as seen:
        model = load_model(TINY, str(tmp_path / "resaved.pt"))
    assert not model.quick_gelu and "\n" not in str(seen[0].message)
    recwarn.clear()
    assert load_model(TINY, str(tmp_path / "resaved.pt"), quick_gelu=True).quick_gelu  # asked for: no notice
    trained = {k: v + 1e-4 * torch.rand_like(v) if v.is_floating_point() else v for k, v in _tiny_state().items()}
    torch.save(trained, tmp_path / "trained.pt")  # fp32 values: nothing like OpenAI's release
    assert not load_model(TINY, str(tmp_path / "trained.pt")).quick_gelu
    assert not [w for w in recwarn if "looks like OpenAI" in str(w.message)]


def test_openai_state_dicts_and_open_clips_published_files_set_the_activation(tmp_path, recwarn):
    state = _tiny_state()
    openai = {**state, "input_resolution": torch.tensor(32), "context_length": torch.tensor(77)}
    openai["vocab_size"] = torch.tensor(49408)
    torch.save(openai, tmp_path / "openai-own.pt")  # OpenAI's own model's state dict
    assert load_model(TINY, str(tmp_path / "openai-own.pt")).quick_gelu
    hub = tmp_path / "models--timm--vit_base_patch16_clip_224.openai" / "snapshots" / "0a1b"
    hub.mkdir(parents=True)
    torch.save(state, hub / "open_clip_pytorch_model.bin")  # in the Hugging Face cache of the openai tag
    assert load_model(TINY, str(hub / "open_clip_pytorch_model.bin")).quick_gelu
    torch.save(state, tmp_path / "vit_b_32-quickgelu-laion400m_e31-d867053b.pt")  # open_clip's release file
    assert load_model(TINY, str(tmp_path / "vit_b_32-quickgelu-laion400m_e31-d867053b.pt")).quick_gelu
    torch.save(state, tmp_path / "vit_b_32-laion2b_e16-af8dbd0c.pth")  # one trained with GELU
    assert not load_model(TINY, str(tmp_path / "vit_b_32-laion2b_e16-af8dbd0c.pth")).quick_gelu
    assert not [w for w in recwarn if "looks like OpenAI" in str(w.message)]  # all recognised: no notice


# --- every JSON gclip writes records the weights' path and SHA-256 ---------------------------------------------------


def test_file_sha256_is_computed_once_per_file_version(tmp_path, monkeypatch):
    import hashlib

    from gclip.backbones import weights

    path = tmp_path / "w.pt"
    path.write_bytes(b"abc")
    calls = []
    real = hashlib.sha256
    monkeypatch.setattr(weights.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    assert weights.file_sha256(path) == real(b"abc").hexdigest() == weights.file_sha256(str(path))
    assert len(calls) == 1
    path.write_bytes(b"abcd")  # another size: hashed again
    assert weights.file_sha256(path) == real(b"abcd").hexdigest() and len(calls) == 2
    assert weights.weights_record(path) == {"path": str(path.resolve()), "sha256": real(b"abcd").hexdigest()}


def test_segment_eval_bench_and_inspect_json_record_the_weights(tmp_path, tiny_checkpoint, rgb_image, capsys):
    import hashlib
    import json

    from PIL import Image

    from gclip.cli import main
    from test_datasets import write_layout

    expected = {
        "path": str(tiny_checkpoint.resolve()),
        "sha256": hashlib.sha256(tiny_checkpoint.read_bytes()).hexdigest(),
    }
    model = ["--model", TINY, "--pretrained", str(tiny_checkpoint), "--device", "cpu"]
    fast = ["--crop", "32", "--stride", "16", "--short-side", "32"]
    Image.fromarray(rgb_image).save(tmp_path / "photo.png")
    out = tmp_path / "seg"
    argv = ["segment", str(tmp_path / "photo.png"), "--classes", "cat,dog", "--out", str(out)]
    assert main(argv + model + fast + ["--format", "json,manifest", "--no-progress"]) == 0
    assert json.loads((out / "photo.json").read_text())["weights"]["clip"] == expected
    assert json.loads((out / "manifest.jsonl").read_text().splitlines()[0])["weights"]["clip"] == expected

    write_layout(tmp_path / "data", "voc", n=2, size=(30, 40), seed=3)
    argv = ["eval", "--data-root", str(tmp_path / "data"), "--dataset", "voc20", "--out", str(tmp_path / "e.json")]
    assert main(argv + model + fast + ["--workers", "0", "--quiet"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["runs"][0]["weights"]["clip"] == expected

    argv = ["bench", "--synthetic", "40x40", "--count", "1", "--no-reference", "--json", str(tmp_path / "b.json")]
    assert main(argv + model + fast) == 0
    record = json.loads((tmp_path / "b.json").read_text())
    assert record["weights"]["clip"] == expected and record["pretrained"] == str(tiny_checkpoint)

    argv = ["inspect", "--model", TINY, "--pretrained", str(tiny_checkpoint), "--json", str(tmp_path / "i.json")]
    assert main(argv) == 0
    assert json.loads((tmp_path / "i.json").read_text())["weights"] == expected


def test_a_tag_in_the_hub_cache_loads_offline(offline, tmp_path, monkeypatch):
    """CLIP tags and timm's second models look in the Hugging Face cache through one lookup (hub_cached)."""
    from gclip.backbones.weights import hub_cached

    tags = {"hubtag": {"hf_hub": "gclip/tiny-hub/", "quick_gelu": False}}
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY, tags)
    snapshot = tmp_path / "hub" / "models--gclip--tiny-hub" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (tmp_path / "hub" / "models--gclip--tiny-hub" / "refs").mkdir()
    (tmp_path / "hub" / "models--gclip--tiny-hub" / "refs" / "main").write_text("0123abcd")
    state = random_state_dict(open_clip.create_model(TINY), seed=8)
    torch.save(state, snapshot / "open_clip_pytorch_model.bin")
    found = hub_cached(
        "gclip/tiny-hub", ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], str(tmp_path / "hub")
    )
    assert found == str(snapshot / "open_clip_pytorch_model.bin")
    model = load_model(TINY, "hubtag", cache_dir=str(tmp_path / "hub"))
    assert torch.equal(model.clip.visual.proj, state["visual.proj"]) and model.path == found


def test_second_models_are_recorded_beside_clip(tiny_model, tiny_checkpoint):
    """The JSON outputs' weights record names each second model's file too (the one found for it when none was
    given), and a mask generator's."""
    import hashlib
    from pathlib import Path

    from conftest import SECOND_MODELS_DIR
    from gclip import Segmenter
    from gclip.backbones import weights_used

    seg = Segmenter(tiny_model, method="proxyclip", method_options={"proxy": TINY_DINO}, classes=["a", "b"])
    seg.method.check_resources("cpu", torch.float32)
    record = weights_used(seg.model, seg.method.options())
    dino = Path(second_models.SECOND_MODELS[TINY_DINO].checkpoint)
    assert record["proxy"] == {
        "name": TINY_DINO,
        "path": str(dino.resolve()),
        "sha256": hashlib.sha256(dino.read_bytes()).hexdigest(),
    }
    assert record["clip"]["path"] == str(tiny_checkpoint.resolve())
    sam = SECOND_MODELS_DIR / "tiny-full-sam.pth"
    if sam.is_file():
        masks = weights_used(tiny_model, {"mask_generator": TINY_SAM_MASKS, "sam_checkpoint": str(sam)})
        assert masks["mask_generator"]["sha256"] == hashlib.sha256(sam.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("load", "what"),
    [
        (lambda path: load_model(TINY, str(path)), f"CLIP {TINY}"),
        (lambda path: second_models.load_second_model(TINY_DINO, str(path)), f"proxy {TINY_DINO}"),
        (lambda path: _load_sam(TINY_SAM_MASKS, str(path)), f"mask generator {TINY_SAM_MASKS}"),
    ],
    ids=["clip", "dino", "sam-masks"],
)
def test_a_downloaded_file_of_another_model_is_refused_alike(tmp_path, load, what):
    """A `gclip download` file says what it holds; every loader refuses another model's file with the same line."""
    from gclip.backbones.weights import write_weights

    meta = {"kind": "second", "name": "dino_vits16", "arch": "vit_small_patch16_224", "tag": "dino"}
    path = write_weights(tmp_path, "dino_vits16.pt", meta, state=random_state_dict(make_tiny_dino(), seed=1))
    second_models.load_second_model.cache_clear()
    with pytest.raises(WeightsError) as info:
        load(path)
    shape = rf"checkpoint {re.escape(str(path))} holds the weights of second model dino_vits16, not of {what}: \S.*"
    assert re.fullmatch(shape, str(info.value)), str(info.value)


def test_a_renamed_published_file_is_recognised_by_its_sha256(tmp_path, monkeypatch, recwarn):
    """open_clip's table gives the SHA-256 (OpenAI's URLs) or its first 8 hex digits (open_clip's releases) of its
    files: a renamed copy of one whose weights look like OpenAI's is recognised by it, without a notice."""
    import hashlib

    from gclip.backbones import models

    torch.save(_tiny_state(), tmp_path / "renamed.pt")
    digest = hashlib.sha256((tmp_path / "renamed.pt").read_bytes()).hexdigest()
    monkeypatch.setattr(models, "_published_files", lambda: {"sha:" + digest[:8]: (TINY, "release", True)})
    assert models.published_checkpoint(tmp_path / "renamed.pt", hash_it=True) == (TINY, "release", True)
    assert load_model(TINY, str(tmp_path / "renamed.pt")).quick_gelu
    assert not [w for w in recwarn if "looks like OpenAI" in str(w.message)]

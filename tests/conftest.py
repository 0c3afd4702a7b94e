"""Shared fixtures: a tiny open_clip ViT registered from the tests, random-weight checkpoints, the real sample."""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import pytest

from gclip.backbones.models import load_model
from gclip.testing import random_state_dict, save_random_checkpoint

HERE = Path(__file__).parent
TINY = "gclip-tiny-test"
open_clip.add_model_config(HERE / "configs")
logging.getLogger().setLevel(logging.ERROR)


TINY_DINO = "gclip-tiny-dino"  # second-model registry: a tiny DINO-layout timm ViT (random_state_dict seed 7)
TINY_DINOV3 = "gclip-tiny-dinov3"  # second-model registry: a tiny DINOv3-layout timm Eva (random_state_dict seed 9)
TINY_SAM = "gclip-tiny-sam"  # second-model registry: a tiny SAM image encoder (seed 8)
TINY_SAM_MASKS = "gclip-tiny-sam-masks"  # mask-generator registry: a whole tiny SAM (seed 3)
TINY_BY_FAMILY = {"timm": TINY_DINO, "sam": TINY_SAM}  # SecondModelSpec.family -> the test model standing for it


def make_tiny_dino():
    """A tiny DINO-layout ViT (timm): patch 4, width 64 and 4 heads (CLIP-tiny's, as CASS needs), 2 blocks, so its grid
    is twice CLIP-tiny's."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=0).eval()


def make_tiny_dinov3():
    """A tiny DINOv3 (timm ``vit_base_patch16_dinov3``'s code: Eva with DINOv3's RoPE, a CLS and 4 register tokens,
    layer scale, no absolute positions): patch 4, width 64 and 4 heads (CLIP-tiny's, as CASS needs), 2 blocks."""
    import timm

    return timm.create_model(
        "vit_base_patch16_dinov3", num_classes=0, img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4
    ).eval()


def make_tiny_sam():
    """A tiny SAM image encoder (segment-anything): 64 px input, patch 8, width 32, 2 blocks (windowed, then
    global with relative positions)."""
    from segment_anything.modeling.image_encoder import ImageEncoderViT

    return ImageEncoderViT(
        img_size=64,
        patch_size=8,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        out_chans=16,
        qkv_bias=True,
        use_rel_pos=True,
        window_size=4,
        global_attn_indexes=(1,),
    ).eval()


def make_tiny_full_sam():
    """A whole tiny SAM (segment-anything: :func:`make_tiny_sam`'s encoder, a prompt encoder, a mask decoder) for
    SAM's automatic mask generator."""
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    return Sam(
        make_tiny_sam(),
        PromptEncoder(embed_dim=16, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4),
        MaskDecoder(
            transformer_dim=16, transformer=TwoWayTransformer(depth=1, embedding_dim=16, mlp_dim=32, num_heads=2)
        ),
    ).eval()


def _register_tiny_second_models() -> Path:
    """The suite has no DINO or SAM weights: tiny random models are registered under their own names
    (:data:`TINY_DINO`, :data:`TINY_DINOV3`, :data:`TINY_SAM` as second models, :data:`TINY_SAM_MASKS` as a mask
    generator), their checkpoints saved to a temporary folder (removed at exit), as the tiny open_clip config stands
    in for CLIP. The real entries (``dino_vitb8``, ``sam_vitb``, ...) are left as they are: a test asks for a tiny
    model by name (:func:`tiny_second_models`). Returns the folder."""
    import atexit
    import shutil
    import tempfile

    import torch

    from gclip.backbones import second_models

    folder = Path(tempfile.mkdtemp(prefix="gclip-second-models-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    dino = folder / "tiny-dino.pth"
    torch.save(random_state_dict(make_tiny_dino(), seed=7), dino)
    second_models.register_second_model(
        TINY_DINO, second_models.SecondModelSpec(TINY_DINO, build=make_tiny_dino, checkpoint=str(dino))
    )
    dinov3 = folder / "tiny-dinov3.pth"
    torch.save(random_state_dict(make_tiny_dinov3(), seed=9), dinov3)
    second_models.register_second_model(
        TINY_DINOV3, second_models.SecondModelSpec(TINY_DINOV3, build=make_tiny_dinov3, checkpoint=str(dinov3))
    )
    try:
        sam = make_tiny_sam()
    except ImportError:  # segment-anything absent: the tests that need a SAM skip (tiny_second_models)
        return folder
    torch.save(random_state_dict(sam, seed=8), folder / "tiny-sam.pth")
    spec = second_models.SecondModelSpec(
        TINY_SAM, build=make_tiny_sam, checkpoint=str(folder / "tiny-sam.pth"), input_size=64, family="sam"
    )
    second_models.register_second_model(TINY_SAM, spec)
    from gclip.io.masks import register_mask_model

    register_mask_model(TINY_SAM_MASKS, make_tiny_full_sam)
    torch.save(random_state_dict(make_tiny_full_sam(), seed=3), folder / "tiny-full-sam.pth")
    return folder


SECOND_MODELS_DIR = _register_tiny_second_models()


def tiny_second_models(method: str) -> dict[str, Any]:
    """Options that give every second model of ``method`` a tiny test model, derived from its option fields.

    An option whose default names an entry of the second-model registry (``proxy="dino_vitb8"``,
    ``sam="sam_vitb"``) gets the test model of that entry's family (:data:`TINY_BY_FAMILY`); a ``mask_generator``
    option gets the tiny SAM of :data:`TINY_SAM_MASKS` with its weights and thresholds 0, so that its random masks
    pass. A method without second models gets ``{}``. Skips the test when a SAM is needed and segment-anything is
    absent."""
    from gclip.backbones.second_models import SECOND_MODELS
    from gclip.methods import get_method

    options: dict[str, Any] = {}
    for field in dataclasses.fields(type(get_method(method))):
        if isinstance(field.default, str) and field.default in SECOND_MODELS:
            family = SECOND_MODELS[field.default].family
            if family == "sam":
                pytest.importorskip("segment_anything")
            options[field.name] = TINY_BY_FAMILY[family]
        elif field.name == "mask_generator":
            pytest.importorskip("segment_anything")
            options.update(
                mask_generator=TINY_SAM_MASKS,
                sam_checkpoint=str(SECOND_MODELS_DIR / "tiny-full-sam.pth"),
                pred_iou_thresh=0.0,
                stability_score_thresh=0.0,
            )
    return options


def crop_methods() -> list[str]:
    """The methods with a per-crop forward (``dense_logits``); whole-image ones (Trident) have their own tests."""
    from gclip.methods import get_method, list_methods

    return [m for m in list_methods() if not get_method(m).whole_image]


# The quick tier (``pytest -m quick``): every test without one of these markers. ``matrix``: the cases of a per-method
# matrix beyond the representative methods (:func:`method_matrix`); ``heavy``: single tests of several seconds
# (subprocesses, forked or killed workers, ViT-B forwards, torch.compile of a whole pipeline). The full suite
# (``python -m pytest -q``) runs them all.
NOT_QUICK = ("golden", "pipeline", "slow", "browser", "ray", "matrix", "heavy")
_PLAIN_HOOKS = {"name", "summary", "protocol", "table_row", "blocks"}  # every method changes its own blocks


def pytest_collection_modifyitems(config, items):
    for item in items:
        if not any(item.get_closest_marker(name) for name in NOT_QUICK):
            item.add_marker(pytest.mark.quick)


def mechanisms(method: str) -> set[str]:
    """What ``method`` changes besides its blocks: the :class:`~gclip.methods.Method` hooks, pieces and flags its class
    overrides (``features``, ``logits``, ``second_model``, ``label_refinement``, ``window_mode`` ...) and its
    second-model options."""
    from gclip.methods import Method, get_method

    cls = type(get_method(method))
    found = {a for a in dir(Method) if not a.startswith("__") and a not in _PLAIN_HOOKS}
    found = {a for a in found if getattr(cls, a) is not getattr(Method, a) and getattr(cls, a) != getattr(Method, a)}
    fields = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else set()
    for slot in ("second_model", "text_side", "label_refinement", "image_context"):  # what each piece changes
        piece = getattr(get_method(method), slot)
        base = next((b for b in type(piece).__mro__[1:] if b.__module__ == "gclip.methods.pieces"), None)
        if piece is not None and base is not None:
            changed = [a for a in vars(base) if not a.startswith("_") and getattr(type(piece), a) is not vars(base)[a]]
            found |= {f"{slot}.{a}" for a in changed}
    return found | {f"option:{f}" for f in fields & {"proxy", "sam", "masks", "mask_generator"}}


def representative_methods(methods: list[str] | None = None) -> list[str]:
    """One method per mechanism: the first method that changes nothing but its blocks, GCLIP (the project's own),
    and then, greedily in registry order, the method that brings the most mechanisms (:func:`mechanisms`) not yet
    covered, until every mechanism some method of ``methods`` has is covered."""
    from gclip.methods import list_methods

    methods = list(methods if methods is not None else list_methods())
    found = {m: mechanisms(m) for m in methods}
    chosen = [m for m in methods if not found[m]][:1] + [m for m in methods if m == "gclip"]
    left = set().union(set(), *found.values())
    while left:
        best = max(methods, key=lambda m: (len(found[m] & left), -methods.index(m)))
        chosen.append(best)
        left -= found[best]
    return [m for m in methods if m in chosen]


def method_matrix(methods: list[str]) -> list:
    """``methods`` as parameters of a per-method matrix: the representative ones (:func:`representative_methods`)
    run in the quick tier, the others carry the ``matrix`` marker (the full suite runs them all)."""
    quick = set(representative_methods(methods))
    return [m if m in quick else pytest.param(m, marks=pytest.mark.matrix) for m in methods]


def make_tiny(layers: int = 2, seed: int = 0, block_type: str | None = None, **vision):
    """A random-weight tiny CLIP (eval mode), optionally deeper, with open_clip's custom attention block, or with
    other ``vision_cfg`` entries (e.g. ``scale_heads=True``)."""
    cfg = open_clip.get_model_config(TINY)
    cfg["vision_cfg"]["layers"] = layers
    cfg["vision_cfg"].update(vision)
    if block_type:
        cfg["vision_cfg"]["block_type"] = block_type
    model = open_clip.model.CLIP(**cfg)
    model.load_state_dict(random_state_dict(model, seed=seed))
    return model.eval()


def plant_fault(sample, fault: str, bad_value: int = 12) -> None:
    """Break one sample of a tiny dataset layout as `gclip data check` must notice: ``missing`` (label deleted),
    ``size`` (label 5 px wider), ``value`` (a 2x2 patch of ``bad_value``), ``unconverted`` (a 0/1 mask left at 0/255),
    ``grayscale`` / ``rgb`` (the image in the other mode); anything else (e.g. ``count``) changes nothing. Files keep
    their format (the suffix's, so 16-bit TIFF labels stay TIFF)."""
    from PIL import Image

    def save(image, path):
        image.save(path, format=Image.registered_extensions()[path.suffix.lower()])

    if fault == "missing":
        sample.label.unlink()
    elif fault == "size":
        with Image.open(sample.label) as img:
            save(img.resize((img.width + 5, img.height)), sample.label)
    elif fault == "value":
        array = np.asarray(Image.open(sample.label)).copy()
        array[2:4, 2:4] = bad_value
        save(Image.fromarray(array), sample.label)
    elif fault == "unconverted":  # a mask copied as it was downloaded (0/255): the metric would ignore the class
        array = np.asarray(Image.open(sample.label)).copy()
        save(Image.fromarray((array * 255).astype(np.uint8)), sample.label)
    elif fault in ("grayscale", "rgb"):
        with Image.open(sample.image) as img:
            save(img.convert("L" if fault == "grayscale" else "RGB"), sample.image)


TINY_TOKENIZER_WORDS = ["a", "photo", "of", "the", "cat", "dog", "sky", "big", "small"]


def make_tiny_hf_tokenizer(folder: Path) -> Path:
    """A small Hugging Face tokenizer (word level over :data:`TINY_TOKENIZER_WORDS`, lower-casing, an end token,
    padding) saved into ``folder`` as a hub repository's files are (tokenizer.json, tokenizer_config.json), for the
    hub-tokenizer route of SigLIP's towers; skips the test without transformers."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(TINY_TOKENIZER_WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A <eos>", special_tokens=[("<eos>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session", autouse=True)
def _text_cache_dir(tmp_path_factory):
    """Keep the text-embedding disk cache of a test session in a temporary folder."""
    old = os.environ.get("GCLIP_CACHE_DIR")
    os.environ["GCLIP_CACHE_DIR"] = str(tmp_path_factory.mktemp("gclip-cache"))
    yield
    if old is None:
        os.environ.pop("GCLIP_CACHE_DIR", None)
    else:
        os.environ["GCLIP_CACHE_DIR"] = old


def sample_root() -> Path | None:
    """The real VOC/ADE20K/COCO-Stuff sample (``../shared/data`` or ``$GCLIP_SAMPLE_DATA``), if present."""
    env = os.environ.get("GCLIP_SAMPLE_DATA")
    root = Path(env) if env else HERE.parent.parent / "shared" / "data"
    return root if root.is_dir() else None


@pytest.fixture(scope="session")
def sample_data() -> Path:
    root = sample_root()
    if root is None:
        pytest.skip("the real data sample (../shared/data) is not present")
    return root


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt", TINY, seed=0)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_model(TINY, str(tiny_checkpoint), device="cpu")


@pytest.fixture(scope="session")
def vitb16_checkpoint(tmp_path_factory) -> Path:
    """A random-weight ViT-B-16 checkpoint on disk (QuickGELU config, as OpenAI's weights)."""
    return save_random_checkpoint(tmp_path_factory.mktemp("ckpt") / "vit-b-16.pt", "ViT-B-16", seed=0, quick_gelu=True)


@pytest.fixture(scope="session")
def golden_pe_core():
    """PE-Core-B/16 (open_clip's timm Eva) with ``random_state_dict(visual, seed=0)`` weights, the trunk head's bias
    zero (Meta's PE layout has none: its projection is a bare matrix) and mean = std = 0.5 (the ``meta`` tag's): the
    tower of the PE-Core goldens (tests/data/fidelity/README.md). The text tower is dropped: the goldens take random
    text embeddings."""
    import torch

    torch.manual_seed(0)
    model = load_model("PE-Core-B-16", None, device="cpu")
    model.text = None
    state = random_state_dict(model.visual, seed=0)
    state["trunk.head.bias"].zero_()
    model.visual.load_state_dict(state)
    half = {"mean": (0.5,) * 3, "std": (0.5,) * 3}
    open_clip.set_model_preprocess_cfg(model, {**open_clip.get_model_preprocess_cfg(model), **half})
    return model


@pytest.fixture(scope="session")
def golden_siglip2():
    """The random ``ViT-B-16-SigLIP2`` (224) of TextRegion's SigLIP 2 goldens: open_clip's own init (so its logit
    scale and bias, ``exp`` 1/0.07 and -10), the image tower filled by ``random_state_dict(visual, seed=0)``, no text
    tower (the goldens give their text embeddings)."""
    model = load_model("ViT-B-16-SigLIP2", None, device="cpu")
    model.clip.text = None
    model.clip.visual.load_state_dict(random_state_dict(model.clip.visual, seed=0))
    return model


@pytest.fixture
def rgb_image() -> np.ndarray:
    """A 61x83 RGB uint8 test image (odd sizes on purpose)."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(61, 83, 3), dtype=np.uint8)


@pytest.fixture(scope="session")
def golden_dino(tmp_path_factory) -> str:
    """The random DINO ViT-B/8 of the ProxyCLIP goldens (timm ``vit_base_patch8_224``, random_state_dict seed 11),
    registered as the proxy ``golden_dino_vitb8``."""
    import timm
    import torch

    from gclip.backbones import second_models as proxy

    path = tmp_path_factory.mktemp("dino") / "dino-vitb8-random.pth"
    dino = timm.create_model("vit_base_patch8_224", pretrained=False, num_classes=0)
    torch.save(random_state_dict(dino, seed=11), path)
    proxy.register_second_model(
        "golden_dino_vitb8", proxy.SecondModelSpec("vit_base_patch8_224", "dino", checkpoint=str(path))
    )
    return "golden_dino_vitb8"


@pytest.fixture(scope="session")
def golden_dinov2(tmp_path_factory) -> str:
    """The random DINOv2 ViT-B/14 with registers of the ProxyCLIP goldens (timm ``vit_base_patch14_reg4_dinov2``,
    random_state_dict seed 13), saved in DINOv2's own checkpoint layout and registered as ``golden_dinov2``."""
    import timm
    import torch

    from gclip.backbones import second_models as proxy

    state = random_state_dict(timm.create_model("vit_base_patch14_reg4_dinov2", pretrained=False, num_classes=0), 13)
    official = {k: v for k, v in state.items() if k not in ("cls_token", "pos_embed", "reg_token")}
    official["cls_token"] = state["cls_token"]  # DINOv2 adds its CLS position (here 0) to the CLS token
    official["pos_embed"] = torch.cat([torch.zeros(1, 1, state["pos_embed"].shape[-1]), state["pos_embed"]], dim=1)
    official["register_tokens"] = state["reg_token"]
    official["mask_token"] = torch.zeros(1, state["pos_embed"].shape[-1])
    path = tmp_path_factory.mktemp("dinov2") / "dinov2-vitb14-reg-random.pth"
    torch.save(official, path)
    spec = proxy.SecondModelSpec("vit_base_patch14_reg4_dinov2", "lvd142m", checkpoint=str(path), pos_rule="antialias")
    proxy.register_second_model("golden_dinov2", spec)
    return "golden_dinov2"


@pytest.fixture(scope="session")
def golden_sam(tmp_path_factory) -> str:
    """The random SAM ViT-B image encoder of the ProxyCLIP goldens (timm ``samvit_base_patch16``, random_state_dict
    seed 17), saved in SAM's own checkpoint layout (``image_encoder.*``, ``mlp.lin*``), registered as ``golden_sam``."""
    import timm
    import torch

    from gclip.backbones import second_models as proxy

    state = random_state_dict(timm.create_model("samvit_base_patch16", pretrained=False, num_classes=0), seed=17)
    path = tmp_path_factory.mktemp("sam") / "sam-vitb-random.pth"
    torch.save({"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in state.items()}, path)
    spec = proxy.SecondModelSpec("vit_b", None, checkpoint=str(path), input_size=1024, family="sam")
    proxy.register_second_model("golden_sam", spec)
    return "golden_sam"


@pytest.fixture(scope="session")
def golden_mae(tmp_path_factory) -> str:
    """The random MAE ViT-B/16 of the ProxyCLIP goldens (timm ``vit_base_patch16_224``, random_state_dict seed 19),
    saved as MAE's pre-training checkpoint (``{"model": ...}`` with a decoder key and the mask token, which the
    loader drops), registered as ``golden_mae`` with the real ``mae_vitb16`` spec."""
    import timm
    import torch

    from gclip.backbones import second_models as proxy

    state = random_state_dict(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), seed=19)
    state["mask_token"] = torch.zeros(1, 1, 512)
    state["decoder_embed.weight"] = torch.zeros(512, 768)
    path = tmp_path_factory.mktemp("mae") / "mae-vitb16-random.pth"
    torch.save({"model": state}, path)
    spec = proxy.SECOND_MODELS["mae_vitb16"]
    proxy.register_second_model("golden_mae", dataclasses.replace(spec, checkpoint=str(path)))
    return "golden_mae"


@pytest.fixture(scope="session")
def golden_dino16(tmp_path_factory) -> str:
    """The random DINO ViT-B/16 of the Trident goldens (timm ``vit_base_patch16_224``, random_state_dict seed 23),
    registered as ``golden_dino16``."""
    import timm
    import torch

    from gclip.backbones import second_models as proxy

    path = tmp_path_factory.mktemp("dino16") / "dino-vitb16-random.pth"
    torch.save(random_state_dict(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0), 23), path)
    proxy.register_second_model(
        "golden_dino16", proxy.SecondModelSpec("vit_base_patch16_224", "dino", checkpoint=str(path))
    )
    return "golden_dino16"

"""CASS: its pieces against the libraries the authors call (PIL, torchvision, torch.svd_lowrank, scikit-learn and
scipy), the engine with a whole-image context, and its errors. Parity with the authors' code: test_fidelity and
test_pipeline_fidelity."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from conftest import TINY_DINO
from gclip import Segmenter
from gclip.errors import ConfigError
from gclip.inference.reference import reference_labels
from gclip.io.pilresize import pil_bicubic_resize
from gclip.methods import get_method, methods_with_second_models
from gclip.methods.cass import dino_input, low_rank, text_clusters

pytest.importorskip("scipy")


@pytest.mark.parametrize("size,out", [((336, 500), (336, 336)), ((500, 336), (336, 336)), ((37, 53), (91, 20))])
def test_pil_bicubic_resize_equals_pillow(size, out):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(pixels).resize((out[1], out[0]), Image.BICUBIC))
    got = pil_bicubic_resize(torch.from_numpy(pixels).permute(2, 0, 1)[None], out)[0].permute(1, 2, 0).numpy()
    assert got.shape == expected.shape
    assert np.array_equal(got, expected)


def test_dino_input_is_the_authors_pil_round_trip():
    """The authors' steps, written with the libraries they call: torchvision's inverse Normalize, astype('uint8'),
    PIL's resize to a square, ToTensor and ImageNet's Normalize, cut to the DINO patch."""
    from PIL import Image
    from torchvision import transforms

    mean255 = torch.tensor([122.771, 116.746, 104.094]).view(3, 1, 1)
    std255 = torch.tensor([68.501, 66.632, 70.323]).view(3, 1, 1)
    pixels = torch.from_numpy(np.random.default_rng(3).random((3, 60, 83), dtype=np.float32) * 255)
    crop = (pixels - mean255) / std255
    inverse = transforms.Normalize([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.255], [1 / 0.229, 1 / 0.224, 1 / 0.255])
    image = Image.fromarray((inverse(crop.clone()).permute(1, 2, 0).numpy() * 255).astype("uint8")).resize((60, 60))
    dino = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))]
    )
    expected = dino(image)[:, :56, :56]
    got = dino_input(crop[None], 8)[0]
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-6)


def test_low_rank_is_torch_svd_lowrank_with_the_same_draw():
    a = torch.randn(50, 50, dtype=torch.float64)
    a = a @ a.T
    torch.manual_seed(5)
    u, s, v = torch.svd_lowrank(a, q=10)
    probes = torch.randn(50, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    u2, s2, vh2 = low_rank(a, probes)
    assert torch.allclose(s, s2, atol=1e-9)
    assert torch.allclose(u @ torch.diag(s) @ v.T, (u2 * s2) @ vh2, atol=1e-8)


def test_text_clusters_equal_scikit_learn_and_scipy_ward():
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.metrics.pairwise import cosine_distances

    text = np.random.default_rng(2).standard_normal((10, 512), dtype=np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    z = linkage(squareform(cosine_distances(text)), method="ward")
    for threshold in (0.1, 0.99, 1.05, 2.0):
        expected = fcluster(z, t=threshold, criterion="distance") - 1
        assert text_clusters(torch.from_numpy(text), threshold).tolist() == expected.tolist()


def test_object_queries_move_the_first_best_class_of_each_cluster():
    m = get_method("cass", h_threshold=0.5, mean_vector_weight=0.5)
    text = torch.eye(4)[:3]  # three orthogonal classes: three clusters at 0.5
    unit = torch.nn.functional.normalize(torch.tensor([[[1.0, 0, 0, 1], [0, 1, 0, 1], [1, 0, 0, 0]]]), dim=-1)
    g = torch.tensor([[0.3, 0.2, 0.1]])
    moved = m.object_queries(unit, text, g)[0]
    top2 = torch.nn.functional.normalize(unit[0, [2, 0]].mean(0), dim=0)  # class 0's two closest patches
    assert torch.allclose(moved[0], torch.nn.functional.normalize(0.5 * text[0] + 0.5 * top2, dim=0))
    merged = get_method("cass", h_threshold=5.0, mean_vector_weight=0.5).object_queries(unit, text, g)[0]
    assert torch.allclose(merged[1:], text[1:])  # one cluster: only its best class (0) moves
    assert not torch.allclose(merged[0], text[0])


def test_cass_is_a_paired_method_and_checks_its_options():
    assert "cass" in methods_with_second_models()
    for bad in ({"attention": "qq"}, {"global_source": "both"}, {"rank": 0}):
        with pytest.raises(ConfigError, match="cass"):
            get_method("cass", **bad)


@pytest.mark.parametrize("source", ["image", "crop"])
def test_cass_engine_equals_the_reference_loop(tiny_model, rgb_image, source):
    seg = Segmenter(
        tiny_model,
        method="cass",
        method_options={"proxy": TINY_DINO, "global_source": source},
        short_side=40,
        crop=32,
        stride=16,
    )
    seg.set_classes(["cat", "dog", "grass"])
    got = seg.predict(rgb_image)
    assert got.labels.shape == rgb_image.shape[:2]
    assert np.array_equal(got.labels, reference_labels(seg, rgb_image))


def test_cass_global_source_image_takes_the_whole_image(tiny_model, rgb_image, monkeypatch):
    seg = Segmenter(
        tiny_model, method="cass", method_options={"proxy": TINY_DINO}, short_side=40, crop=32, stride=16, batch_size=4
    )
    seg.set_classes(["cat", "dog", "grass"])
    calls = []
    from gclip.methods.cass import GlobalCls

    original = GlobalCls.__call__

    def counted(self, vit, image):
        calls.append(tuple(image.shape))
        return original(self, vit, image)

    monkeypatch.setattr(GlobalCls, "__call__", counted)
    seg.predict_batch([rgb_image, rgb_image[:30]])
    assert len(calls) == 2 and all(c[0] == 1 for c in calls)  # once per image, on its whole model input
    crop_seg = Segmenter(
        tiny_model, method=dataclasses.replace(seg.method, global_source="crop"), short_side=40, crop=32, stride=16
    )
    crop_seg.set_classes(["cat", "dog", "grass"])
    a, b = seg.predict(rgb_image, True).probs, crop_seg.predict(rgb_image, True).probs
    assert not np.allclose(a, b)  # the global embedding changes the logits


def test_cass_needs_a_dino_as_wide_as_clip(tiny_model, rgb_image, tmp_path):
    from timm.models.vision_transformer import VisionTransformer

    from gclip.backbones import second_models as proxy
    from gclip.testing import random_state_dict

    def narrow():
        return VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, num_classes=0).eval()

    torch.save(random_state_dict(narrow(), seed=1), tmp_path / "narrow.pth")
    proxy.register_second_model(
        "narrow_dino", proxy.SecondModelSpec("narrow", build=narrow, checkpoint=str(tmp_path / "narrow.pth"))
    )
    seg = Segmenter(
        tiny_model, method="cass", method_options={"proxy": "narrow_dino"}, short_side=32, crop=32, stride=16
    )
    seg.set_classes(["a", "b"])
    with pytest.raises(ConfigError, match="same width and heads") as info:
        seg.predict(rgb_image)
    assert "\n" not in str(info.value)

"""Windows, resizing, the tiled reduction and PAMR, against direct computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gclip.inference.postprocess import pamr, reduce_logits
from gclip.inference.preprocess import normalise
from gclip.inference.windows import pad_sizes, rescale_size, resize_image, single_threaded_opencv, window_boxes


@pytest.mark.parametrize(
    ("size", "short", "long", "expected"),
    [
        ((375, 500), 448, 2048, (448, 597)),
        ((500, 375), 448, 2048, (597, 448)),
        ((100, 2000), 448, 2048, (102, 2048)),  # the long side caps the scale
        ((1024, 2048), 560, 2048, (560, 1120)),
        ((375, 500), 0, 2048, (375, 500)),
    ],
)
def test_rescale_size(size, short, long, expected):
    assert rescale_size(*size, short, long) == expected


@pytest.mark.parametrize(
    ("h", "w", "crop", "stride"),
    [
        (448, 597, 448, 224),
        (100, 90, 448, 224),
        (300, 301, 64, 48),
        (224, 224, 224, 112),
        (50, 500, 32, 32),
        (37, 41, 0, 1),
    ],
)
def test_windows_cover_every_pixel_and_stay_inside(h, w, crop, stride):
    boxes = window_boxes(h, w, crop, stride)
    covered = torch.zeros(h, w, dtype=torch.int32)
    for y1, y2, x1, x2 in boxes:
        assert 0 <= y1 < y2 <= h and 0 <= x1 < x2 <= w
        if crop:
            assert y2 - y1 == min(crop, h) and x2 - x1 == min(crop, w)
        covered[y1:y2, x1:x2] += 1
    assert covered.min() >= 1


def test_window_count_matches_mmseg_grid():
    # rows/cols = max(size - crop + stride - 1, 0) // stride + 1
    assert len(window_boxes(448, 597, 448, 224)) == 1 * 2
    assert len(window_boxes(336, 448, 224, 112)) == 2 * 3
    assert len(window_boxes(1024, 2048, 224, 224)) == 5 * 10


@pytest.mark.parametrize(
    ("h", "w", "expected"), [(448, 448, (0, 0, 0, 0)), (100, 90, (3, 3, 6, 6)), (17, 31, (0, 1, 7, 8))]
)
def test_pad_sizes_symmetric_extra_right_bottom(h, w, expected):
    assert pad_sizes(h, w, 16) == expected
    left, right, top, bottom = pad_sizes(h, w, 16)
    assert (h + top + bottom) % 16 == 0 and (w + left + right) % 16 == 0


def _naive(logits, size, q2c, scale, prob_thd, area_thd):
    """Full-resolution reference: resize everything, softmax, synonym max, area and probability thresholds."""
    full = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0] * scale
    probs = full.softmax(0)
    n = max(q2c) + 1
    probs = torch.stack([probs[[i for i, c in enumerate(q2c) if c == k]].max(0).values for k in range(n)])
    if area_thd:
        counts = torch.bincount(probs.argmax(0).flatten(), minlength=n)[1:].float()
        keep = (counts > area_thd * counts.sum()).float()
        probs[1:] *= keep[:, None, None]
    top, labels = probs.max(0)
    labels[top < prob_thd] = 0
    return labels, probs


@pytest.mark.parametrize(
    ("size", "q2c", "prob_thd", "area_thd", "tile"),
    list(
        itertools.product(
            [(37, 53), (9, 7), (64, 16)], [[0, 1, 2, 3], [0, 0, 1, 2, 2]], [0.0, 0.4], [None, 0.2], [50, 1 << 24]
        )
    ),
)
def test_tiled_reduction_equals_full_resolution(size, q2c, prob_thd, area_thd, tile):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(q2c), 11, 13, generator=gen) * 0.2
    expected_labels, expected_probs = _naive(logits, size, q2c, 10.0, prob_thd, area_thd)
    out = reduce_logits(logits, size, q2c, 10.0, prob_thd, area_thd, return_probs=True, tile_elements=tile)
    assert torch.equal(out.labels, expected_labels)
    assert (out.probs - expected_probs).abs().max() < 1e-5


def test_without_a_background_thresholds_leave_pixels_unlabeled_and_weigh_every_class():
    """``prob_thd`` sends uncertain pixels to -1 rather than to the first class; ``area_thd`` may drop class 0."""
    logits = torch.zeros(3, 4, 4)
    logits[0, :, :2] = 1.0  # class 0 sure on the left half
    logits[1, :, 2:] = 0.01  # the right half: nearly uniform, uncertain
    logits[2, 0, 3] = 1.0  # class 2 on one pixel
    with_background = reduce_logits(logits, (4, 4), [0, 1, 2], 10.0, prob_thd=0.5)
    without = reduce_logits(logits, (4, 4), [0, 1, 2], 10.0, prob_thd=0.5, background=False)
    assert (with_background.labels[:, 2:] == 0).sum() == 7 and without.labels[0, 3] == 2
    assert (without.labels[:, 2:] == -1).sum() == 7 and (without.labels[:, :2] == 0).all()
    # area_thd: with a background class 0 is never dropped; without one, the small classes are dropped
    # whichever they are (here class 2, 1 of 16 pixels), and the first class is weighed like the others.
    tiny_first = logits[[2, 1, 0]]
    kept = reduce_logits(tiny_first, (4, 4), [0, 1, 2], 10.0, area_thd=0.1).labels
    dropped = reduce_logits(tiny_first, (4, 4), [0, 1, 2], 10.0, area_thd=0.1, background=False).labels
    assert kept[0, 3] == 0 and dropped[0, 3] != 0 and not (dropped == 0).any()
    everything = reduce_logits(logits, (4, 4), [0, 1, 2], 10.0, area_thd=0.9, background=False).labels
    assert (everything == 0).all()  # every class under the threshold: the largest is kept


def test_label_refinement_sees_no_negative_label():
    class Closing:
        def refine_labels(self, labels, contexts):
            assert labels.min() >= 0  # e.g. a bincount or a uint8 morphological closing
            return torch.where(labels == 1, 3, labels)  # the unlabeled value (3 classes: 3) spreads

    from gclip.inference.postprocess import refine_labels

    labels = torch.tensor([[0, -1], [1, 2]])
    assert refine_labels(Closing(), labels, [], 3).tolist() == [[0, -1], [-1, 2]]


def test_pamr_keeps_constant_logits_and_smooths_within_regions():
    image = torch.zeros(1, 3, 40, 40)
    image[:, :, :, 20:] = 1.0  # two flat regions
    constant = torch.full((1, 2, 40, 40), 0.3)
    assert torch.allclose(pamr(image, constant, steps=3, dilations=(1, 2)), constant, atol=1e-6)
    noisy = torch.zeros(1, 2, 40, 40)
    noisy[:, 0, :, :20], noisy[:, 1, :, 20:] = 1.0, 1.0
    noisy[:, :, 10, 10] = torch.tensor([0.0, 1.0])  # one wrong pixel inside the left region
    refined = pamr(image, noisy, steps=10, dilations=(1, 2))
    assert refined[0, :, 10, 10].argmax() == 0  # fixed from its neighbours of the same colour
    assert refined[0, 0, 20:, 25:].max() < 0.05  # the boundary is respected


def test_resize_is_mmcv_bilinear_half_pixel_with_replicated_border():
    """OpenCV INTER_LINEAR, as mmcv's imresize: source x = (x + 0.5) * in / out - 0.5, clamped to the border."""
    row = np.array([[[0, 0, 0], [255, 255, 255]]], dtype=np.uint8)  # 1 x 2, black then white
    assert resize_image(row, (1, 4))[..., 1].tolist() == [[0, 64, 191, 255]]
    image = np.random.default_rng(0).integers(0, 256, size=(7, 9, 3), dtype=np.uint8)
    assert resize_image(image, (7, 9)) is image
    out = resize_image(image, (11, 5))
    assert out.shape == (11, 5, 3) and out.dtype == np.uint8


def test_preprocessing_does_not_depend_on_the_thread_count():
    """The same image must give the same tensor in the main process and in single-threaded decoding workers
    (a float32 resize rounded to 8 bits changed 5 values of this image between 1 and 2 threads)."""
    from PIL import Image

    small = np.random.default_rng(1).integers(0, 256, size=(23, 31, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(small).resize((500, 375), Image.BILINEAR))  # smooth, like a photo
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 4):
            torch.set_num_threads(threads)
            outs.append(normalise(resize_image(image, rescale_size(375, 500, 448, 2048)), (0.5,) * 3, (0.25,) * 3))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    assert outs[0].shape == (3, 448, 597) and outs[0].dtype == torch.float32
    assert single_threaded_opencv().getNumThreads() == 1

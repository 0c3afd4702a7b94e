"""Known-answer tests of the mmseg IoU metric: areas per image, sums, mIoU / aAcc."""

from __future__ import annotations

import numpy as np
import pytest

from gclip.evaluation import Areas, image_areas, reduce_zero_label, summarize

I = 255  # ignore index  # noqa: E741


@pytest.mark.parametrize(
    "pred, label, n, expected",
    [
        # perfect prediction
        (
            [[0, 1], [2, 2]],
            [[0, 1], [2, 2]],
            3,
            dict(intersect=[1, 1, 2], union=[1, 1, 2], pred=[1, 1, 2], label=[1, 1, 2]),
        ),
        # ignore pixels are dropped whatever is predicted there
        ([[0, 1], [1, 1]], [[0, 1], [0, I]], 2, dict(intersect=[1, 1], union=[2, 2], pred=[1, 2], label=[2, 1])),
        # a class only predicted: union from the prediction alone, no label area
        (
            [[2, 2], [0, 0]],
            [[0, 0], [0, 0]],
            3,
            dict(intersect=[2, 0, 0], union=[4, 0, 2], pred=[2, 0, 2], label=[4, 0, 0]),
        ),
        # label values outside 0..C-1 (not the ignore index) count in no class, but their predictions do
        ([[0, 0]], [[0, 7]], 2, dict(intersect=[1, 0], union=[2, 0], pred=[2, 0], label=[1, 0])),
        # everything ignored
        ([[0, 1]], [[I, I]], 2, dict(intersect=[0, 0], union=[0, 0], pred=[0, 0], label=[0, 0])),
    ],
)
def test_image_areas_known_answers(pred, label, n, expected):
    areas = image_areas(np.array(pred), np.array(label), n)
    for key, value in expected.items():
        assert getattr(areas, key).tolist() == value, key


def test_summary_nanmean_over_classes_with_union():
    # class 0: 3/4 IoU, class 1: 1/2, class 2: absent everywhere (excluded), class 3: predicted only (IoU 0)
    pred = np.array([[0, 0, 0, 1, 1, 3]])
    label = np.array([[0, 0, 0, 0, 1, I]])
    label[0, 5] = 1  # the class-3 prediction lies on a class-1 pixel
    s = summarize(image_areas(pred, label, 4))
    assert s["IoU"] == [75.0, pytest.approx(100 / 3, abs=0.005), None, 0.0]
    assert s["mIoU"] == round((0.75 + 1 / 3 + 0.0) / 3 * 100, 2)
    assert s["aAcc"] == round(4 / 6 * 100, 2)
    assert s["Acc"][2] is None and s["Acc"][3] is None


def test_perfect_prediction_is_100():
    rng = np.random.default_rng(0)
    label = rng.integers(0, 5, size=(17, 23))
    label[:3] = I
    s = summarize(image_areas(label.copy(), label, 5))
    assert s["mIoU"] == 100.0 and s["aAcc"] == 100.0


def test_reduce_zero_label_then_score():
    raw = np.array([[0, 1, 2], [3, I, 1]])
    reduced = reduce_zero_label(raw)
    assert reduced.tolist() == [[I, 0, 1], [2, I, 0]]
    pred = np.array([[2, 0, 1], [1, 0, 0]])  # pixels 0 and 4 are ignored whatever is predicted
    a = image_areas(pred, reduced, 3)
    assert a.intersect.tolist() == [2, 1, 0]
    assert a.label.tolist() == [2, 1, 1]
    assert a.pred.tolist() == [2, 2, 0]
    assert summarize(a)["IoU"] == [100.0, 50.0, 0.0]
    assert summarize(a)["mIoU"] == 50.0


def test_sums_over_images_equal_one_big_image():
    rng = np.random.default_rng(1)
    preds = [rng.integers(0, 4, size=(5, 7)) for _ in range(3)]
    labels = [np.where(rng.random((5, 7)) < 0.1, I, rng.integers(0, 4, size=(5, 7))) for _ in range(3)]
    total = Areas.zeros(4)
    for p, lab in zip(preds, labels):
        total += image_areas(p, lab, 4)
    big = image_areas(np.concatenate(preds), np.concatenate(labels), 4)
    assert (total.stack() == big.stack()).all()
    assert (Areas.from_stack(total.stack()).stack() == total.stack()).all()


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differs"):
        image_areas(np.zeros((2, 3), int), np.zeros((3, 2), int), 2)

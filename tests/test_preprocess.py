"""The one preprocessor: OpenAI's pixel constants at the peers' three decimals, picklable for workers."""

from __future__ import annotations

import numpy as np
import torch

from gclip import Segmenter
from gclip.inference.preprocess import Preprocessor, normalise, pixel_constants


def test_openai_constants_are_the_peers_three_decimals():
    mean, std = pixel_constants((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert mean == (122.771, 116.746, 104.094) and std == (68.501, 66.632, 70.323)
    image = np.full((2, 2, 3), 200, dtype=np.uint8)
    out = normalise(image, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
    assert torch.allclose(
        out[:, 0, 0],
        torch.tensor([(200 - 122.771) / 68.501, (200 - 116.746) / 66.632, (200 - 104.094) / 70.323]),
        rtol=0,
        atol=1e-6,
    )
    assert pixel_constants((0.5,) * 3, (0.5,) * 3) == ((127.5,) * 3, (127.5,) * 3)


def test_the_segmenter_owns_a_picklable_preprocessor(tiny_model, rgb_image):
    import pickle

    seg = Segmenter(tiny_model, method="clip", short_side=40)
    pre = pickle.loads(pickle.dumps(seg.preprocessor))
    assert isinstance(pre, Preprocessor) and pre.short_side == 40
    a, b = seg.prepare(rgb_image), pre(rgb_image)
    assert torch.equal(a.image, b.image) and a.size == b.size

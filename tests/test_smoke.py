import gclip
from conftest import TINY


def test_tiny_segmenter_runs(tiny_model, rgb_image):
    seg = gclip.Segmenter(tiny_model, method="gclip", short_side=0, crop=32, stride=16)
    seg.set_classes(["cat", "dog", "sky"])
    result = seg.predict(rgb_image)
    assert result.labels.shape == rgb_image.shape[:2]
    assert result.labels.min() >= 0 and result.labels.max() < 3
    assert TINY == tiny_model.name

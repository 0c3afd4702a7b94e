"""The centre-crop evaluation protocol (CLIPtrase's): the image AND its ground truth are resized so the short side
is ``size`` and cut to the central ``size x size`` square; the model then sees that square only.

Both steps are torchvision's on PIL images, as the authors' evaluation runs them: ``Resize(size)`` (bicubic for
the image, nearest for the labels; the long side becomes ``int(size * long / short)``) then ``CenterCrop(size)``
(top-left corner at ``round((h - size) / 2)``).
"""

from __future__ import annotations

import numpy as np

__all__ = ["centre_crop_image", "centre_crop_label"]


def _crop(image, size: int, interpolation):
    from torchvision.transforms import functional as F

    return F.center_crop(F.resize(image, size, interpolation=interpolation), [size, size])


def centre_crop_image(array: np.ndarray, size: int) -> np.ndarray:
    """``HxWx3 uint8 RGB`` -> the ``size x size`` centre square after a bicubic short-side resize."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    return np.asarray(_crop(Image.fromarray(array), size, InterpolationMode.BICUBIC))


def centre_crop_label(label: np.ndarray, size: int) -> np.ndarray:
    """``(H, W)`` integer labels -> the matching ``size x size`` square (nearest), as int32."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode

    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))  # mode "I": any label value survives
    return np.asarray(_crop(image, size, InterpolationMode.NEAREST)).astype(np.int32)

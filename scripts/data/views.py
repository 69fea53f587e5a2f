"""Transforms that build UniMatch's views of an image: a padding mask, strong photometric views, CutMix boxes.

All randomness comes from each transform's own ``self.R`` (MONAI ``Randomizable``), so ``set_random_state`` on
the pipeline makes an epoch reproducible, which exact resume relies on.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import torch
import torchvision.transforms.v2.functional as TF
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform

__all__ = ["AddValidMaskd", "RandStrongAugmentd", "RandCutMixBoxd"]


class AddValidMaskd(MapTransform):
    """Adds ``valid_key``: a 1 x H x W mask of ones; spatial transforms then pad it with 0 where the image is padded.

    Args:
        keys: the image whose spatial size the mask takes. Defaults to ``"image"``.
        valid_key: name of the new mask. Defaults to ``"valid"``.
    """

    def __init__(self, keys: KeysCollection = "image", valid_key: str = "valid"):
        super().__init__(keys)
        self.valid_key = valid_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        key = self.first_key(d)
        image = d[key]
        d[self.valid_key] = torch.ones((1, *image.shape[1:]), dtype=torch.float32)
        return d


class RandStrongAugmentd(RandomizableTransform, MapTransform):
    """The strong view: colour jitter, random greyscale and Gaussian blur of an RGB image on the 0..255 scale.

    Each key gets independent draws. Defaults follow docs/method.md, "Data streams and views".

    Args:
        keys: image keys to augment.
        brightness, contrast, saturation: jitter strengths (factor drawn from [1 - s, 1 + s]). Defaults to 0.5.
        hue: hue jitter (shift drawn from [-hue, hue]). Defaults to 0.25.
        jitter_prob: probability of colour jitter. Defaults to 0.8.
        grayscale_prob: probability of greyscale. Defaults to 0.2.
        blur_sigma: range of the Gaussian blur sigma in pixels. Defaults to (0.1, 2.0).
        blur_prob: probability of blur. Defaults to 0.5.
    """

    def __init__(self, keys: KeysCollection, brightness: float = 0.5, contrast: float = 0.5, saturation: float = 0.5,
                 hue: float = 0.25, jitter_prob: float = 0.8, grayscale_prob: float = 0.2,
                 blur_sigma: Sequence[float] = (0.1, 2.0), blur_prob: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob=1.0)
        if not 0.0 <= hue <= 0.5:
            raise ValueError(f"hue={hue} must be in [0, 0.5].")
        self.strengths = {"brightness": brightness, "contrast": contrast, "saturation": saturation}
        self.hue = hue
        self.jitter_prob, self.grayscale_prob, self.blur_prob = jitter_prob, grayscale_prob, blur_prob
        self.blur_sigma = tuple(blur_sigma)

    def _augment(self, image: torch.Tensor) -> torch.Tensor:
        img = (image.as_tensor() if hasattr(image, "as_tensor") else image).float().div(255.0).clamp(0.0, 1.0)
        if self.R.rand() < self.jitter_prob:
            order = self.R.permutation(4)
            factors = {name: self.R.uniform(max(0.0, 1 - s), 1 + s) for name, s in self.strengths.items()}
            shift = self.R.uniform(-self.hue, self.hue)
            for op in order:
                if op == 0:
                    img = TF.adjust_brightness(img, factors["brightness"])
                elif op == 1:
                    img = TF.adjust_contrast(img, factors["contrast"])
                elif op == 2:
                    img = TF.adjust_saturation(img, factors["saturation"])
                else:
                    img = TF.adjust_hue(img, shift)
        if self.R.rand() < self.grayscale_prob:
            img = TF.rgb_to_grayscale(img, num_output_channels=3)
        if self.R.rand() < self.blur_prob:
            sigma = float(self.R.uniform(*self.blur_sigma))
            kernel = 2 * math.ceil(3 * sigma) + 1
            img = TF.gaussian_blur(img, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
        return img.mul(255.0)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._augment(d[key])
        return d


class RandCutMixBoxd(RandomizableTransform, MapTransform):
    """Adds a 1 x H x W CutMix box mask (1 inside the box) under each of ``keys``; all zeros with probability 1 - prob.

    Args:
        keys: names of the box masks to add, e.g. ``["box1", "box2"]``.
        reference_key: the image whose size the boxes take. Defaults to ``"image"``.
        prob: probability of a box. Defaults to 0.5.
        area: range of the box area as a fraction of the image. Defaults to (0.02, 0.4).
        aspect: range of the box aspect ratio. Defaults to (0.3, 1 / 0.3).
    """

    def __init__(self, keys: KeysCollection, reference_key: str = "image", prob: float = 0.5,
                 area: Sequence[float] = (0.02, 0.4), aspect: Sequence[float] = (0.3, 1 / 0.3)):
        MapTransform.__init__(self, keys, allow_missing_keys=True)
        RandomizableTransform.__init__(self, prob=prob)
        self.reference_key = reference_key
        self.area, self.aspect = tuple(area), tuple(aspect)

    def _box(self, height: int, width: int) -> torch.Tensor:
        box = torch.zeros((1, height, width), dtype=torch.float32)
        if self.R.rand() >= self.prob:
            return box
        for _ in range(100):  # redraw until the box fits, as a box larger than the image has no meaning
            area = self.R.uniform(*self.area) * height * width
            ratio = self.R.uniform(*self.aspect)
            box_h, box_w = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
            if 0 < box_h <= height and 0 < box_w <= width:
                top = self.R.randint(0, height - box_h + 1)
                left = self.R.randint(0, width - box_w + 1)
                box[:, top:top + box_h, left:left + box_w] = 1.0
                break
        return box

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict:
        d = dict(data)
        height, width = d[self.reference_key].shape[-2:]
        for key in self.keys:
            d[key] = self._box(int(height), int(width))
        return d

"""Constants of the image views, shared by the host-side augmentation
(`declip_keras.data.augment`, TF ops) and the device-side one
(`declip_keras.models.layers.PhotometricAugmentation`, Keras ops): the
normalisation, the luma weights, the augmentation names and the blur size.
Imports nothing heavy, so the command line can offer the names before Keras
loads."""

from __future__ import annotations

import math

# Image files that training data are read from, by suffix, with the
# img2dataset field their bytes are stored under in a shard.
IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}
# Evaluation folders also take what TensorFlow's image decoder reads besides.
EVAL_IMAGE_SUFFIXES = (*IMAGE_SUFFIXES, ".bmp", ".gif")

# Every image view is normalised with ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma, as torchvision's grayscale.
LUMA = (0.299, 0.587, 0.114)

# Image augmentations of the training views (`declip_keras.data.augment`):
# MoCo v2's (DeCLIP's), crop-only (plain CLIP's in the released code) and
# MoCo v2's without the mirror, for data a flip changes (digits, text).
AUGMENTATIONS = ("mocov2", "crop", "mocov2-noflip")


def default_augmentation(declip: bool) -> str:
    """The released choice per method: MoCo v2's for DeCLIP, crop for CLIP."""
    return AUGMENTATIONS[0] if declip else AUGMENTATIONS[1]


def blur_radius(size: int) -> int:
    """Taps on each side of the Gaussian blur of a `size`-px view: three of
    the largest sigma (2 px at 224 px, scaled with the view)."""
    return max(1, math.ceil(3 * 2.0 * size / 224))

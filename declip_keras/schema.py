"""Names shared by the input pipeline, the model and the configuration.

A training batch is a dict of the keys below; `declip_keras.data` makes it,
`declip_keras.synthetic` imitates it and `DeCLIP` reads it. This module imports
nothing heavy, so the command line can use it before Keras loads.
"""

from __future__ import annotations

import math

# Two augmented views of each image, `[B, S, S, 3]` float32.
IMAGE_1 = "image_1"
IMAGE_2 = "image_2"
# The caption (MLM-masked when MLM is on) and its EDA-augmented copy, `[B, L]`.
TOKEN_IDS = "token_ids"
EDA_TOKEN_IDS = "eda_token_ids"
# MLM targets, `[B, M]`: where the masked tokens are, their original ids, and
# 1 for a real target or 0 for an empty slot.
MASK_POSITIONS = "mask_positions"
MASK_IDS = "mask_ids"
MASK_WEIGHTS = "mask_weights"
# Optional, `[B, M]` int32: the caption (row of the batch one step sees) each
# target belongs to. Absent, row b's targets are caption b's, as
# `declip_keras.masking.mask_tokens` lays them out; `pack_targets` fills rows
# with any caption's targets, so that hardly a slot is empty.
MASK_ROWS = "mask_rows"

# With device-side augmentation, each view's photometric parameters, float32
# `[B, PHOTOMETRIC_SIZE]`; the view is then an un-normalised crop in [0, 1] and
# the model applies them (`declip_keras.layers.PhotometricAugmentation`). A row
# holds the fused colour map, 3x3 row-major and already divided by the ImageNet
# std; the coefficient of the view's mean luma in the colour offset; the blur
# sigma in pixels (0: no blur); and 1 to flip left-right, else 0.
IMAGE_1_PHOTOMETRIC = "image_1_photometric"
IMAGE_2_PHOTOMETRIC = "image_2_photometric"
PHOTOMETRIC_SIZE = 12

IMAGE_VIEWS = (IMAGE_1, IMAGE_2)
PHOTOMETRIC = {IMAGE_1: IMAGE_1_PHOTOMETRIC, IMAGE_2: IMAGE_2_PHOTOMETRIC}
TEXT_VIEWS = (TOKEN_IDS, EDA_TOKEN_IDS)
MLM_TARGETS = (MASK_POSITIONS, MASK_IDS, MASK_WEIGHTS)

# DeCLIP's token layout: CLIP's 49,406 BPE tokens, then mask, start and end as
# the three largest ids, so that argmax(token_ids) is the end-of-text position.
# Padding is id 0, as in CLIP.
VOCABULARY_SIZE = 49409
MASK_TOKEN_ID = 49406
START_TOKEN_ID = 49407
END_TOKEN_ID = 49408

# The figures of an evaluation during training, as logged (progress line,
# TensorBoard, `--keep-best`): `<task>_<metric>` of `evaluation.evaluate`'s
# results, with "@" dropped (TensorBoard's names cannot hold it).
EVAL_METRICS = {
    "zero_shot": ("top1", "top5", "mean_per_class_recall"),
    "retrieval": tuple(
        f"{direction}_R@{k}"
        for direction in ("image_to_text", "text_to_image")
        for k in (1, 5, 10)
    ),
    "linear_probe": ("test_accuracy",),
}


def eval_metric_name(task: str, metric: str) -> str:
    """The logged name of one evaluation figure, e.g. `zero_shot_top1`."""
    return f"{task}_{metric}".replace("@", "")


# Every image view is normalised with ImageNet's statistics.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# ITU-R 601 luma, as torchvision's grayscale.
LUMA = (0.299, 0.587, 0.114)

# Image augmentations of the training views (`declip_keras.augment`):
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

"""Names shared by the input pipeline, the model and the configuration.

A training batch is a dict of the keys below; `declip_keras.data` makes it,
`declip_keras.synthetic` imitates it and `DeCLIP` reads it. This module imports
nothing heavy, so the command line can use it before Keras loads.
"""

from __future__ import annotations

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

IMAGE_VIEWS = (IMAGE_1, IMAGE_2)
TEXT_VIEWS = (TOKEN_IDS, EDA_TOKEN_IDS)
MLM_TARGETS = (MASK_POSITIONS, MASK_IDS, MASK_WEIGHTS)

# DeCLIP's token layout: CLIP's 49,406 BPE tokens, then mask, start and end as
# the three largest ids, so that argmax(token_ids) is the end-of-text position.
# Padding is id 0, as in CLIP.
VOCABULARY_SIZE = 49409
MASK_TOKEN_ID = 49406
START_TOKEN_ID = 49407
END_TOKEN_ID = 49408

# Image augmentations of the training views (`declip_keras.augment`):
# MoCo v2's (DeCLIP's) and crop-only (plain CLIP's in the released code).
AUGMENTATIONS = ("mocov2", "crop")


def default_augmentation(declip: bool) -> str:
    """The released choice per method: MoCo v2's for DeCLIP, crop for CLIP."""
    return AUGMENTATIONS[0] if declip else AUGMENTATIONS[1]

"""What a training batch holds: its keys, their shapes and the token layout.

A training batch is a dict of the keys below; `declip_keras.data.pipeline`
makes it, `declip_keras.data.synthetic` imitates it and `DeCLIP` reads it.
This module imports nothing, so the command line can use it before Keras loads.
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
# Optional, `[B, M]` int32: the caption (row of the batch one step sees) each
# target belongs to. Absent, row b's targets are caption b's, as
# `declip_keras.data.masking.mask_tokens` lays them out; `pack_targets` fills rows
# with any caption's targets, so that hardly a slot is empty.
MASK_ROWS = "mask_rows"

# With device-side augmentation, each view's photometric parameters, float32
# `[B, PHOTOMETRIC_SIZE]`; the view is then an un-normalised crop in [0, 1] and
# the model applies them (`declip_keras.models.layers.PhotometricAugmentation`). A row
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

"""Random DeCLIP batches of the right structure, for smoke tests and examples."""

from __future__ import annotations

import numpy as np

from declip_keras.data import batch_format


def synthetic_batch(
    batch_size: int,
    image_size: int,
    context_length: int,
    vocabulary_size: int,
    num_masked: int = 4,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """A batch dict that `DeCLIP` consumes, filled with random values.

    Captions are `start, words..., end` followed by padding (id 0, as in CLIP),
    with the special ids at the top of the vocabulary. If `vocabulary_size` is
    smaller than DeCLIP's, the three largest ids of it play mask, start and end.
    `num_masked - 1` positions per caption are replaced by the mask id.

    Returns:
        numpy arrays: `image_1`, `image_2` `[B, S, S, 3]` float32; `token_ids`,
        `eda_token_ids` `[B, L]` int32; `mask_positions`, `mask_ids` int32 and
        `mask_weights` float32, `[B, num_masked]`.
    """
    rng = np.random.default_rng(seed)
    offset = batch_format.VOCABULARY_SIZE - vocabulary_size
    mask_id, start_id, end_id = (
        t - offset
        for t in (
            batch_format.MASK_TOKEN_ID,
            batch_format.START_TOKEN_ID,
            batch_format.END_TOKEN_ID,
        )
    )
    if not 2 <= num_masked < context_length - 2:
        raise ValueError("num_masked must leave room for start and end tokens.")

    def captions() -> np.ndarray:
        ids = np.zeros((batch_size, context_length), np.int32)
        for row in ids:
            length = rng.integers(num_masked + 1, context_length - 1)
            row[0] = start_id
            row[1 : length + 1] = rng.integers(1, mask_id, length)
            row[length + 1] = end_id
        return ids

    token_ids = captions()
    # Like `masking.mask_tokens`' output: the last slot is empty
    # (position 0, id 0, weight 0), so that the weighting is exercised.
    real = num_masked - 1
    positions = np.zeros((batch_size, num_masked), np.int32)
    positions[:, :real] = [
        1 + rng.permutation(real + 1)[:real] for _ in range(batch_size)
    ]
    mask_ids = np.take_along_axis(token_ids, positions, axis=1)
    mask_ids[:, real:] = 0
    np.put_along_axis(token_ids, positions[:, :real], mask_id, axis=1)
    weights = np.zeros((batch_size, num_masked), np.float32)
    weights[:, :real] = 1.0
    shape = (batch_size, image_size, image_size, 3)
    return {
        batch_format.IMAGE_1: rng.standard_normal(shape, dtype=np.float32),
        batch_format.IMAGE_2: rng.standard_normal(shape, dtype=np.float32),
        batch_format.TOKEN_IDS: token_ids,
        batch_format.EDA_TOKEN_IDS: captions(),
        batch_format.MASK_POSITIONS: positions,
        batch_format.MASK_IDS: mask_ids,
        batch_format.MASK_WEIGHTS: weights,
    }

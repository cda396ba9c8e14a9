"""Masked-language-model targets as the released DeCLIP code draws them, in TF ops.

Every token that is not special (padding, start, end, mask) is selected
independently with probability `rate` (0.15); of the selected tokens 80%
become the mask token, 10% a random ordinary token and 10% stay as they are.
A caption of n ordinary tokens therefore has nothing masked with probability
`(1 - rate) ** n`, as in the released code.

keras-hub's `MaskedLMMaskGenerator` is not used here on purpose: inside a
`tf.data` graph it selects exactly `ceil(rate * n)` tokens per caption, so
every short caption loses at least one token (on 3-token captions a third of
the words instead of 15%), and the contrastive terms, which embed the masked
caption, lose the words that carry the class. The output keeps its layout
(`mask_positions`, `mask_ids`, `mask_weights`), which the model consumes.

All draws are stateless and seeded per batch, so a resumed stream repeats the
masks of the uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorflow as tf

from declip_keras.data import batch_format

MLM_RATE = 0.15


def mlm_selection_length(context_length: int, rate: float = MLM_RATE) -> int:
    """Target slots per caption `M`: more than a Bernoulli draw almost ever needs.

    The mean plus four standard deviations of Binomial(context_length, rate):
    a caption of 75 ordinary tokens overflows its 25 slots with probability
    below 1e-4. Selections past `M` are left unmasked (never scored without
    being masked, nor masked without being scored).
    """
    mean = rate * context_length
    spread = math.sqrt(context_length * rate * (1 - rate))
    return max(1, min(context_length, math.ceil(mean + 4 * spread)))


def mask_tokens(
    token_ids,
    seed,
    special_token_ids: Sequence[int],
    *,
    rate: float = MLM_RATE,
    mask_token_rate: float = 0.8,
    random_token_rate: float = 0.1,
    selection_length: int | None = None,
) -> dict:
    """Selects and corrupts MLM targets in a batch of packed captions.

    Args:
        token_ids: int `[B, L]`, packed captions (start, tokens, end, padding).
        seed: int `[2]`, seed of the stateless draws (one per batch).
        special_token_ids: ids never selected; the mask token must be the
            first. Random replacements are drawn from the ids below the
            smallest special id, where DeCLIP's layout keeps the ordinary
            tokens, so a replacement never outranks the end token.
        rate: per-token selection probability.
        mask_token_rate, random_token_rate: shares of the selected tokens
            replaced by the mask token and by a random token; the rest stay.
        selection_length: target slots `M` per caption (default:
            `mlm_selection_length(L, rate)`).

    Returns:
        A dict with `token_ids` `[B, L]` (corrupted), and `mask_positions`,
        `mask_ids` (the original tokens), `mask_weights` (1.0 for a target,
        0.0 for an empty slot), each `[B, M]`.

    Example:
    >>> ids = tf.constant([[49407, 320, 1125, 539, 49408, 49408]])
    >>> out = mask_tokens(ids, tf.constant([0, 1]), [49406, 49407, 49408])
    >>> sorted(out)
    ['mask_ids', 'mask_positions', 'mask_weights', 'token_ids']
    """
    token_ids = tf.convert_to_tensor(token_ids)
    length = token_ids.shape[-1]
    slots = selection_length or mlm_selection_length(length, rate)
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    shape = tf.shape(token_ids)
    special = tf.reduce_any(
        token_ids[..., None] == tf.constant(list(special_token_ids), token_ids.dtype),
        axis=-1,
    )
    selected = tf.logical_and(
        ~special, tf.random.stateless_uniform(shape, seeds[0]) < rate
    )
    # Keep the first `slots` selections of each caption.
    selected = tf.logical_and(
        selected, tf.cumsum(tf.cast(selected, tf.int32), axis=-1) <= slots
    )

    action = tf.random.stateless_uniform(shape, seeds[1])
    to_mask = tf.logical_and(selected, action < mask_token_rate)
    to_random = tf.logical_and(
        selected,
        tf.logical_and(
            action >= mask_token_rate, action < mask_token_rate + random_token_rate
        ),
    )
    random_ids = tf.random.stateless_uniform(
        shape,
        seeds[2],
        minval=0,
        maxval=min(special_token_ids),
        dtype=token_ids.dtype,
    )
    mask_id = tf.cast(special_token_ids[0], token_ids.dtype)
    corrupted = tf.where(to_mask, mask_id, tf.where(to_random, random_ids, token_ids))

    # Selected positions first, in caption order, then the unselected ones.
    index = tf.range(length)
    order = tf.where(selected, index, index + length)
    positions = tf.argsort(order, axis=-1, stable=True)[..., :slots]
    weights = tf.cast(tf.gather(selected, positions, batch_dims=1), tf.float32)
    positions = positions * tf.cast(weights > 0, positions.dtype)
    targets = tf.gather(token_ids, positions, batch_dims=1)
    return {
        batch_format.TOKEN_IDS: corrupted,
        batch_format.MASK_POSITIONS: positions,
        batch_format.MASK_IDS: targets * tf.cast(weights > 0, targets.dtype),
        batch_format.MASK_WEIGHTS: weights,
    }


def pack_targets(targets: dict, groups: int = 1) -> dict:
    """Lays a batch's MLM targets out k per row, with k as small as holds them.

    `mask_tokens` keeps caption b's targets in row b, so every row has as many
    slots as the busiest caption needs while most captions have one or two
    targets: most slots are empty, yet each costs a row of logits over the
    whole vocabulary. Here each of `groups` equal slices of the batch puts
    its targets in caption order, k per row, and `mask_rows` names each one's
    caption within the slice. Under `tf.distribute` a replica's step sees one
    slice of the batch, so `groups` must be the replica count there (1 where
    a step sees the whole batch: one device, JAX's data parallelism, a
    torchrun process). Exact: the same targets, each once.

    Args:
        targets: `mask_positions`, `mask_ids`, `mask_weights`, each `[B, M]`,
            targets first in each row (as `mask_tokens` makes them).
        groups: slices of the batch; must divide B.

    Returns:
        `mask_rows`, `mask_positions`, `mask_ids`, `mask_weights`, each
        `[B, k]`, k the fewest slots (at least 1) holding the targets of the
        slice with the most; empty slots have row, position, id and weight 0.

    Example:
    >>> weights = tf.constant([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    >>> out = pack_targets({"mask_positions": tf.constant([[1, 2, 4], [3, 0, 0]]),
    ...                     "mask_ids": tf.constant([[7, 8, 9], [6, 0, 0]]),
    ...                     "mask_weights": weights})
    >>> out["mask_rows"].numpy().tolist(), out["mask_positions"].numpy().tolist()
    ([[0, 0], [0, 1]], [[1, 2], [4, 3]])
    """
    weights = targets[batch_format.MASK_WEIGHTS]
    batch, slots = tf.shape(weights)[0], tf.shape(weights)[1]
    captions = batch // groups
    per_group = captions * slots

    def grouped(x):
        return tf.reshape(x, [groups, per_group])

    selected = grouped(weights) > 0
    most = tf.reduce_max(tf.reduce_sum(tf.cast(selected, tf.int32), axis=-1))
    kept = tf.maximum(1, (most + captions - 1) // captions) * captions
    index = tf.range(per_group)
    # Each slice's targets first, in caption order.
    order = tf.argsort(tf.where(selected, index, index + per_group), stable=True)
    order = order[:, :kept]
    is_target = tf.gather(selected, order, batch_dims=1)

    def packed(values):
        values = tf.where(is_target, values, tf.zeros_like(values))
        return tf.reshape(values, [batch, -1])

    return {
        batch_format.MASK_ROWS: packed(order // slots),
        **{
            key: packed(tf.gather(grouped(targets[key]), order, batch_dims=1))
            for key in batch_format.MLM_TARGETS
        },
    }

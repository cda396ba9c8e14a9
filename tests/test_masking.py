"""MLM target selection against a direct reading of the released rule."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from declip_keras.data.masking import mask_tokens, mlm_selection_length, pack_targets

pytestmark = pytest.mark.backend_independent
MASK, START, END = 97, 98, 99
SPECIAL = [MASK, START, END]


def packed(lengths, context: int = 40) -> np.ndarray:
    """Captions of `lengths` ordinary tokens (ids 0..96), padded with END."""
    rng = np.random.default_rng(0)
    ids = np.full((len(lengths), context), END, np.int32)
    for row, n in enumerate(lengths):
        ids[row, 0] = START
        ids[row, 1 : n + 1] = rng.integers(0, MASK, n)
    return ids


def test_same_seed_same_masks_other_seed_other_masks():
    ids = packed([30] * 16)
    a = mask_tokens(ids, tf.constant([1, 2]), SPECIAL)
    b = mask_tokens(ids, tf.constant([1, 2]), SPECIAL)
    c = mask_tokens(ids, tf.constant([1, 3]), SPECIAL)
    for key in a:
        np.testing.assert_array_equal(a[key].numpy(), b[key].numpy())
    assert not np.array_equal(a["mask_weights"].numpy(), c["mask_weights"].numpy())


def test_rates_on_long_captions_and_layout():
    ids = packed([38] * 400)  # 15,200 ordinary tokens
    out = mask_tokens(ids, tf.constant([0, 0]), SPECIAL)
    out = {key: value.numpy() for key, value in out.items()}
    weights, positions = out["mask_weights"], out["mask_positions"]
    assert weights.shape == (400, mlm_selection_length(40))
    rate = weights.sum() / 15_200
    assert abs(rate - 0.15) < 0.01  # standard error 0.003
    # Targets first in caption order, empty slots at position 0 with id 0.
    for row in range(400):
        count = int(weights[row].sum())
        assert np.all(np.diff(positions[row, :count]) > 0)
        assert np.all(positions[row, count:] == 0)
        assert np.all(out["mask_ids"][row, count:] == 0)
    assert np.all(out["token_ids"][:, 0] == START)
    assert np.all(out["token_ids"][:, 39] == END)


def test_selections_beyond_the_slots_stay_unmasked():
    ids = packed([38] * 50)
    out = mask_tokens(ids, tf.constant([5, 5]), SPECIAL, rate=0.9, selection_length=4)
    changed = (out["token_ids"].numpy() != ids).sum(axis=1)
    assert np.all(out["mask_weights"].numpy().sum(axis=1) == 4)
    assert np.all(changed <= 4)


def test_selection_length_covers_binomial_tail():
    from scipy.stats import binom

    for context in (4, 8, 16, 32, 77):
        slots = mlm_selection_length(context)
        assert slots <= context
        # Overflow: more than `slots` of the (at most) context - 2 ordinary tokens.
        assert binom.sf(slots, context - 2, 0.15) < 1e-4


def pack_by_hand(out: dict, groups: int) -> dict:
    """Each slice's targets as (caption, position, id) in caption order, dealt
    k per row with k = ceil(most targets in a slice / captions in a slice)."""
    weights = out["mask_weights"]
    captions = len(weights) // groups
    slices = [
        [
            (
                c,
                out["mask_positions"][g * captions + c, m],
                out["mask_ids"][g * captions + c, m],
            )
            for c in range(captions)
            for m in range(weights.shape[1])
            if weights[g * captions + c, m] > 0
        ]
        for g in range(groups)
    ]
    k = max(1, -(-max(len(s) for s in slices) // captions))
    keys = ("mask_rows", "mask_positions", "mask_ids", "mask_weights")
    result = {
        key: np.zeros(
            (len(weights), k), weights.dtype if key == "mask_weights" else np.int32
        )
        for key in keys
    }
    for g, targets in enumerate(slices):
        for j, (caption, position, token) in enumerate(targets):
            row, slot = g * captions + j // k, j % k
            for key, value in zip(keys, (caption, position, token, 1.0), strict=True):
                result[key][row, slot] = value
    return result


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_packing_deals_each_slices_targets_k_per_row(groups):
    lengths = np.random.default_rng(1).integers(1, 30, 16)
    out = mask_tokens(packed(lengths.tolist()), tf.constant([3, 4]), SPECIAL)
    out = {key: value.numpy() for key, value in out.items()}
    got = {k: v.numpy() for k, v in pack_targets(out, groups).items()}
    want = pack_by_hand(out, groups)
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    # Far fewer slots than the busiest caption's row needs, no target lost.
    assert got["mask_weights"].sum() == out["mask_weights"].sum()
    assert got["mask_weights"].size < out["mask_weights"].size / 2


def test_packing_a_batch_without_targets_keeps_one_empty_slot():
    out = mask_tokens(packed([5] * 4), tf.constant([0, 0]), SPECIAL, rate=0.0)
    got = pack_targets(out, 2)
    assert got["mask_weights"].shape == (4, 1)
    assert got["mask_weights"].numpy().sum() == 0

"""MLM target selection against a direct reading of the released rule."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from declip_keras.masking import mask_tokens, mlm_selection_length

pytestmark = pytest.mark.one_backend(
    "tensorflow", reason="backend-independent; run once"
)
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

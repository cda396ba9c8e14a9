from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from helpers import small_model, to_numpy
from keras import ops

from declip_keras.optim import WarmupCosine, make_optimizer


def test_warmup_cosine_matches_the_formula():
    schedule = WarmupCosine(peak=1e-3, warmup_steps=10, total_steps=110)
    for step in (0, 5, 10, 35, 60, 110, 200):
        if step < 10:
            expected = 1e-4 + (1e-3 - 1e-4) * step / 10
        else:
            progress = min((step - 10) / 100, 1.0)
            expected = 0.5 * 1e-3 * (1 + math.cos(math.pi * progress))
        assert float(to_numpy(schedule(step))) == pytest.approx(expected, abs=1e-9)
    restored = WarmupCosine.from_config(schedule.get_config())
    assert float(to_numpy(restored(35))) == float(to_numpy(schedule(35)))


def test_weight_decay_skips_biases_norms_and_temperature():
    model = small_model()
    optimizer = make_optimizer(model, 1e-3)
    optimizer.build(model.trainable_variables)
    decayed = {
        v.path for v in model.trainable_variables if optimizer._use_weight_decay(v)
    }
    assert (
        "de_clip/logit_scale" not in decayed and model.logit_scale.path not in decayed
    )
    for variable in model.trainable_variables:
        assert (variable.path in decayed) == (len(variable.shape) >= 2), variable.path


def test_adamw_updates_a_repeated_token_as_every_backend_does():
    """A token looked up 3 times gets one Adam update of its summed gradient.

    The model's output is the sum of the looked-up embedding entries, so the
    loss `out**2` has gradient `2 * out * count(token)` in each entry of a
    token's row; the reference applies AdamW's formula to that in numpy.
    """
    ids = np.array([[1, 1, 1, 2]])
    embedding = keras.layers.Embedding(
        5, 3, embeddings_initializer=keras.initializers.Constant(0.5)
    )
    inputs = keras.Input((4,), dtype="int32")
    model = keras.Model(inputs, ops.sum(embedding(inputs), axis=(1, 2)))
    optimizer = make_optimizer(model, 0.1, weight_decay=0.0)
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(ids, np.zeros((1,)), epochs=3, verbose=0)

    table = np.full((5, 3), 0.5)
    m, v = np.zeros_like(table), np.zeros_like(table)
    counts = np.bincount(ids[0], minlength=5)[:, None]
    for step in range(1, 4):
        out = table[ids[0]].sum()
        gradient = 2 * out * counts * np.ones_like(table)
        m = 0.9 * m + 0.1 * gradient
        v = 0.98 * v + 0.02 * gradient**2
        alpha = 0.1 * math.sqrt(1 - 0.98**step) / (1 - 0.9**step)
        table -= alpha * m / (np.sqrt(v) + 1e-8)
    np.testing.assert_allclose(to_numpy(embedding.embeddings), table, rtol=1e-5)


def test_adamw_runs_as_the_backends_own_adamw():
    """Keras gives each backend its own AdamW (under torch a fused
    multi-tensor update); the project's subclass must keep it, not fall back
    to a variable-by-variable update."""
    optimizer = make_optimizer(small_model(), 1e-3)
    assert isinstance(optimizer, type(keras.optimizers.AdamW()))
    assert type(optimizer).__name__ == "AdamW"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(restored) is type(optimizer)

from __future__ import annotations

import math
import re

import keras
import numpy as np
import pytest
from helpers import small_model, to_numpy
from keras import ops

from declip_keras.training.optim import WarmupCosine, make_optimizer


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


# The released grouping (`prototype/utils/misc.py` `param_group_all` with the
# YFCC15M configs' `pconfig`: no decay for bn_w, bn_b, ln_w, ln_b, every
# Linear/Conv/norm `bias`, logit_scale), written out per weight of this
# package's towers: (pattern, decayed as released).
RELEASED_DECAY = [
    (r"logit_scale$", False),
    (r"(layer_norm|_bn|layer_norm_\d)/(gamma|beta)$", False),
    # nn.MultiheadAttention.in_proj_bias is the attention module's own
    # parameter, not a Linear's: decayed.
    (r"encoder_block_\d+/attention/(query|key|value)/bias$", True),
    (r"attention/attention_output/bias$", False),  # out_proj is a Linear
    (r"attnpool/attention/.*/bias$", False),  # q/k/v/c_proj are Linears
    (r"(dense_\d|projection|mlm_head|pred2_dense)/bias$", False),
    (r"class_embedding$", True),  # an nn.Parameter of the ViT
    (r"(kernel|embeddings|position_embedding)$", True),
]


@pytest.mark.parametrize("image_encoder", ["vit", "resnet"])
def test_weight_decay_groups_are_the_released_ones(image_encoder):
    resnet = {"vision_width": 8, "vision_layers": (1, 1), "vision_heads": 2}
    model = small_model(
        image_encoder=image_encoder, **(resnet if image_encoder == "resnet" else {})
    )
    optimizer = make_optimizer(model, 1e-3)
    optimizer.build(model.trainable_variables)
    for variable in model.trainable_variables:
        rule = next(
            (d for pattern, d in RELEASED_DECAY if re.search(pattern, variable.path)),
            None,
        )
        assert rule is not None, f"no released group for {variable.path}"
        assert optimizer._use_weight_decay(variable) == rule, variable.path


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

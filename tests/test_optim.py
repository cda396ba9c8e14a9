from __future__ import annotations

import math

import pytest
from helpers import small_model, to_numpy

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

"""DeCLIP's optimiser: AdamW with a linear warm-up and a cosine decay."""

from __future__ import annotations

import math
import re

import keras
from keras import ops

from declip_keras.backend import dense_gradients, keras_adamw
from declip_keras.models.layers import PACKAGE
from declip_keras.training.config import TrainConfig

# DeCLIP's YFCC15M schedule warms up over 2,500 of its 128,000 steps.
RELEASED_WARMUP_FRACTION = 2500 / 128_000


def default_warmup_steps(total_steps: int) -> int:
    """The released share of warm-up steps, at least one.

    Example:
    >>> default_warmup_steps(128_000), default_warmup_steps(600)
    (2500, 12)
    """
    return max(1, round(total_steps * RELEASED_WARMUP_FRACTION))


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupCosine(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from `start` to `peak`, then cosine decay to `end`.

    DeCLIP (YFCC15M): 1e-4 -> 1e-3 over 2,500 steps, cosine to 0 at 128k.
    `scale` multiplies the whole curve; a rolled-back run lowers it.

    Example:
    >>> schedule = WarmupCosine(peak=1e-3, warmup_steps=2500, total_steps=128_000)
    >>> round(float(schedule(2500)), 9)
    0.001
    """

    def __init__(
        self,
        peak: float,
        warmup_steps: int,
        total_steps: int,
        start: float | None = None,
        end: float = 0.0,
        scale: float = 1.0,
    ):
        self.peak = float(peak)
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.start = self.peak / 10 if start is None else float(start)
        self.end = float(end)
        self.scale = float(scale)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        warmup = max(self.warmup_steps, 1)
        rising = self.start + (self.peak - self.start) * step / warmup
        progress = ops.clip(
            (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1),
            0.0,
            1.0,
        )
        falling = self.end + 0.5 * (self.peak - self.end) * (
            1 + ops.cos(math.pi * progress)
        )
        return self.scale * ops.where(step < self.warmup_steps, rising, falling)

    def get_config(self) -> dict:
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "start": self.start,
            "end": self.end,
            "scale": self.scale,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class AdamW(keras_adamw()):
    """Keras' AdamW with the same update on every backend.

    Under TensorFlow, Keras' AdamW mis-applies a token embedding's gradient
    when a token occurs more than once in the batch (see
    `declip_keras.backend.dense_gradients`); this one sums those gradients
    first. Elsewhere it is Keras' AdamW unchanged (under torch its fused
    multi-tensor update, `declip_keras.backend.keras_adamw`).
    """

    def apply(self, grads, trainable_variables=None):
        return super().apply(dense_gradients(list(grads)), trainable_variables)


def make_optimizer(
    model: keras.Model,
    schedule: keras.optimizers.schedules.LearningRateSchedule | float,
    weight_decay: float = TrainConfig.weight_decay,
    beta1: float = TrainConfig.beta1,
    beta2: float = TrainConfig.beta2,
    eps: float = TrainConfig.eps,
) -> AdamW:
    """AdamW without decay on biases, norms and the temperature; the defaults
    are `TrainConfig`'s, the released DeCLIP configs' values.

    The groups are the released DeCLIP configs' (`param_group_all` with their
    `pconfig`; see `decays_as_released`).
    """
    optimizer = AdamW(
        learning_rate=schedule,
        weight_decay=weight_decay,
        beta_1=beta1,
        beta_2=beta2,
        epsilon=eps,
    )
    optimizer.exclude_from_weight_decay(
        var_list=[v for v in model.trainable_variables if not decays_as_released(v)]
    )
    return optimizer


# PyTorch's MultiheadAttention keeps its in-projection bias as a parameter of
# its own, not a Linear's, so the released grouping decays it.
_ATTENTION_IN_BIAS = re.compile(r"block_\d+/attention/(query|key|value)/bias$")


def decays_as_released(variable: keras.Variable) -> bool:
    """Whether the released DeCLIP configs decay this weight.

    They exempt the scales and offsets of batch and layer norms, the biases
    of Linear and Conv layers (the attention output's and attention
    pooling's included) and the logit scale; everything else decays: the
    weights, the embeddings, the ViT's class token, and the transformers'
    attention in-projection biases.
    """
    path = variable.path
    if _ATTENTION_IN_BIAS.search(path):
        return True
    return not path.endswith(("bias", "gamma", "beta", "logit_scale"))

"""DeCLIP, data-efficient CLIP pretraining, for Keras 3 on JAX, TensorFlow and torch.

Importing the package registers its Keras classes (the model, its towers
and layers, the schedule and the optimizer), as Keras libraries do: after
`import declip_keras`, `keras.saving.load_model("run/model.keras")` finds
them. The import loads Keras, so it fixes Keras' backend: set
`KERAS_BACKEND` before it.
"""

from __future__ import annotations

from declip_keras.data.synthetic import synthetic_batch
from declip_keras.evaluation.metrics import evaluate
from declip_keras.models.declip import DeCLIP
from declip_keras.models.encoders import (
    ResNetImageEncoder,
    TextEncoder,
    ViTImageEncoder,
)
from declip_keras.models.layers import AttentionPool2D, EndTokenPooler, FeatureQueue
from declip_keras.models.presets import PRESETS, preset_config
from declip_keras.training.config import TrainConfig
from declip_keras.training.optim import WarmupCosine, make_optimizer
from declip_keras.training.runs import load_trained_model
from declip_keras.training.train import train

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AttentionPool2D",
    "DeCLIP",
    "EndTokenPooler",
    "FeatureQueue",
    "ResNetImageEncoder",
    "TextEncoder",
    "TrainConfig",
    "ViTImageEncoder",
    "WarmupCosine",
    "evaluate",
    "load_trained_model",
    "make_optimizer",
    "preset_config",
    "synthetic_batch",
    "train",
]

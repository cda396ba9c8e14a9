"""DeCLIP, data-efficient CLIP pretraining, for Keras 3 on JAX, TensorFlow and torch.

The names below are imported on first use, because Keras takes seconds to
load and `declip-keras --help` should not wait for it. `keras.models.load_model`
finds DeCLIP's classes once they are imported: use
`declip_keras.load_trained_model`, or touch `declip_keras.DeCLIP` first.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public name -> the module that defines it.
_HOMES = {
    "AttentionPool2D": "models.layers",
    "DeCLIP": "models.declip",
    "EndTokenPooler": "models.layers",
    "FeatureQueue": "models.layers",
    "PRESETS": "models.presets",
    "ResNetImageEncoder": "models.encoders",
    "TextEncoder": "models.encoders",
    "TrainConfig": "training.config",
    "ViTImageEncoder": "models.encoders",
    "WarmupCosine": "training.optim",
    "evaluate": "evaluation.metrics",
    "load_trained_model": "training.runs",
    "make_optimizer": "training.optim",
    "preset_config": "models.presets",
    "synthetic_batch": "data.synthetic",
    "train": "training.train",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'declip_keras' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"declip_keras.{_HOMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

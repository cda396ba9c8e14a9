"""DeCLIP, data-efficient CLIP pretraining, for Keras 3 on JAX, TensorFlow and torch."""

from declip_keras.encoders import ResNetImageEncoder, TextEncoder, ViTImageEncoder
from declip_keras.layers import AttentionPool2D, EndTokenPooler, FeatureQueue
from declip_keras.model import DeCLIP
from declip_keras.optim import WarmupCosine
from declip_keras.presets import PRESETS, preset_config
from declip_keras.synthetic import synthetic_batch

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "AttentionPool2D",
    "DeCLIP",
    "EndTokenPooler",
    "FeatureQueue",
    "ResNetImageEncoder",
    "TextEncoder",
    "ViTImageEncoder",
    "WarmupCosine",
    "preset_config",
    "synthetic_batch",
]

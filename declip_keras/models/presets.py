"""Named model architectures that users override field by field.

A preset names an architecture (tower shapes) and loss weights; the model it
builds starts from random weights. A resolved preset is a flat dict: the
architecture fields below plus every `DeCLIP` argument, whose defaults are
`MODEL_DEFAULTS` (`DeCLIP`'s signature reads them from there). Any field
can be changed from Python (`DeCLIP.from_preset("tiny", embed_dim=256)`) or
from the command line (`--set embed_dim=256`), with one rule: the override
must name an existing field.

This module imports nothing heavy, so the command line lists and checks
presets before Keras loads (checking an `image_encoder` value reads the
encoder registry, `declip_keras.models.encoders.IMAGE_ENCODERS`).
"""

from __future__ import annotations

import ast
import math
from collections.abc import Sequence
from typing import Any

from declip_keras.data.batch_format import VOCABULARY_SIZE
from declip_keras.models.loss_terms import DEFAULT_WEIGHTS

# `DeCLIP`'s arguments besides its towers, with their defaults: the released
# YFCC15M configuration's (the SimSiam head widths are its ViT-B/32's).
MODEL_DEFAULTS: dict[str, Any] = {
    **DEFAULT_WEIGHTS,
    "multi_view": True,
    "queue_size": 65536,
    "queue_replicas": 1,
    "simsiam_projection_dim": 1024,
    "simsiam_prediction_dim": 512,
    "logit_scale_init": math.log(1 / 0.07),
    "logit_scale_bounds": (3.0, 6.0),
    "max_scale": 100.0,
    "accum_steps": 1,
    "seed": None,
}

# CLIP's text tower input, shared by the presets unless they say otherwise.
_TEXT_INPUT = {"vocabulary_size": VOCABULARY_SIZE, "context_length": 77}

# Fields every preset has unless it says otherwise. `remat`: recompute each
# transformer block's activations in the backward pass (activation
# checkpointing) instead of keeping them: less memory for more compute.
_COMMON = {"remat": False}

_TINY = {
    **_TEXT_INPUT,
    "image_encoder": "vit",
    "image_size": 64,
    "patch_size": 8,
    "vision_width": 128,
    "vision_layers": 3,
    "vision_heads": 4,
    "freeze_patch_embedding": True,
    "text_width": 128,
    "text_layers": 3,
    "text_heads": 4,
    "context_length": 32,
    "embed_dim": 128,
    "queue_size": 4096,
    "simsiam_projection_dim": 256,
    "simsiam_prediction_dim": 64,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Learns something in minutes on two CPU cores: 64-px images, narrow towers.
    "tiny": _TINY,
    # `tiny` at 32-px images and 16-token captions: the demo's CPU setting.
    "tiny32": {**_TINY, "image_size": 32, "context_length": 16},
    "rn50": {
        **_TEXT_INPUT,
        "image_encoder": "resnet",
        "image_size": 224,
        "vision_width": 64,
        "vision_layers": (3, 4, 6, 3),
        "vision_heads": 32,
        "text_width": 512,
        "text_layers": 12,
        "text_heads": 8,
        "embed_dim": 1024,
    },
    "vitb32": {
        **_TEXT_INPUT,
        "image_encoder": "vit",
        "image_size": 224,
        "patch_size": 32,
        "vision_width": 768,
        "vision_layers": 12,
        "vision_heads": 12,
        "freeze_patch_embedding": True,
        "text_width": 512,
        "text_layers": 12,
        "text_heads": 8,
        "embed_dim": 512,
    },
}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(field: str, default: Any, value: Any) -> None:
    """Raises ValueError unless `value` fits the preset field of `default`."""
    if field == "seed":
        ok = value is None or _is_int(value)
    elif field == "image_encoder":
        # The registry lives with the builders, which import Keras.
        from declip_keras.models.encoders import IMAGE_ENCODERS

        ok = value in IMAGE_ENCODERS
    elif field == "vision_layers":  # a depth (ViT) or stage depths (ResNet)
        depths = value if isinstance(value, (tuple, list)) else (value,)
        ok = all(_is_int(d) and d > 0 for d in depths)
    elif field == "logit_scale_bounds":
        ok = (
            isinstance(value, (tuple, list))
            and len(value) == 2
            and all(_is_number(v) for v in value)
            and value[0] <= value[1]
        )
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif _is_int(default):
        ok = _is_int(value) and value > 0
    elif isinstance(default, float):
        ok = _is_number(value) and (value >= 0 or not field.endswith("_weight"))
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(
            f"Preset field {field} takes a value like {default!r}, got {value!r}."
        )


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Preset `name` resolved: its fields, `DeCLIP`'s defaults, `overrides`.

    Example:
    >>> preset_config("tiny", embed_dim=256)["embed_dim"]
    256

    Raises:
        ValueError: for an unknown preset, a field the preset does not have,
            a value of the wrong type or range (sizes are positive
            integers, loss weights non-negative numbers), or a ViT whose
            patches do not tile the image.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    config = {**MODEL_DEFAULTS, **_COMMON, **PRESETS[name]}
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(
            f"Preset {name!r} has no field(s) {unknown}; its fields are "
            f"{sorted(config)}."
        )
    for field, value in overrides.items():
        _check_value(field, config[field], value)
    config.update(overrides)
    if config["image_encoder"] == "vit" and config["image_size"] % config["patch_size"]:
        raise ValueError(
            f"image_size {config['image_size']} is not a multiple of patch_size "
            f"{config['patch_size']}: a ViT cuts the image into whole patches."
        )
    return config


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["embed_dim=256", "image_encoder=resnet"]` -> `{"embed_dim": 256, ...}`.

    Values are read as Python literals when they are one (numbers, tuples,
    booleans, None), `true`/`false` in any case as booleans, and as plain
    strings otherwise.

    Example:
    >>> parse_overrides(["embed_dim=256", "image_encoder=resnet", "multi_view=false"])
    {'embed_dim': 256, 'image_encoder': 'resnet', 'multi_view': False}

    Raises:
        ValueError: for an item without `=` or without a field name.
    """
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects FIELD=VALUE, got {item!r}")
        if value.lower() in ("true", "false"):
            overrides[key] = value.lower() == "true"
            continue
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides

"""Named model configurations that users override field by field.

A preset is a flat dict, so any field can be changed from Python
(`DeCLIP.from_preset("tiny", embed_dim=256)`) or from the command line
(`--set embed_dim=256`) with one rule: the override must name an existing field.
"""

from __future__ import annotations

import math
from typing import Any

from declip_keras.encoders import ResNetImageEncoder, TextEncoder, ViTImageEncoder

# DeCLIP's token layout: CLIP's 49,408 BPE tokens, then mask, start, end as the
# three largest ids so that argmax(token_ids) is the end-of-text position.
VOCABULARY_SIZE = 49409
MASK_TOKEN_ID = 49406
START_TOKEN_ID = 49407
END_TOKEN_ID = 49408

_DECLIP_DEFAULTS: dict[str, Any] = {
    # Released YFCC15M configs: L = 0.4 MVS + 0.2 SimSiam + 0.2 MLM + 0.2 NNS.
    "clip_weight": 0.4,
    "ss_weight": 0.2,
    "mlm_weight": 0.2,
    "nn_weight": 0.2,
    # Contrast all 2 x 2 views (MVS); False: one image view, one caption.
    "multi_view": True,
    "queue_size": 65536,
    "simsiam_projection_dim": 1024,
    "simsiam_prediction_dim": 512,
    "logit_scale_init": math.log(1 / 0.07),
    "logit_scale_min": 3.0,
    "logit_scale_max": 6.0,
    "max_logit_scale": 100.0,
    "vocabulary_size": VOCABULARY_SIZE,
    "context_length": 77,
    "seed": None,
}

PRESETS: dict[str, dict[str, Any]] = {
    # Learns something in minutes on two CPU cores: 64-px images, narrow towers.
    "tiny": {
        **_DECLIP_DEFAULTS,
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
    },
    "rn50": {
        **_DECLIP_DEFAULTS,
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
        **_DECLIP_DEFAULTS,
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


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _check_value(field: str, default: Any, value: Any) -> None:
    """Raises ValueError unless `value` fits the preset field of `default`."""
    if field == "seed":
        ok = value is None or (isinstance(value, int) and not isinstance(value, bool))
    elif field == "image_encoder":
        ok = value in ("vit", "resnet")
    elif field == "vision_layers":  # a depth (ViT) or stage depths (ResNet)
        depths = value if isinstance(value, (tuple, list)) else (value,)
        ok = all(
            isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in depths
        )
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = _positive_int(value)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and field.endswith("_weight"):
            ok = value >= 0
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ValueError(
            f"Preset field {field} takes a value like {default!r}, got {value!r}."
        )


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """Returns a copy of preset `name` with `overrides` applied.

    Raises:
        ValueError: for an unknown preset, a field the preset does not have,
            or a value of the wrong type or range (sizes are positive
            integers, loss weights non-negative numbers).
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    config = dict(PRESETS[name])
    unknown = sorted(set(overrides) - set(config))
    if unknown:
        raise ValueError(
            f"Preset {name!r} has no field(s) {unknown}; its fields are "
            f"{sorted(config)}."
        )
    for field, value in overrides.items():
        _check_value(field, config[field], value)
    config.update(overrides)
    return config


def build_image_encoder(config: dict[str, Any], dtype=None):
    """The image tower a preset config describes."""
    kind = config["image_encoder"]
    if kind == "vit":
        return ViTImageEncoder(
            image_size=config["image_size"],
            patch_size=config["patch_size"],
            width=config["vision_width"],
            num_layers=config["vision_layers"],
            num_heads=config["vision_heads"],
            embed_dim=config["embed_dim"],
            freeze_patch_embedding=config["freeze_patch_embedding"],
            dtype=dtype,
            name="image_encoder",
        )
    if kind == "resnet":
        return ResNetImageEncoder(
            image_size=config["image_size"],
            width=config["vision_width"],
            stage_depths=config["vision_layers"],
            num_heads=config["vision_heads"],
            embed_dim=config["embed_dim"],
            dtype=dtype,
            name="image_encoder",
        )
    raise ValueError(f"image_encoder must be 'vit' or 'resnet', got {kind!r}.")


def build_text_encoder(config: dict[str, Any], dtype=None) -> TextEncoder:
    """The text tower a preset config describes."""
    return TextEncoder(
        vocabulary_size=config["vocabulary_size"],
        context_length=config["context_length"],
        width=config["text_width"],
        num_layers=config["text_layers"],
        num_heads=config["text_heads"],
        embed_dim=config["embed_dim"],
        dtype=dtype,
        name="text_encoder",
    )

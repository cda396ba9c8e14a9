from __future__ import annotations

import math

import pytest

from declip_keras.models.declip import DeCLIP
from declip_keras.models.presets import parse_overrides, preset_config

pytestmark = pytest.mark.backend_independent


def test_parse_overrides_reads_literals_and_strings():
    parsed = parse_overrides(
        ["embed_dim=256", "vision_layers=(1, 2)", "image_encoder=vit"]
    )
    assert parsed == {"embed_dim": 256, "vision_layers": (1, 2), "image_encoder": "vit"}
    # Shell users write booleans in lower case too.
    assert parse_overrides(["multi_view=false", "freeze_patch_embedding=TRUE"]) == {
        "multi_view": False,
        "freeze_patch_embedding": True,
    }
    with pytest.raises(ValueError, match="FIELD=VALUE"):
        parse_overrides(["embed_dim"])


def test_a_resolved_preset_takes_declip_defaults_from_the_model_signature():
    config = preset_config("vitb32")
    # The released YFCC15M values, written out here independently of the code.
    assert (config["clip_weight"], config["ss_weight"]) == (0.4, 0.2)
    assert (config["mlm_weight"], config["nn_weight"]) == (0.2, 0.2)
    assert config["queue_size"] == 65536
    assert config["logit_scale_init"] == pytest.approx(math.log(1 / 0.07))
    assert tuple(config["logit_scale_bounds"]) == (3.0, 6.0)
    assert config["max_scale"] == 100.0
    # `tiny` sets its own queue and heads; the rest comes from DeCLIP.
    assert preset_config("tiny")["queue_size"] == 4096
    assert set(DeCLIP.argument_defaults()) <= set(config)


def test_tiny32_is_tiny_at_32_px_and_16_tokens():
    tiny, tiny32 = preset_config("tiny"), preset_config("tiny32")
    changed = {k for k in tiny if tiny[k] != tiny32[k]}
    assert changed == {"image_size", "context_length"}
    assert (tiny32["image_size"], tiny32["context_length"]) == (32, 16)


@pytest.mark.parametrize(
    "field, value",
    [
        ("embed_dim", 0),
        ("embed_dim", "abc"),
        ("clip_weight", -0.1),
        ("logit_scale_bounds", (6.0, 3.0)),
        ("logit_scale_bounds", 4.0),
        ("multi_view", 1),
        ("image_encoder", "swin"),
    ],
)
def test_values_of_the_wrong_type_or_range_are_refused(field, value):
    with pytest.raises(ValueError, match=f"{field} takes a value like"):
        preset_config("tiny", **{field: value})


def test_from_preset_passes_every_model_field_through():
    changed = {
        "clip_weight": 0.5,
        "ss_weight": 0.1,
        "mlm_weight": 0.3,
        "nn_weight": 0.0,
        "multi_view": False,
        "queue_size": 32,
        "queue_replicas": 2,
        "simsiam_projection_dim": 16,
        "simsiam_prediction_dim": 8,
        "logit_scale_init": 3.5,
        "logit_scale_bounds": (2.0, 5.0),
        "max_scale": 50.0,
        "accum_steps": 2,
        "seed": 7,
    }
    assert set(changed) == set(DeCLIP.argument_defaults())
    small = {"image_size": 32, "context_length": 16, "vocabulary_size": 600}
    config = DeCLIP.from_preset("tiny", **small, **changed).get_config()
    assert {field: config[field] for field in changed} == changed

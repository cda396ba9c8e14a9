"""Every preset starts from the released DeCLIP code's initialisation.

The expected distributions are written out here from the released modules
(`visual_transformer.py`, `text_transformer.py`, `modified_resnet.py`, and
PyTorch's defaults for the layers they leave alone), independently of
`declip_keras.models.initializers`. Each weight group (every tensor of one role,
pooled over blocks) is checked by its sample standard deviation, within five
standard errors of the formula's, and by its mean; uniform draws also by
their bound, constants exactly.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from helpers import to_numpy

from declip_keras.models.declip import DeCLIP
from declip_keras.models.encoders import build_image_encoder, build_text_encoder
from declip_keras.models.presets import preset_config


def _torch_default(fan_in: int) -> tuple[str, float]:
    # kaiming_uniform(a=sqrt(5)) and Linear's bias: U(+-1/sqrt(fan_in)).
    return "uniform", 1 / math.sqrt(fan_in)


def expected(
    path: str, shape: tuple, config: dict, tower: str
) -> tuple[str, str, float] | None:
    """(group, kind, parameter) of a weight of `tower` ("image" or "text"):
    kind "normal" (std), "uniform" (bound) or "constant" (value); None for
    weights that are not drawn."""
    width = config[f"{'text' if tower == 'text' else 'vision'}_width"]
    layers = config[f"{'text' if tower == 'text' else 'vision'}_layers"]
    rules = []
    if isinstance(layers, int):  # a transformer tower
        proj = width**-0.5 * (2 * layers) ** -0.5
        rules += [
            (r"attention/(query|key|value)/kernel$", "attn_in", "normal", width**-0.5),
            (r"attention/attention_output/kernel$", "attn_out", "normal", proj),
            (r"attention/.*bias$", "attn_bias", "constant", 0.0),
            (r"dense_1/kernel$", "mlp_in", "normal", (2 * width) ** -0.5),
            (r"dense_1/bias$", "mlp_in_bias", *_torch_default(width)),
            (r"dense_2/kernel$", "mlp_out", "normal", proj),
            (r"dense_2/bias$", "mlp_out_bias", *_torch_default(4 * width)),
            (r"class_embedding$", "class", "normal", width**-0.5),
            (r"token_embedding/embeddings$", "token", "normal", 0.02),
            (r"position_embedding/embeddings$", "position", "normal", 0.01),
            (r"patch_embedding/kernel$", "patch", *_torch_default(3 * shape[0] ** 2)),
            (r"^projection/kernel$", "projection", "normal", width**-0.5),
            (r"^projection/bias$", "projection_bias", *_torch_default(width)),
        ]
    else:  # CLIP's modified ResNet
        channels = 32 * width
        rules += [
            (r"block\d+_3_bn/gamma$", "last_bn_gamma", "constant", 0.0),
            (r"_conv/kernel$", f"conv{shape[:3]}", *_torch_default(np.prod(shape[:3]))),
            (
                r"attnpool/position_embedding$",
                "pool_position",
                "normal",
                channels**-0.5,
            ),  # fmt: skip
            (r"attnpool/attention/.*kernel$", "pool_kernel", "normal", channels**-0.5),
            (r"attnpool/attention/.*bias$", "pool_bias", *_torch_default(channels)),
        ]
    rules += [
        (r"(gamma)$", "norm_gamma", "constant", 1.0),
        (r"(beta|moving_mean)$", "norm_beta", "constant", 0.0),
        (r"moving_variance$", "norm_variance", "constant", 1.0),
    ]
    for pattern, group, kind, parameter in rules:
        if re.search(pattern, path):
            return f"{tower}/{group}", kind, parameter
    return None


def check_groups(towers: dict, config: dict) -> set[str]:
    """Checks the weights of `{"image": tower, "text": tower}`; the groups seen."""
    groups: dict[str, list] = {}
    weights = [(name, v) for name, tower in towers.items() for v in tower.weights]
    for tower, variable in weights:
        rule = expected(variable.path, tuple(variable.shape), config, tower)
        if rule is None:
            continue
        group, kind, parameter = rule
        groups.setdefault(group, [kind, parameter, []])[2].append(
            to_numpy(variable).astype(np.float64).ravel()
        )
    for group, (kind, parameter, tensors) in groups.items():
        values = np.concatenate(tensors)
        if kind == "constant":
            np.testing.assert_array_equal(values, parameter, err_msg=group)
            continue
        std = parameter if kind == "normal" else parameter / math.sqrt(3)
        kurtosis = 3.0 if kind == "normal" else 1.8
        # The sample std's standard error, relative: sqrt((kurtosis - 1) / 4n).
        error = math.sqrt((kurtosis - 1) / (4 * values.size))
        measured = values.std()
        assert abs(measured / std - 1) < 5 * error, (group, measured, std)
        assert abs(values.mean()) < 5 * std / math.sqrt(values.size), group
        if kind == "uniform":
            assert np.abs(values).max() <= parameter * (1 + 1e-6), group
        # Independent draws: no two tensors of a group (blocks; q, k and v)
        # start the same.
        starts = {tuple(t[:8]) for t in tensors}
        assert len(starts) == len(tensors), f"{group}: repeated draws"
    return set(groups)


def test_tiny_model_towers_and_heads_start_as_released():
    model = DeCLIP.from_preset("tiny", vocabulary_size=1000)
    config = preset_config("tiny", vocabulary_size=1000)
    groups = check_groups(
        {"image": model.image_encoder, "text": model.text_encoder}, config
    )
    assert {"image/patch", "image/class", "image/attn_out", "text/token"} <= groups
    # Heads: PyTorch's Linear defaults, batch norm at ones and zeros.
    width, projection = config["text_width"], config["simsiam_projection_dim"]
    heads = {
        "simsiam_projector/proj1_dense/kernel": config["embed_dim"],
        "simsiam_projector/proj2_dense/kernel": projection,
        "simsiam_predictor/pred1_dense/kernel": projection,
        "simsiam_predictor/pred2_dense/kernel": config["simsiam_prediction_dim"],
        "simsiam_predictor/pred2_dense/bias": config["simsiam_prediction_dim"],
        "mlm_head/kernel": width,
        "mlm_head/bias": width,
    }
    by_path = {v.path: to_numpy(v).ravel() for v in model.weights}
    for path, fan_in in heads.items():
        values = by_path[path]
        bound = 1 / math.sqrt(fan_in)
        assert np.abs(values).max() <= bound * (1 + 1e-6), path
        error = math.sqrt(0.8 / (4 * values.size))
        assert abs(values.std() / (bound / math.sqrt(3)) - 1) < 5 * error, path


@pytest.mark.parametrize("preset", ["vitb32", "rn50"])
def test_full_size_towers_start_as_released(preset):
    """ViT-B/32's towers (its patch convolution at std 0.0104, not Glorot's
    0.0016) and RN50's image tower; RN50's text tower is ViT-B/32's."""
    config = preset_config(preset)
    towers = {"image": build_image_encoder(config)}
    if preset == "vitb32":
        towers["text"] = build_text_encoder(config)
    groups = check_groups(towers, config)
    if preset == "vitb32":
        patch = next(
            w
            for w in towers["image"].weights
            if w.path.endswith("patch/kernel")
            or w.path.endswith("patch_embedding/kernel")
        )
        assert abs(to_numpy(patch).std() - 0.0104) < 1e-4
        assert "text/projection_bias" in groups
    else:
        assert {"image/last_bn_gamma", "image/pool_kernel"} <= groups

"""Pretrained CLIP and DeCLIP weights from files on disk into DeCLIP's towers.

Three sources, each read by `read_pretrained` into the preset fields it fixes
and a loader:

- OpenAI's CLIP and OpenCLIP checkpoints: a flat `state_dict` in one key
  layout (`visual.conv1.weight`, `visual.transformer.resblocks.0.attn.
  in_proj_weight` or `visual.layer1.0.conv1.weight`, `token_embedding.weight`,
  `text_projection`, ...), in a `.pt`/`.bin` file (OpenAI's own files are
  TorchScript archives) or `.safetensors`; a ViT or CLIP's modified ResNet.
- The released DeCLIP code's checkpoints: the same image tower, the text
  tower under `encode_text.`, and the SimSiam and MLM heads.
- keras-hub CLIP preset folders (`CLIPBackbone.save_to_preset`).

The architecture comes from the tensors' shapes, as OpenAI's `build_model`
reads it; nothing is downloaded, and nothing is assigned unless every
tensor fits.

Example (with a checkpoint file of your own):
>>> model = import_checkpoint("ViT-B-32.pt")  # doctest: +SKIP
>>> model.encode_text(CaptionTokenizer(77)(["a photo of a cat"]))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

# Every OpenAI and OpenCLIP transformer uses heads of this width.
_HEAD_WIDTH = 64


class WeightsError(ValueError):
    """A checkpoint that does not fit the model (names the key)."""


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """The named float arrays of a checkpoint file.

    Takes a torch `state_dict` (`.pt`, `.pth`, `.bin`; also under a
    `"state_dict"` key, as OpenCLIP's training checkpoints hold it), an OpenAI
    TorchScript archive, or a `.safetensors` file. `module.` prefixes (from
    `DistributedDataParallel`) are dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError(
                f"Reading {path.name} needs safetensors: pip install safetensors"
            ) from error
        tensors = load_file(str(path))
    else:
        try:
            import torch
        except ImportError as error:
            raise ImportError(
                f"Reading {path.name} needs torch: pip install 'declip-keras[torch]'"
            ) from error
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # OpenAI's files are TorchScript archives
            try:
                tensors = torch.jit.load(path, map_location="cpu").state_dict()
            except Exception as error:
                raise WeightsError(
                    f"{path} is not a torch checkpoint nor a TorchScript archive."
                ) from error
        if isinstance(tensors, dict) and "state_dict" in tensors:
            tensors = tensors["state_dict"]
        if not isinstance(tensors, dict):
            raise WeightsError(f"{path} holds a {type(tensors).__name__}, not weights.")
        tensors = {
            k: v.float().numpy() for k, v in tensors.items() if v.is_floating_point()
        }
    return {
        re.sub(r"^module\.", "", k): np.asarray(v, np.float32)
        for k, v in tensors.items()
    }


def _blocks(state: dict[str, np.ndarray], prefix: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(rf"{prefix}(\d+)\.", k))}
    return len(found)


def _require(state: dict[str, np.ndarray], key: str) -> np.ndarray:
    if key not in state:
        raise WeightsError(
            f"The checkpoint has no {key!r}: not an OpenAI-layout CLIP ViT."
        )
    return state[key]


def openai_clip_overrides(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """The preset fields of the CLIP a `state_dict` holds (a ViT or CLIP's
    modified ResNet), read from its shapes as OpenAI's `build_model` does
    (transformer heads are 64 wide; the ResNet's attention pooling has
    `width * 32 / 64` heads)."""
    text_width = _require(state, "ln_final.weight").shape[0]
    tokens = _require(state, "token_embedding.weight").shape[0]
    text = {
        "text_width": text_width,
        "text_layers": _blocks(state, r"transformer\.resblocks\."),
        "text_heads": text_width // _HEAD_WIDTH,
        "context_length": _require(state, "positional_embedding").shape[0],
        # One more row: DeCLIP's MLM mask token.
        "vocabulary_size": tokens + 1,
    }
    if "visual.layer1.0.conv1.weight" in state:
        width = state["visual.layer1.0.conv1.weight"].shape[0]
        positions = _require(state, "visual.attnpool.positional_embedding").shape[0]
        return {
            "image_encoder": "resnet",
            "image_size": math.isqrt(positions - 1) * 32,
            "vision_width": width,
            "vision_layers": tuple(
                _blocks(state, rf"visual\.layer{k}\.") for k in (1, 2, 3, 4)
            ),
            "vision_heads": width * 32 // 64,
            "embed_dim": _require(state, "visual.attnpool.c_proj.weight").shape[0],
            **text,
        }
    conv = _require(state, "visual.conv1.weight")
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    grid = math.isqrt(_require(state, "visual.positional_embedding").shape[0] - 1)
    return {
        "image_encoder": "vit",
        "image_size": grid * patch_size,
        "patch_size": patch_size,
        "vision_width": vision_width,
        "vision_layers": _blocks(state, r"visual\.transformer\.resblocks\."),
        "vision_heads": vision_width // _HEAD_WIDTH,
        "embed_dim": _require(state, "visual.proj").shape[1],
        **text,
    }


def _attention(source: str, target: str, width: int, heads: int, take) -> dict:
    """OpenAI's fused `in_proj` (rows: query, key, value; torch's `[out, in]`)
    as keras-hub's per-projection `[in, heads, head_width]` kernels."""
    weight = take(f"{source}.attn.in_proj_weight", (3 * width, width))
    bias = take(f"{source}.attn.in_proj_bias", (3 * width,))
    out = {}
    for index, name in enumerate(("query", "key", "value")):
        rows = slice(index * width, (index + 1) * width)
        out[f"{target}/attention/{name}/kernel"] = weight[rows].T.reshape(
            width, heads, width // heads
        )
        out[f"{target}/attention/{name}/bias"] = bias[rows].reshape(heads, -1)
    projection = take(f"{source}.attn.out_proj.weight", (width, width))
    out[f"{target}/attention/attention_output/kernel"] = projection.T.reshape(
        heads, width // heads, width
    )
    out[f"{target}/attention/attention_output/bias"] = take(
        f"{source}.attn.out_proj.bias", (width,)
    )
    return out


def _transformer(source: str, target: str, layers: int, width: int, heads: int, take):
    out = {}
    for i in range(layers):
        block, into = f"{source}.{i}", f"{target}_encoder_block_{i}"
        for norm in ("1", "2"):
            out[f"{into}/layer_norm_{norm}/gamma"] = take(
                f"{block}.ln_{norm}.weight", (width,)
            )
            out[f"{into}/layer_norm_{norm}/beta"] = take(
                f"{block}.ln_{norm}.bias", (width,)
            )
        out.update(_attention(block, into, width, heads, take))
        out[f"{into}/dense_1/kernel"] = take(
            f"{block}.mlp.c_fc.weight", (4 * width, width)
        ).T
        out[f"{into}/dense_1/bias"] = take(f"{block}.mlp.c_fc.bias", (4 * width,))
        out[f"{into}/dense_2/kernel"] = take(
            f"{block}.mlp.c_proj.weight", (width, 4 * width)
        ).T
        out[f"{into}/dense_2/bias"] = take(f"{block}.mlp.c_proj.bias", (width,))
    return out


def _vit_values(image, take) -> dict[str, np.ndarray]:
    w, p = image.width, image.patch_size
    grid = image.image_size // p
    return {
        "vision_transformer_embedding/patch_embedding/kernel": take(
            "visual.conv1.weight", (w, 3, p, p)
        ).transpose(2, 3, 1, 0),
        "vision_transformer_embedding/class_embedding": take(
            "visual.class_embedding", (w,)
        ),
        "vision_transformer_embedding/position_embedding/embeddings": take(
            "visual.positional_embedding", (grid * grid + 1, w)
        ),
        "vision_transformer_pre_layer_norm/gamma": take("visual.ln_pre.weight", (w,)),
        "vision_transformer_pre_layer_norm/beta": take("visual.ln_pre.bias", (w,)),
        **_transformer(
            "visual.transformer.resblocks",
            "vision_transformer",
            image.num_layers,
            w,
            image.num_heads,
            take,
        ),
        "vision_transformer_layer_norm/gamma": take("visual.ln_post.weight", (w,)),
        "vision_transformer_layer_norm/beta": take("visual.ln_post.bias", (w,)),
        "projection/kernel": take("visual.proj", (w, image.embed_dim)),
    }


def _resnet_values(image, take) -> dict[str, np.ndarray]:
    """CLIP's modified ResNet: torch's `[out, in, h, w]` convolutions as Keras'
    `[h, w, in, out]`, batch norms with their running statistics, and the
    attention pooling's separate q/k/v/c projections."""
    out = {}

    def conv_bn(conv: str, bn: str, target: str, shape: tuple[int, ...]) -> None:
        out[f"{target}_conv/kernel"] = take(f"{conv}.weight", shape).transpose(
            2, 3, 1, 0
        )
        channels = (shape[0],)
        out[f"{target}_bn/gamma"] = take(f"{bn}.weight", channels)
        out[f"{target}_bn/beta"] = take(f"{bn}.bias", channels)
        out[f"{target}_bn/moving_mean"] = take(f"{bn}.running_mean", channels)
        out[f"{target}_bn/moving_variance"] = take(f"{bn}.running_var", channels)

    w = image.width
    conv_bn("visual.conv1", "visual.bn1", "stem_1", (w // 2, 3, 3, 3))
    conv_bn("visual.conv2", "visual.bn2", "stem_2", (w // 2, w // 2, 3, 3))
    conv_bn("visual.conv3", "visual.bn3", "stem_3", (w, w // 2, 3, 3))
    channels = w
    for stage, depth in enumerate(image.stage_depths):
        planes = w * 2**stage
        for block in range(depth):
            source = f"visual.layer{stage + 1}.{block}"
            target = f"stage{stage + 1}_block{block + 1}"
            conv_bn(
                f"{source}.conv1",
                f"{source}.bn1",
                f"{target}_1",
                (planes, channels, 1, 1),
            )
            conv_bn(
                f"{source}.conv2",
                f"{source}.bn2",
                f"{target}_2",
                (planes, planes, 3, 3),
            )
            conv_bn(
                f"{source}.conv3",
                f"{source}.bn3",
                f"{target}_3",
                (planes * 4, planes, 1, 1),
            )
            if block == 0 and (stage > 0 or channels != planes * 4):
                # OpenAI names the shortcut's average pooling "-1".
                conv_bn(
                    f"{source}.downsample.0",
                    f"{source}.downsample.1",
                    f"{target}_down",
                    (planes * 4, channels, 1, 1),
                )
            channels = planes * 4
    heads, grid = image.num_heads, image.image_size // 32
    pool = "visual.attnpool"
    out["attnpool/position_embedding"] = take(
        f"{pool}.positional_embedding", (grid * grid + 1, channels)
    )
    for name, source in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        weight = take(f"{pool}.{source}.weight", (channels, channels))
        out[f"attnpool/attention/{name}/kernel"] = weight.T.reshape(
            channels, heads, channels // heads
        )
        out[f"attnpool/attention/{name}/bias"] = take(
            f"{pool}.{source}.bias", (channels,)
        ).reshape(heads, -1)
    projection = take(f"{pool}.c_proj.weight", (image.embed_dim, channels))
    out["attnpool/attention/attention_output/kernel"] = projection.T.reshape(
        heads, channels // heads, image.embed_dim
    )
    out["attnpool/attention/attention_output/bias"] = take(
        f"{pool}.c_proj.bias", (image.embed_dim,)
    )
    return out


def load_openai_clip(
    model, state: dict[str, np.ndarray], extra: dict | None = None
) -> None:
    """Copies an OpenAI-layout CLIP `state_dict` (ViT or modified ResNet)
    into `model`'s towers and its logit scale.

    The model must have the checkpoint's architecture (`openai_clip_overrides`),
    except that its context may be shorter (the first positions are taken).
    The token rows take DeCLIP's layout (`_declip_token_rows`: the mask
    token, the mean embedding, before the start and end tokens); the text
    projection's bias (DeCLIP has one, CLIP not) starts at zero. The
    SimSiam and MLM heads and the queue keep their initial values.

    `extra`: further `{model attribute: {variable path: value}}` assigned
    with the rest (the released DeCLIP heads).

    Raises:
        WeightsError: a key is missing or a tensor's shape does not fit; the
            message names it, and no weight has changed.
    """
    used = set()

    def take(key: str, shape: tuple[int, ...], rows: int | None = None) -> np.ndarray:
        value = _require(state, key)
        if rows is not None:
            value = value[:rows]
        if value.shape != tuple(shape):
            raise WeightsError(
                f"{key} has shape {value.shape}; this model needs {tuple(shape)}."
            )
        used.add(key)
        return value

    image, text = model.image_encoder, model.text_encoder
    if getattr(image, "patch_size", None) is not None:
        values = {"image_encoder": _vit_values(image, take)}
    elif "visual.layer1.0.conv1.weight" in state:
        values = {"image_encoder": _resnet_values(image, take)}
    else:
        raise WeightsError("The checkpoint's image tower is not the model's kind.")
    t = text.width
    tokens = _declip_token_rows(
        _require(state, "token_embedding.weight"), text.vocabulary_size
    )
    if tokens.shape != (text.vocabulary_size, t):
        raise WeightsError(
            "token_embedding.weight has shape "
            f"{state['token_embedding.weight'].shape}; "
            f"this model needs ({text.vocabulary_size}, {t}) or one row fewer."
        )
    used.add("token_embedding.weight")
    values["text_encoder"] = {
        "text_transformer_embedding/token_embedding/embeddings": tokens,
        "text_transformer_embedding/position_embedding/embeddings": take(
            "positional_embedding", (text.context_length, t), rows=text.context_length
        ),
        **_transformer(
            "transformer.resblocks",
            "text_transformer",
            text.num_layers,
            t,
            text.num_heads,
            take,
        ),
        "text_transformer_layer_norm/gamma": take("ln_final.weight", (t,)),
        "text_transformer_layer_norm/beta": take("ln_final.bias", (t,)),
        "projection/kernel": take("text_projection", (t, text.embed_dim)),
        "projection/bias": np.zeros(text.embed_dim, np.float32),
    }
    unused = sorted(
        k
        for k in state
        if k not in used and k != "logit_scale" and not k.endswith("attn_mask")
    )
    if unused:
        raise WeightsError(
            f"The model has no place for {len(unused)} checkpoint tensor(s), e.g. "
            f"{unused[0]!r}: its depth or layout differs."
        )
    for name, more in (extra or {}).items():
        values.setdefault(name, {}).update(more)
    scale = state.get("logit_scale")
    _assign(model, values, None if scale is None else float(np.reshape(scale, ())))


def _assign(model, values: dict[str, dict[str, np.ndarray]], logit_scale) -> None:
    """Assigns `{tower: {variable path: value}}` once every value has been
    checked against its variable: nothing is half-loaded."""
    assignments = []
    for tower_name, tower_values in values.items():
        variables = {v.path: v for v in getattr(model, tower_name).weights}
        for path, value in tower_values.items():
            variable = variables.get(path)
            if variable is None or tuple(variable.shape) != value.shape:
                found = None if variable is None else tuple(variable.shape)
                raise WeightsError(
                    f"{tower_name}/{path}: the model has {found}, the checkpoint "
                    f"gives {value.shape}."
                )
            assignments.append((variable, value))
    for variable, value in assignments:
        variable.assign(value)
    if logit_scale is not None:
        model.logit_scale.assign(logit_scale)


def is_released_declip(state: dict[str, np.ndarray]) -> bool:
    """Whether a `state_dict` is the released DeCLIP code's (Sense-GVT/DeCLIP):
    OpenAI's `visual.*`, the text tower under `encode_text.` with a biased
    `text_projection` layer, and the SimSiam and MLM heads."""
    return "encode_text.token_embedding.weight" in state


def _released_heads(heads: dict[str, np.ndarray], model) -> dict:
    """The released SimSiam projector/predictor and MLM head as this model's
    variables. Their linear layers have biases before batch norm, which this
    model drops; in inference the bias only shifts the running mean, so it is
    folded there (exact in training too, where batch norm removes it)."""

    def take(key: str) -> np.ndarray:
        if key not in heads:
            raise WeightsError(f"The checkpoint has no {key!r}.")
        return heads.pop(key)

    def dense_bn(source: str, bn: str, target: str, into: str) -> dict:
        bias = take(f"{source}.bias")
        return {
            f"{into}/{target}_dense/kernel": take(f"{source}.weight").T,
            f"{into}/{target}_bn/gamma": take(f"{bn}.weight"),
            f"{into}/{target}_bn/beta": take(f"{bn}.bias"),
            f"{into}/{target}_bn/moving_mean": take(f"{bn}.running_mean") - bias,
            f"{into}/{target}_bn/moving_variance": take(f"{bn}.running_var"),
        }

    values = {}
    if model.ss_weight and "projector.linear1.weight" in heads:
        projector = {}
        for i in (1, 2, 3):
            projector.update(
                dense_bn(
                    f"projector.linear{i}",
                    f"projector.bn{i}",
                    f"proj{i}",
                    "simsiam_projector",
                )
            )
        values["projector"] = projector
        values["predictor"] = {
            **dense_bn(
                "predictor.linear1", "predictor.bn1", "pred1", "simsiam_predictor"
            ),
            "simsiam_predictor/pred2_dense/kernel": take("predictor.layer2.weight").T,
            "simsiam_predictor/pred2_dense/bias": take("predictor.layer2.bias"),
        }
    if model.mlm_weight and "text_label_predictor.weight" in heads:
        values["mlm_head"] = {
            "mlm_head/kernel": take("text_label_predictor.weight").T,
            "mlm_head/bias": take("text_label_predictor.bias"),
        }
    return values


def _split_released_declip(state: dict[str, np.ndarray]):
    """(the towers in OpenAI's layout, the text projection's bias, the rest)"""
    towers, rest = {}, {}
    for key, value in state.items():
        if key.startswith("encode_text."):
            towers[key.removeprefix("encode_text.")] = value
        elif key.startswith("visual.") or key == "logit_scale":
            towers[key] = value
        elif not key.startswith("nn_replacer"):  # the queues; training refills
            rest[key] = value
    towers["text_projection"] = _require(towers, "text_projection.weight").T
    del towers["text_projection.weight"]
    bias = _require(towers, "text_projection.bias")
    del towers["text_projection.bias"]
    return towers, bias, rest


def released_declip_overrides(state: dict[str, np.ndarray]) -> dict[str, Any]:
    """The preset fields of a released DeCLIP ViT `state_dict`."""
    towers, _, rest = _split_released_declip(state)
    overrides = openai_clip_overrides(towers)
    # Its vocabulary already holds the mask token.
    overrides["vocabulary_size"] = towers["token_embedding.weight"].shape[0]
    if "projector.linear1.weight" in rest:
        overrides["simsiam_projection_dim"] = rest["projector.linear1.weight"].shape[0]
        overrides["simsiam_prediction_dim"] = rest["predictor.linear1.weight"].shape[0]
    return overrides


def load_released_declip(model, state: dict[str, np.ndarray]) -> None:
    """Copies a released DeCLIP ViT checkpoint (towers, temperature, and the
    SimSiam and MLM heads the model has) into `model`, which must have its
    architecture (`released_declip_overrides`). Checkpoint tensors the model
    has no place for are an error, except the nearest-neighbour queues (a
    training run refills its own) and heads the model's loss weights switch
    off. Same rules as `load_openai_clip` otherwise."""
    towers, bias, rest = _split_released_declip(state)
    heads = _released_heads(rest, model)
    leftover = sorted(
        k
        for k in rest
        if not k.startswith(("projector.", "predictor.", "text_label_predictor."))
    )
    if leftover:
        raise WeightsError(
            f"The model has no place for {len(leftover)} checkpoint tensor(s), "
            f"e.g. {leftover[0]!r}."
        )
    heads.setdefault("text_encoder", {})["projection/bias"] = bias
    load_openai_clip(model, towers, extra=heads)


def _declip_token_rows(tokens: np.ndarray, vocabulary_size: int) -> np.ndarray:
    """CLIP's token embeddings in DeCLIP's vocabulary layout.

    CLIP ends its vocabulary with the start and end tokens (49406, 49407);
    DeCLIP puts its mask token before them (mask 49406, start 49407, end
    49408). With one row more in the model, the start and end rows move up by
    one and the mask row, the mean embedding, goes before them, so captions
    tokenized for DeCLIP meet CLIP's start and end embeddings.
    """
    if vocabulary_size != tokens.shape[0] + 1:
        return tokens
    mask = tokens.mean(0, keepdims=True)
    return np.concatenate([tokens[:-2], mask, tokens[-2:]])


def _keras_hub_backbone(directory: Path):
    import keras_hub

    # A local folder only: keras-hub would download a preset given by name.
    return keras_hub.models.CLIPBackbone.from_preset(str(directory))


def keras_hub_clip_overrides(backbone) -> dict[str, Any]:
    """The preset fields of a keras-hub `CLIPBackbone`."""
    vision, text = backbone.vision_encoder, backbone.text_encoder
    for encoder, width in ((vision, vision.hidden_dim), (text, text.hidden_dim)):
        if encoder.intermediate_dim != 4 * width:
            raise WeightsError(
                f"{encoder.name} has intermediate_dim {encoder.intermediate_dim}; "
                f"DeCLIP's towers use 4 x width = {4 * width}."
            )
        if encoder.intermediate_activation != "quick_gelu":
            raise WeightsError(
                f"{encoder.name} uses {encoder.intermediate_activation!r}; "
                "DeCLIP's towers use quick_gelu."
            )
    if text.embedding_dim != text.hidden_dim:
        raise WeightsError("The text encoder's embedding_dim differs from its width.")
    return {
        "image_encoder": "vit",
        "image_size": vision.image_shape[0],
        "patch_size": vision.patch_size,
        "vision_width": vision.hidden_dim,
        "vision_layers": vision.num_layers,
        "vision_heads": vision.num_heads,
        "text_width": text.hidden_dim,
        "text_layers": text.num_layers,
        "text_heads": text.num_heads,
        "context_length": text.max_sequence_length,
        "vocabulary_size": text.vocabulary_size + 1,
        "embed_dim": backbone.projection_dim,
    }


def load_keras_hub_clip(model, backbone) -> None:
    """Copies a keras-hub `CLIPBackbone`'s encoders, projections and logit
    scale into `model`, which must have its architecture
    (`keras_hub_clip_overrides`). Same rules as `load_openai_clip`."""
    values = {}
    pairs = (
        ("image_encoder", "vision_transformer", backbone.vision_encoder),
        ("text_encoder", "text_transformer", backbone.text_encoder),
    )
    for tower_name, inner, encoder in pairs:
        ours = getattr(model, tower_name).get_layer(inner).weights
        theirs = encoder.weights
        if len(ours) != len(theirs):
            raise WeightsError(
                f"{encoder.name} holds {len(theirs)} weights, the model's "
                f"{tower_name} {len(ours)}: their depths differ."
            )
        values[tower_name] = {
            mine.path: np.asarray(keras.ops.convert_to_numpy(their))
            for mine, their in zip(ours, theirs, strict=True)
        }
    text = model.text_encoder
    embeddings = "text_transformer_embedding/token_embedding/embeddings"
    values["text_encoder"][embeddings] = _declip_token_rows(
        values["text_encoder"][embeddings], text.vocabulary_size
    )
    kernel = keras.ops.convert_to_numpy
    values["image_encoder"]["projection/kernel"] = kernel(
        backbone.vision_projection.kernel
    )
    values["text_encoder"]["projection/kernel"] = kernel(
        backbone.text_projection.kernel
    )
    values["text_encoder"]["projection/bias"] = np.zeros(text.embed_dim, np.float32)
    scale = float(kernel(backbone.clip_head.logit_scale))
    _assign(model, values, scale)


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """A pretrained checkpoint read from disk: the preset fields it fixes and
    how to copy it into a model built with them."""

    architecture: dict[str, Any]
    load: Callable[[Any], None]


def read_pretrained(path: str | Path) -> Pretrained:
    """Reads an OpenAI-layout ViT CLIP checkpoint file (see
    `read_state_dict`), a released DeCLIP ViT checkpoint
    (`is_released_declip`) or a keras-hub CLIP preset folder."""
    path = Path(path)
    if path.is_dir():
        backbone = _keras_hub_backbone(path)
        return Pretrained(
            keras_hub_clip_overrides(backbone),
            lambda model: load_keras_hub_clip(model, backbone),
        )
    state = read_state_dict(path)
    if is_released_declip(state):
        return Pretrained(
            released_declip_overrides(state),
            lambda model: load_released_declip(model, state),
        )
    return Pretrained(
        openai_clip_overrides(state), lambda model: load_openai_clip(model, state)
    )


def import_checkpoint(path: str | Path, preset: str = "vitb32", **overrides: Any):
    """A `DeCLIP` holding a pretrained CLIP's (or DeCLIP's) weights.

    Args:
        path: a checkpoint file or keras-hub preset folder (`read_pretrained`).
        preset: the preset giving every field the checkpoint does not fix
            (loss weights, heads, queue).
        **overrides: further preset fields, e.g. `queue_size`; architecture
            fields must agree with the checkpoint.
    """
    from declip_keras.models.declip import DeCLIP

    pretrained = read_pretrained(path)
    model = DeCLIP.from_preset(preset, **{**pretrained.architecture, **overrides})
    pretrained.load(model)
    return model

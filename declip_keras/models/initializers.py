"""CLIP's initialisation scheme, as the released DeCLIP towers and heads use it.

The released code (Sense-GVT/DeCLIP, `visual_transformer.py`,
`text_transformer.py`, `modified_resnet.py`) draws CLIP's transformer weights
from normal distributions scaled by width and depth, and leaves every other
layer at PyTorch's defaults. Keras' defaults differ (Glorot), and the
difference is permanent where a layer is frozen: the ViT's patch convolution
starts 6x smaller under Glorot at ViT-B/32.

keras-hub's CLIP encoders take no initialiser arguments, so their weights are
drawn again after building (`initialize_vit`, `initialize_text_transformer`);
the layers this package builds itself take `torch_kernel` and `torch_bias`.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable

import keras

# PyTorch's default for Linear and Conv weights, kaiming-uniform with a = sqrt(5):
# U(-b, b) with b = 1 / sqrt(fan_in), a variance of 1 / (3 fan_in).
TORCH_KERNEL_SCALE = 1.0 / 3.0


def torch_kernel() -> keras.initializers.Initializer:
    """PyTorch's default Linear / Conv weight: U(+-1/sqrt(fan_in)).

    Example:
    >>> kernel = keras.ops.convert_to_numpy(torch_kernel()((400, 3)))
    >>> bool(abs(kernel).max() <= 1 / 20)
    True
    """
    return keras.initializers.VarianceScaling(
        TORCH_KERNEL_SCALE, mode="fan_in", distribution="uniform"
    )


def torch_bias(fan_in: int) -> keras.initializers.Initializer:
    """PyTorch's default Linear / Conv bias: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)
    return keras.initializers.RandomUniform(-bound, bound)


# A rule: a pattern of weight paths and what makes their initialiser. A Keras
# initialiser without a seed fixes one at construction and returns the same
# values at every call, so each weight gets a new one.
Rules = list[tuple[str, Callable[[], keras.initializers.Initializer]]]


def _normal(std: float) -> Callable[[], keras.initializers.Initializer]:
    return functools.partial(keras.initializers.RandomNormal, stddev=std)


def _redraw(layer: keras.layers.Layer, rules: Rules) -> None:
    """Draws each weight of `layer` whose path matches a rule's pattern (the
    first that does) from that rule's initialiser; the others keep theirs."""
    compiled = [(re.compile(pattern), make) for pattern, make in rules]
    for variable in layer.weights:
        for pattern, make in compiled:
            if pattern.search(variable.path):
                variable.assign(make()(variable.shape, variable.dtype))
                break


def block_rules(width: int, num_layers: int) -> Rules:
    """CLIP's scheme for the weights of keras-hub's transformer blocks.

    Attention in-projection std `width**-0.5`, out-projection and MLP output
    std `width**-0.5 * (2 * layers)**-0.5`, MLP input std `(2 * width)**-0.5`;
    the attention biases start at zero (PyTorch's `MultiheadAttention`) and
    the MLP biases at PyTorch's Linear default.
    """
    attention = width**-0.5
    projection = width**-0.5 * (2 * num_layers) ** -0.5
    return [
        (r"attention/(query|key|value)/kernel$", _normal(attention)),
        (r"attention/attention_output/kernel$", _normal(projection)),
        (r"attention/.*bias$", keras.initializers.Zeros),
        (r"block_\d+/dense_1/kernel$", _normal((2 * width) ** -0.5)),
        (r"block_\d+/dense_1/bias$", functools.partial(torch_bias, width)),
        (r"block_\d+/dense_2/kernel$", _normal(projection)),
        (r"block_\d+/dense_2/bias$", functools.partial(torch_bias, 4 * width)),
    ]


def initialize_vit(
    encoder: keras.layers.Layer,
    width: int,
    num_layers: int,
    projection: keras.layers.Layer,
) -> None:
    """Redraws keras-hub's `CLIPVisionEncoder` and the projection as released.

    Class embedding and projection `width**-0.5 * N(0, 1)`, position embedding
    N(0, 0.01), the patch convolution at PyTorch's default
    (std `1 / sqrt(3 * 3 * patch_size**2)`), the blocks by `block_rules`.
    """
    _redraw(
        encoder,
        [
            (r"class_embedding$", _normal(width**-0.5)),
            (r"position_embedding/embeddings$", _normal(0.01)),
            (r"patch_embedding/kernel$", torch_kernel),
            *block_rules(width, num_layers),
        ],
    )
    _redraw(projection, [(r"kernel$", _normal(width**-0.5))])


def initialize_text_transformer(
    encoder: keras.layers.Layer,
    width: int,
    num_layers: int,
    projection: keras.layers.Layer,
) -> None:
    """Redraws keras-hub's `CLIPTextEncoder` and the projection as released.

    Token embedding N(0, 0.02), position embedding N(0, 0.01), the blocks by
    `block_rules`, the projection weight std `width**-0.5` and its bias at
    PyTorch's Linear default.
    """
    _redraw(
        encoder,
        [
            (r"token_embedding/embeddings$", _normal(0.02)),
            (r"position_embedding/embeddings$", _normal(0.01)),
            *block_rules(width, num_layers),
        ],
    )
    _redraw(
        projection,
        [
            (r"kernel$", _normal(width**-0.5)),
            (r"bias$", functools.partial(torch_bias, width)),
        ],
    )

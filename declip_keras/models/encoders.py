"""Image and text towers built from keras-hub pieces where keras-hub has them.

Each tower is a functional `keras.Model` configured by a handful of
hyperparameters (its `get_config`), so it can be saved on its own as a `.keras`
file and rebuilt without downloading anything. Towers return *unnormalised*
features: DeCLIP's SimSiam branch works on the raw image features, and the
model normalises before every dot product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import Any

import keras
import keras_hub
from keras import ops

from declip_keras.backend import can_remat_blocks, synchronized_batch_norm
from declip_keras.models import initializers
from declip_keras.models.layers import PACKAGE, AttentionPool2D, EndTokenPooler


def _base_config(model: keras.Model) -> dict:
    # Like keras-hub backbones: serialise hyperparameters, not the graph.
    return {
        "name": model.name,
        "trainable": model.trainable,
        "dtype": keras.saving.serialize_keras_object(model.dtype_policy),
    }


def _remat_blocks(enabled: bool, transformer: str, num_layers: int):
    """Where keras-hub's transformer named `transformer` is built: with
    `enabled`, its blocks recompute their activations in the backward pass
    (activation checkpointing, `keras.RematScope`) instead of keeping them."""
    if not enabled or not can_remat_blocks():
        # Under TensorFlow the tower keeps its activations; `train` refuses
        # remat there, while loading such a file for inference still works.
        return contextlib.nullcontext()
    # keras-hub prefixes its layers' names with the backbone's.
    blocks = [f"{transformer}_encoder_block_{i}" for i in range(num_layers)]
    return keras.RematScope(mode="list_of_layers", layer_names=blocks)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ViTImageEncoder(keras.Model):
    """CLIP's vision transformer with a bias-free projection to `embed_dim`.

    keras-hub's `CLIPVisionEncoder` (pre and post layer norm, QuickGELU) pooled at
    the class token. As in the released DeCLIP ViT configs, the patch embedding
    convolution can stay frozen at its random initialisation (`freeze_conv1`).

    Args:
        image_size: height and width of the square input images.
        patch_size: side of the square patches.
        width: transformer width.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        embed_dim: width of the output features.
        freeze_patch_embedding: keep the patch convolution untrained.
        remat: recompute each block's activations in the backward pass.

    Shapes:
        input `[B, image_size, image_size, 3]` float, normalised with the ImageNet
        mean and std; output `[B, embed_dim]`.

    Example:
    >>> encoder = ViTImageEncoder(image_size=32, patch_size=8, width=64,
    ...                           num_layers=2, num_heads=2, embed_dim=32)
    >>> keras.ops.shape(encoder(keras.random.normal((2, 32, 32, 3))))
    (2, 32)
    """

    def __init__(
        self,
        image_size: int,
        patch_size: int,
        width: int,
        num_layers: int,
        num_heads: int,
        embed_dim: int,
        freeze_patch_embedding: bool = True,
        remat: bool = False,
        dtype=None,
        **kwargs,
    ):
        with _remat_blocks(remat, "vision_transformer", num_layers):
            backbone = keras_hub.models.CLIPVisionEncoder(
                patch_size=patch_size,
                hidden_dim=width,
                num_layers=num_layers,
                num_heads=num_heads,
                intermediate_dim=4 * width,
                image_shape=(image_size, image_size, 3),
                dtype=dtype,
                name="vision_transformer",
            )
        # keras-hub creates the patches' position indices as zeros and relies on
        # a preset's weights to hold 0, 1, 2, ...: without this every patch
        # would get position 0's embedding.
        positions = backbone.embedding.position_ids
        positions.assign(ops.arange(positions.shape[-1], dtype=positions.dtype)[None])
        if freeze_patch_embedding:
            backbone.embedding.patch_embedding.trainable = False
        images = keras.Input(shape=(image_size, image_size, 3), name="images")
        pooled = backbone({"images": images})[:, 0, :]  # the class token
        projection = keras.layers.Dense(
            embed_dim, use_bias=False, dtype=dtype, name="projection"
        )
        features = projection(pooled)
        initializers.initialize_vit(backbone, width, num_layers, projection)
        super().__init__(inputs=images, outputs=features, dtype=dtype, **kwargs)
        self.image_size = image_size
        self.patch_size = patch_size
        self.width = width
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.freeze_patch_embedding = freeze_patch_embedding
        self.remat = remat

    def get_config(self) -> dict:
        return {
            **_base_config(self),
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "embed_dim": self.embed_dim,
            "freeze_patch_embedding": self.freeze_patch_embedding,
            "remat": self.remat,
        }


def _conv_bn_relu(
    x, filters: int, kernel: int, stride: int, name: str, dtype, relu=True, zero=False
):
    if kernel > 1:
        # Symmetric padding as in PyTorch; "same" pads strided convs unevenly.
        x = keras.layers.ZeroPadding2D(kernel // 2, dtype=dtype, name=f"{name}_pad")(x)
    x = keras.layers.Conv2D(
        filters,
        kernel,
        strides=stride,
        use_bias=False,
        kernel_initializer=initializers.torch_kernel(),
        dtype=dtype,
        name=f"{name}_conv",
    )(x)
    x = keras.layers.BatchNormalization(
        momentum=0.9,
        epsilon=1e-5,
        gamma_initializer="zeros" if zero else "ones",
        # SyncBN, as the released RN50 trains; per replica where Keras has none.
        synchronized=synchronized_batch_norm(),
        dtype=dtype,
        name=f"{name}_bn",
    )(x)
    if relu:
        x = keras.layers.ReLU(dtype=dtype, name=f"{name}_relu")(x)
    return x


def _bottleneck(x, planes: int, stride: int, name: str, dtype):
    """CLIP's anti-aliased bottleneck: strides by average pooling, never by a conv."""
    shortcut = x
    x = _conv_bn_relu(x, planes, 1, 1, f"{name}_1", dtype)
    x = _conv_bn_relu(x, planes, 3, 1, f"{name}_2", dtype)
    if stride > 1:
        x = keras.layers.AveragePooling2D(stride, dtype=dtype, name=f"{name}_pool")(x)
    # Zero-initialised last norm: each residual branch starts as the zero function.
    x = _conv_bn_relu(x, planes * 4, 1, 1, f"{name}_3", dtype, relu=False, zero=True)
    if stride > 1 or shortcut.shape[-1] != planes * 4:
        if stride > 1:
            shortcut = keras.layers.AveragePooling2D(
                stride, dtype=dtype, name=f"{name}_down_pool"
            )(shortcut)
        shortcut = _conv_bn_relu(
            shortcut, planes * 4, 1, 1, f"{name}_down", dtype, False
        )
    x = keras.layers.Add(dtype=dtype, name=f"{name}_add")([x, shortcut])
    return keras.layers.ReLU(dtype=dtype, name=f"{name}_out")(x)


@keras.saving.register_keras_serializable(package=PACKAGE)
class ResNetImageEncoder(keras.Model):
    """CLIP's modified ResNet with attention pooling to `embed_dim`.

    A three-convolution stem followed by average pooling, bottleneck stages that
    downsample with average pooling (in the main branch and the shortcut), and
    `AttentionPool2D` in place of global average pooling. The last batch norm of
    each block starts at zero, as in CLIP. Written from Keras layers because
    keras-hub's ResNet-vd strides in its convolutions and max-pools in the stem.

    Args:
        image_size: height and width of the square input images (a multiple of 32).
        width: channels of the stem and of the first stage's bottleneck (RN50: 64);
            stage `k` has `width * 2**k` bottleneck channels and 4x that at its
            output.
        stage_depths: blocks per stage (RN50: `(3, 4, 6, 3)`).
        num_heads: heads of the attention pooling (RN50: 32).
        embed_dim: width of the output features.

    Shapes:
        input `[B, image_size, image_size, 3]`, output `[B, embed_dim]`.

    Example:
    >>> encoder = ResNetImageEncoder(image_size=64, width=8, stage_depths=(1, 1),
    ...                              num_heads=2, embed_dim=16)
    >>> keras.ops.shape(encoder(keras.random.normal((2, 64, 64, 3))))
    (2, 16)
    """

    def __init__(
        self,
        image_size: int,
        width: int,
        stage_depths: Sequence[int],
        num_heads: int,
        embed_dim: int,
        dtype=None,
        **kwargs,
    ):
        stage_depths = tuple(int(d) for d in stage_depths)
        images = keras.Input(shape=(image_size, image_size, 3), name="images")
        x = _conv_bn_relu(images, width // 2, 3, 2, "stem_1", dtype)
        x = _conv_bn_relu(x, width // 2, 3, 1, "stem_2", dtype)
        x = _conv_bn_relu(x, width, 3, 1, "stem_3", dtype)
        x = keras.layers.AveragePooling2D(2, dtype=dtype, name="stem_pool")(x)
        for stage, depth in enumerate(stage_depths):
            for block in range(depth):
                stride = 2 if stage > 0 and block == 0 else 1
                x = _bottleneck(
                    x,
                    width * 2**stage,
                    stride,
                    f"stage{stage + 1}_block{block + 1}",
                    dtype,
                )
        features = AttentionPool2D(
            num_heads=num_heads, output_dim=embed_dim, dtype=dtype, name="attnpool"
        )(x)
        super().__init__(inputs=images, outputs=features, dtype=dtype, **kwargs)
        self.image_size = image_size
        self.width = width
        self.stage_depths = stage_depths
        self.num_heads = num_heads
        self.embed_dim = embed_dim

    def get_config(self) -> dict:
        return {
            **_base_config(self),
            "image_size": self.image_size,
            "width": self.width,
            "stage_depths": list(self.stage_depths),
            "num_heads": self.num_heads,
            "embed_dim": self.embed_dim,
        }


@keras.saving.register_keras_serializable(package=PACKAGE)
class TextEncoder(keras.Model):
    """CLIP's causal text transformer with a biased projection to `embed_dim`.

    keras-hub's `CLIPTextEncoder` (QuickGELU, causal mask, final layer norm). The
    caption feature is read at the position of the largest token id, which is the
    end-of-text token in DeCLIP's vocabulary layout; the whole final-layer-norm
    sequence is returned too, for the masked-language-model head.

    Args:
        vocabulary_size: number of token ids (DeCLIP: 49,409).
        context_length: tokens per caption (CLIP: 77).
        width: transformer width.
        num_layers: number of transformer blocks.
        num_heads: attention heads per block.
        embed_dim: width of the output features.
        remat: recompute each block's activations in the backward pass.

    Shapes:
        input `[B, L]` int token ids, `L <= context_length`; outputs a dict
        with `"features"` `[B, embed_dim]` and `"sequence_output"`
        `[B, L, width]`.

    Example:
    >>> encoder = TextEncoder(vocabulary_size=100, context_length=8, width=32,
    ...                       num_layers=1, num_heads=2, embed_dim=16)
    >>> keras.ops.shape(encoder(keras.ops.ones((2, 8), "int32"))["features"])
    (2, 16)
    """

    def __init__(
        self,
        vocabulary_size: int,
        context_length: int,
        width: int,
        num_layers: int,
        num_heads: int,
        embed_dim: int,
        remat: bool = False,
        dtype=None,
        **kwargs,
    ):
        with _remat_blocks(remat, "text_transformer", num_layers):
            transformer = keras_hub.models.CLIPTextEncoder(
                vocabulary_size=vocabulary_size,
                embedding_dim=width,
                hidden_dim=width,
                num_layers=num_layers,
                num_heads=num_heads,
                intermediate_dim=4 * width,
                max_sequence_length=context_length,
                dtype=dtype,
                name="text_transformer",
            )
        # Any length up to `context_length`: batches may be trimmed to their
        # longest caption (`declip_keras.data.pipeline.trim_captions`).
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        sequence = transformer({"token_ids": token_ids})
        pooled = EndTokenPooler(dtype=dtype, name="pooler")(sequence, token_ids)
        projection = keras.layers.Dense(embed_dim, dtype=dtype, name="projection")
        features = projection(pooled)
        initializers.initialize_text_transformer(
            transformer, width, num_layers, projection
        )
        super().__init__(
            inputs=token_ids,
            outputs={"features": features, "sequence_output": sequence},
            dtype=dtype,
            **kwargs,
        )
        self.vocabulary_size = vocabulary_size
        self.context_length = context_length
        self.width = width
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.remat = remat

    def get_config(self) -> dict:
        return {
            **_base_config(self),
            "vocabulary_size": self.vocabulary_size,
            "context_length": self.context_length,
            "width": self.width,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "embed_dim": self.embed_dim,
            "remat": self.remat,
        }


def _vit_from_preset(config: dict[str, Any], dtype) -> ViTImageEncoder:
    return ViTImageEncoder(
        image_size=config["image_size"],
        patch_size=config["patch_size"],
        width=config["vision_width"],
        num_layers=config["vision_layers"],
        num_heads=config["vision_heads"],
        embed_dim=config["embed_dim"],
        freeze_patch_embedding=config["freeze_patch_embedding"],
        remat=config["remat"],
        dtype=dtype,
        name="image_encoder",
    )


def _resnet_from_preset(config: dict[str, Any], dtype) -> ResNetImageEncoder:
    return ResNetImageEncoder(
        image_size=config["image_size"],
        width=config["vision_width"],
        stage_depths=config["vision_layers"],
        num_heads=config["vision_heads"],
        embed_dim=config["embed_dim"],
        dtype=dtype,
        name="image_encoder",
    )


# The image tower kinds (the preset field `image_encoder`), each with the
# function that builds it from a resolved preset; preset checks read it too.
IMAGE_ENCODERS = {"vit": _vit_from_preset, "resnet": _resnet_from_preset}


def build_image_encoder(config: dict[str, Any], dtype=None) -> keras.Model:
    """The image tower a resolved preset (`preset_config`) describes."""
    kind = config["image_encoder"]
    if kind not in IMAGE_ENCODERS:
        raise ValueError(
            f"image_encoder must be one of {sorted(IMAGE_ENCODERS)}, got {kind!r}."
        )
    return IMAGE_ENCODERS[kind](config, dtype)


def build_text_encoder(config: dict[str, Any], dtype=None) -> TextEncoder:
    """The text tower a resolved preset (`preset_config`) describes."""
    return TextEncoder(
        vocabulary_size=config["vocabulary_size"],
        context_length=config["context_length"],
        width=config["text_width"],
        num_layers=config["text_layers"],
        num_heads=config["text_heads"],
        embed_dim=config["embed_dim"],
        remat=config["remat"],
        dtype=dtype,
        name="text_encoder",
    )

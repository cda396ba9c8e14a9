from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import to_numpy

from declip_keras import ResNetImageEncoder, TextEncoder, ViTImageEncoder
from declip_keras.models.encoders import build_image_encoder, build_text_encoder
from declip_keras.models.presets import preset_config


def count(weights) -> int:
    return int(sum(np.prod(w.shape) for w in weights))


def clip_vit_parameters(image_size, patch, width, layers, embed) -> int:
    """OpenAI CLIP's VisionTransformer, counted from its definition."""
    tokens = (image_size // patch) ** 2 + 1
    # attention (qkv + out, with biases), MLP (4x, with biases), two layer norms
    block = 4 * (width * width + width) + 8 * width * width + 5 * width + 4 * width
    # bias-free patch conv, class token, positions, ln_pre
    stem = 3 * patch * patch * width + width + tokens * width + 2 * width
    return stem + layers * block + 2 * width + width * embed


def clip_text_parameters(vocab, context, width, layers, embed) -> int:
    """CLIP's text transformer; DeCLIP's projection has a bias."""
    block = 4 * (width * width + width) + 8 * width * width + 5 * width + 4 * width
    return (
        vocab * width
        + context * width
        + layers * block
        + 2 * width
        + width * embed
        + embed
    )


def clip_resnet_parameters(image_size, width, depths, embed) -> int:
    """Trainable parameters of CLIP's ModifiedResNet, counted from its definition."""

    def conv_bn(cin, cout, k):
        return k * k * cin * cout + 2 * cout

    total = conv_bn(3, width // 2, 3) + conv_bn(width // 2, width // 2, 3)
    total += conv_bn(width // 2, width, 3)
    inplanes = width
    for stage, depth in enumerate(depths):
        planes = width * 2**stage
        for block in range(depth):
            total += conv_bn(inplanes, planes, 1) + conv_bn(planes, planes, 3)
            total += conv_bn(planes, 4 * planes, 1)
            if block == 0 and (stage > 0 or inplanes != 4 * planes):
                total += conv_bn(inplanes, 4 * planes, 1)
            inplanes = 4 * planes
    grid = image_size // 32
    channels = inplanes
    total += (grid * grid + 1) * channels + 3 * (channels * channels + channels)
    return total + channels * embed + embed


def test_vitb32_image_tower_has_clips_parameter_count():
    config = preset_config("vitb32")
    encoder = build_image_encoder(config)
    expected = clip_vit_parameters(224, 32, 768, 12, 512)
    assert expected == 87_849_216  # the published ViT-B/32 visual tower
    frozen = [w for w in encoder.non_trainable_weights if "patch" in w.path]
    assert count(frozen) == 3 * 32 * 32 * 768  # DeCLIP's freeze_conv1
    assert count(encoder.trainable_weights) + count(frozen) == expected


def test_text_tower_has_clips_parameter_count():
    encoder = build_text_encoder(preset_config("vitb32"))
    assert count(encoder.trainable_weights) == clip_text_parameters(
        49409, 77, 512, 12, 512
    )


def test_resnet_matches_clips_modified_resnet_count():
    depths = (2, 1, 1, 1)
    encoder = ResNetImageEncoder(
        image_size=64, width=16, stage_depths=depths, num_heads=4, embed_dim=32
    )
    assert count(encoder.trainable_weights) == clip_resnet_parameters(
        64, 16, depths, 32
    )
    # CLIP zero-initialises the last norm of every block.
    closing = [
        layer
        for layer in encoder.layers
        if layer.name.startswith("stage") and layer.name.endswith("_3_bn")
    ]
    assert len(closing) == sum(depths)
    assert all(np.all(to_numpy(layer.gamma) == 0) for layer in closing)


@pytest.mark.parametrize(
    "make",
    [
        lambda: ViTImageEncoder(
            image_size=32,
            patch_size=8,
            width=32,
            num_layers=1,
            num_heads=2,
            embed_dim=16,
        ),
        lambda: ResNetImageEncoder(
            image_size=64, width=8, stage_depths=(1, 1), num_heads=2, embed_dim=16
        ),
    ],
    ids=["vit", "resnet"],
)
def test_image_towers_save_and_load(make, tmp_path):
    encoder = make()
    size = encoder.image_size
    images = np.random.default_rng(0).standard_normal((3, size, size, 3), np.float32)
    features = to_numpy(encoder(images))
    assert features.shape == (3, 16)
    encoder.save(tmp_path / "tower.keras")
    restored = keras.models.load_model(tmp_path / "tower.keras")
    assert type(restored) is type(encoder)
    assert restored.get_config() == encoder.get_config()
    np.testing.assert_allclose(
        to_numpy(restored(images)), features, rtol=1e-5, atol=1e-6
    )


def test_vit_patch_embedding_is_frozen_only_when_asked():
    def trainable_patch_weights(freeze):
        encoder = ViTImageEncoder(
            image_size=32,
            patch_size=8,
            width=32,
            num_layers=1,
            num_heads=2,
            embed_dim=16,
            freeze_patch_embedding=freeze,
        )
        return [w for w in encoder.trainable_weights if "patch" in w.path]

    assert trainable_patch_weights(True) == []
    assert len(trainable_patch_weights(False)) == 1  # a bias-free kernel, as in CLIP


def test_text_tower_pools_at_the_end_token_and_ignores_what_follows(tmp_path):
    encoder = TextEncoder(
        vocabulary_size=50,
        context_length=8,
        width=32,
        num_layers=2,
        num_heads=2,
        embed_dim=16,
    )
    ids = np.array([[47, 5, 6, 49, 0, 0, 0, 0], [47, 5, 6, 49, 3, 3, 3, 3]], np.int32)
    features = to_numpy(encoder(ids)["features"])
    # Causal attention: tokens after the end token cannot change its feature.
    np.testing.assert_allclose(features[0], features[1], rtol=1e-5, atol=1e-6)
    encoder.save(tmp_path / "text.keras")
    restored = keras.models.load_model(tmp_path / "text.keras")
    np.testing.assert_allclose(
        to_numpy(restored(ids)["features"]), features, rtol=1e-5, atol=1e-6
    )


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="Keras' TensorFlow remat cannot wrap keras-hub's blocks (train refuses it)",
)
def test_remat_towers_give_the_same_loss_gradients(tmp_path):
    """Activation checkpointing recomputes the blocks in the backward pass:
    every term's gradient is unchanged, and the setting survives a save."""
    from helpers import small_batch, small_model

    from declip_keras.backend import loss_term_gradient_norms

    plain = small_model(vocabulary_size=1000)
    remat = small_model(vocabulary_size=1000, remat=True)
    remat.set_weights(plain.get_weights())
    batch = small_batch()

    def norms(model):
        groups = {
            "image": model.image_encoder.trainable_variables,
            "text": model.text_encoder.trainable_variables,
        }
        return loss_term_gradient_norms(model, batch, groups)

    expected, got = norms(plain), norms(remat)
    for term, by_group in expected.items():
        for group, value in by_group.items():
            assert got[term][group] == pytest.approx(value, rel=1e-5), (term, group)
    remat.save(tmp_path / "remat.keras")
    loaded = keras.models.load_model(tmp_path / "remat.keras")
    assert loaded.image_encoder.remat and loaded.text_encoder.remat


@pytest.mark.one_backend("torch", reason="counts eager calls; torch runs eagerly")
def test_remat_recomputes_the_blocks_in_the_backward_pass():
    """With remat, each transformer block runs again during the backward
    pass (the recomputation); without it, once."""
    import torch

    from declip_keras.models.encoders import ViTImageEncoder

    images = np.random.default_rng(0).standard_normal((2, 32, 32, 3)).astype("float32")
    calls = {}
    for remat in (False, True):
        encoder = ViTImageEncoder(
            image_size=32, patch_size=8, width=32, num_layers=2, num_heads=2,
            embed_dim=16, remat=remat,
        )  # fmt: skip
        block = encoder.get_layer("vision_transformer").get_layer(
            "vision_transformer_encoder_block_0"
        )
        count = [0]
        call = block.call

        def counting(*args, _call=call, _count=count, **kwargs):
            _count[0] += 1
            return _call(*args, **kwargs)

        block.call = counting
        encoder(torch.from_numpy(images), training=True).sum().backward()
        calls[remat] = count[0]
    assert calls == {False: 1, True: 2}

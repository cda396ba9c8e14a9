from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from declip_keras.data import augment

pytestmark = pytest.mark.backend_independent
LOW = (0 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD
HIGH = (1 - np.array(augment.IMAGENET_MEAN)) / augment.IMAGENET_STD


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 255, (12, 16, 3)), np.ones((25, 25, 1)))
    return tf.constant(smooth.astype(np.uint8))


def test_views_have_the_right_shape_and_normalised_range(image):
    for index in range(20):
        view = augment.random_view(image, tf.constant([0, index]), 48).numpy()
        assert view.shape == (48, 48, 3)
        assert np.all(view >= LOW[None, None] - 1e-5) and np.all(
            view <= HIGH[None, None] + 1e-5
        )


def test_views_are_independent_draws_and_reproducible(image):
    a = augment.random_view(image, tf.constant([3, 1]), 32).numpy()
    b = augment.random_view(image, tf.constant([3, 2]), 32).numpy()
    again = augment.random_view(image, tf.constant([3, 1]), 32).numpy()
    np.testing.assert_array_equal(a, again)
    assert np.abs(a - b).mean() > 0.05


def test_blur_matrix_equals_reflect_padded_convolution():
    sigma, radius, size = 1.3, 4, 20
    matrix = augment._blur_matrix(size, sigma, radius).numpy()
    np.testing.assert_allclose(matrix.sum(axis=1), 1.0, rtol=1e-6)
    signal = np.random.default_rng(1).random(size)
    taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    taps /= taps.sum()
    padded = np.pad(signal, radius, mode="reflect")
    expected = np.convolve(padded, taps, mode="valid")
    np.testing.assert_allclose(matrix @ signal, expected, rtol=1e-5)


def test_colour_maps_keep_grays_gray_and_zero_strength_is_identity():
    matrix, contrast, brightness = augment._jitter_matrix(tf.constant([0, 5]), 0.0, 0.0)
    np.testing.assert_allclose(matrix.numpy(), np.eye(3), atol=1e-5)
    assert float(contrast) == float(brightness) == 1.0
    for seed in range(5):
        matrix, _, _ = augment._jitter_matrix(tf.constant([seed, 0]), 0.0, 0.1)
        np.testing.assert_allclose(matrix.numpy().sum(axis=1), 1.0, atol=1e-5)


def test_about_a_fifth_of_views_are_gray(image):
    gray = 0
    for index in range(100):
        seed = tf.constant([7, index])
        view = augment.apply_photometric(
            tf.cast(image[:40, :40], tf.float32) / 255.0,
            augment.photometric_params(seed, 40),
        ).numpy()
        raw = view * augment.IMAGENET_STD + augment.IMAGENET_MEAN
        gray += np.allclose(raw[..., 0], raw[..., 1], atol=1e-4)
    assert 8 <= gray <= 35


def test_noflip_views_are_mocov2_views_never_mirrored(image):
    flips = 0
    for index in range(40):
        seed = tf.constant([9, index])
        released = augment.photometric_params(seed, 32).numpy()
        unmirrored = augment.photometric_params(seed, 32, "mocov2-noflip").numpy()
        flips += released[-1]
        # Same crop, colour and blur draws; only the flip is gone.
        np.testing.assert_array_equal(unmirrored[:-1], released[:-1])
        assert unmirrored[-1] == 0.0
        np.testing.assert_array_equal(
            augment.random_crop(image, seed, 32, "mocov2-noflip"),
            augment.random_crop(image, seed, 32),
        )
    assert 8 <= flips <= 32


def test_eval_view_resizes_and_centre_crops():
    wide = np.zeros((100, 300, 3), np.uint8)
    wide[:, 140:160] = 255  # a white bar in the middle survives the centre crop
    view = augment.eval_view(tf.constant(wide), 64).numpy()
    assert view.shape == (64, 64, 3)
    raw = view * augment.IMAGENET_STD + augment.IMAGENET_MEAN
    assert raw[:, 32].mean() > 0.9 and raw[:, 0].mean() < 0.1


def test_eval_view_of_a_batch_equals_each_image():
    images = np.random.default_rng(0).integers(0, 256, (3, 50, 70, 3), np.uint8)
    batch = augment.eval_view(tf.constant(images), 32).numpy()
    assert batch.shape == (3, 32, 32, 3)
    for image, view in zip(images, batch, strict=True):
        np.testing.assert_allclose(
            augment.eval_view(tf.constant(image), 32).numpy(), view, atol=1e-6
        )

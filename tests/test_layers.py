from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf
from helpers import to_numpy

from declip_keras.data import augment
from declip_keras.data.image_constants import IMAGENET_STD
from declip_keras.models.layers import (
    AttentionPool2D,
    ClipValue,
    EndTokenPooler,
    FeatureQueue,
    PhotometricAugmentation,
    UnitSphere,
)


def rows(start: int, count: int, dim: int = 3) -> np.ndarray:
    """Distinguishable rows: row k is filled with the value start + k."""
    return np.repeat(np.arange(start, start + count, dtype=np.float32)[:, None], dim, 1)


def test_queue_starts_with_unit_rows():
    queue = FeatureQueue(size=16, dim=5, replicas=2, seed=3)
    assert tuple(queue.features.shape) == (2, 16, 5)
    norms = np.linalg.norm(to_numpy(queue.features), axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    assert int(to_numpy(queue.pointer)) == 0


def test_queue_is_fifo_and_wraps_around():
    queue = FeatureQueue(size=5, dim=3, seed=0)
    initial = to_numpy(queue.features)[0].copy()
    queue.enqueue(rows(10, 2))
    np.testing.assert_array_equal(to_numpy(queue.features)[0, :2], rows(10, 2))
    np.testing.assert_array_equal(to_numpy(queue.features)[0, 2:], initial[2:])
    queue.enqueue(rows(20, 2))
    assert int(to_numpy(queue.pointer)) == 4
    # Three more rows: one fills the last slot, two overwrite the oldest rows.
    queue.enqueue(rows(30, 3))
    expected = np.concatenate([rows(31, 2), rows(20, 2), rows(30, 1)])
    np.testing.assert_array_equal(to_numpy(queue.features)[0], expected)
    assert int(to_numpy(queue.pointer)) == 2


def test_each_replica_fills_and_searches_its_own_queue():
    """Two replicas' rows in one batch (JAX's global view): block r of the
    rows goes into queue r, and block r's queries find neighbours in queue r
    only, even where the other queue holds a closer row."""
    queue = FeatureQueue(size=4, dim=2, replicas=2)
    east, north = np.array([[1, 0]], np.float32), np.array([[0, 1]], np.float32)
    west, south = -east, -north
    # Replica 0 enqueues east then north, replica 1 west then south.
    queue.enqueue(np.concatenate([east, north, west, south]))
    stored = to_numpy(queue.features)
    np.testing.assert_array_equal(stored[0, :2], np.concatenate([east, north]))
    np.testing.assert_array_equal(stored[1, :2], np.concatenate([west, south]))
    assert int(to_numpy(queue.pointer)) == 2
    # Fill the rest so that the random rows cannot be nearest.
    queue.enqueue(np.concatenate([east, north, west, south]))
    # Replica 0 asks for "almost west", replica 1 for "almost east".
    queries = np.array([[-0.9, 0.1], [0.1, 0.9], [0.9, -0.1], [0.1, -0.9]], "float32")
    found = to_numpy(queue.nearest(queries))
    np.testing.assert_array_equal(found, [[0, 1], [0, 1], [0, -1], [0, -1]])


def test_queue_reads_files_from_before_replicas():
    """A `.keras` file whose queue is `[Q, D]` loads as replica 0's queue."""
    queue = FeatureQueue(size=3, dim=2)
    old = {"0": np.arange(6, dtype="float32").reshape(3, 2), "1": np.int32(2)}
    queue.load_own_variables(old)
    np.testing.assert_array_equal(to_numpy(queue.features), old["0"][None])
    assert int(to_numpy(queue.pointer)) == 2


def test_queue_rejects_more_rows_than_it_holds():
    queue = FeatureQueue(size=4, dim=3)
    try:
        queue.enqueue(rows(0, 5))
    except ValueError as error:
        assert "5 rows" in str(error)
    else:
        raise AssertionError("expected a ValueError")


def test_queue_nearest_reads_current_contents():
    queue = FeatureQueue(size=4, dim=2)
    queue.enqueue(np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], np.float32))
    queries = np.array([[0.9, 0.1], [-0.2, -0.8]], np.float32)
    np.testing.assert_array_equal(to_numpy(queue.nearest(queries)), [[1, 0], [0, -1]])


def test_end_token_pooler_picks_the_largest_id():
    sequence = np.arange(2 * 4 * 3, dtype=np.float32).reshape(2, 4, 3)
    token_ids = np.array([[5, 9, 0, 0], [5, 2, 3, 9]], np.int32)
    pooled = to_numpy(EndTokenPooler()(sequence, token_ids))
    np.testing.assert_array_equal(pooled, sequence[[0, 1], [1, 3]])


def reference_attention_pool(layer: AttentionPool2D, x: np.ndarray) -> np.ndarray:
    """CLIP's AttentionPool2d written out in numpy from the layer's weights."""
    batch, _, _, channels = x.shape
    heads = layer.num_heads
    tokens = x.reshape(batch, -1, channels).astype(np.float64)
    tokens = np.concatenate([tokens.mean(1, keepdims=True), tokens], axis=1)
    tokens = tokens + to_numpy(layer.position_embedding)
    attention = layer.attention
    w = {v.path.split("/")[-2] + "/" + v.name: to_numpy(v) for v in attention.weights}

    def project(name, inputs):
        return (
            np.einsum("btc,chd->bthd", inputs, w[f"{name}/kernel"]) + w[f"{name}/bias"]
        )

    q = project("query", tokens[:, :1])
    k = project("key", tokens)
    v = project("value", tokens)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(channels // heads)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    mixed = np.einsum("bhqk,bkhd->bqhd", weights, v)
    out = np.einsum("bqhd,hdo->bqo", mixed, w["attention_output/kernel"])
    return (out + w["attention_output/bias"])[:, 0]


def test_attention_pool_matches_numpy():
    x = np.random.default_rng(0).standard_normal((3, 2, 3, 8)).astype(np.float32)
    layer = AttentionPool2D(num_heads=2, output_dim=5)
    got = to_numpy(layer(x))
    assert got.shape == (3, 5)
    np.testing.assert_allclose(
        got, reference_attention_pool(layer, x), rtol=1e-4, atol=1e-5
    )


def test_clip_value_and_unit_sphere_round_trip_their_config():
    clip = ClipValue(3.0, 6.0)
    np.testing.assert_allclose(to_numpy(clip(np.array([1.0, 4.0, 9.0]))), [3, 4, 6])
    assert ClipValue.from_config(clip.get_config()).get_config() == clip.get_config()
    draws = to_numpy(UnitSphere(seed=1)((100, 4)))
    np.testing.assert_allclose(np.linalg.norm(draws, axis=1), 1.0, rtol=1e-5)
    assert (
        keras.saving.deserialize_keras_object(
            keras.saving.serialize_keras_object(UnitSphere(seed=1))
        ).seed
        == 1
    )


def test_photometric_augmentation_equals_the_host_step():
    """On the device, the same parameters make the same views as the host's
    `apply_photometric`: colour maps with and without grayscale, blur or not,
    flip or not."""
    rng = np.random.default_rng(2)
    blocks = rng.integers(0, 256, (6, 8, 3))
    image = tf.constant(np.kron(blocks, np.ones((10, 10, 1))).astype(np.uint8))
    seeds = [tf.constant([7, index], tf.int64) for index in range(24)]
    crops = np.stack([augment.random_crop(image, seed, 40).numpy() for seed in seeds])
    params = np.stack([augment.photometric_params(seed, 40).numpy() for seed in seeds])
    colour = params[:, :9].reshape(-1, 3, 3) * np.array(IMAGENET_STD)[:, None]
    gray = np.all(np.abs(colour - colour[:, :1]) < 1e-6, axis=(1, 2))
    for branch in (gray, params[:, 10] > 0, params[:, 11] > 0):
        assert 0 < branch.mean() < 1  # the draws take both sides of each branch
    host = np.stack(
        [
            augment.apply_photometric(tf.constant(crop), tf.constant(row)).numpy()
            for crop, row in zip(crops, params, strict=True)
        ]
    )
    device = to_numpy(PhotometricAugmentation()(crops, params))
    np.testing.assert_allclose(device, host, atol=1e-5)

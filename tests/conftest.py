"""Shared helpers. The suite runs once per backend (`make test`)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

import declip_keras as dk

# Small enough that a forward and backward pass takes well under a second.
SMALL = {
    "vocabulary_size": 1000,
    "image_size": 32,
    "context_length": 16,
    "queue_size": 64,
    "seed": 1,
}


def small_model(**overrides) -> dk.DeCLIP:
    return dk.DeCLIP.from_preset("tiny", **{**SMALL, **overrides})


def small_batch(batch_size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    return dk.synthetic_batch(
        batch_size, SMALL["image_size"], SMALL["context_length"], 1000, seed=seed
    )


def to_numpy(x) -> np.ndarray:
    return np.asarray(keras.ops.convert_to_numpy(x))


def gradient(fn, x: np.ndarray) -> np.ndarray:
    """d fn(x) / dx for a scalar-valued fn of one array, on the active backend."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(fn)(x))
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        grad = tape.gradient(y, x)
        return np.zeros(x.shape, np.float32) if grad is None else grad.numpy()
    import torch

    x = torch.tensor(x, requires_grad=True)
    y = fn(x)
    if y.requires_grad:
        y.backward()
    return np.zeros(x.shape, np.float32) if x.grad is None else x.grad.numpy()


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory):
    """Two shards of 48 coloured-square pairs ("a red square on white", ...)."""
    import io

    import tensorflow as tf
    from PIL import Image

    from declip_keras.records import encode_example

    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    writers = [tf.io.TFRecordWriter(str(root / f"part-{i}.tfrecord")) for i in range(2)]
    for index in range(48):
        name = list(COLOURS)[index % 3]
        pixels = np.full((40, 40, 3), 255, np.uint8)
        x, y = rng.integers(0, 20, 2)
        pixels[y : y + 20, x : x + 20] = COLOURS[name]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        example = encode_example(
            str(index), buffer.getvalue(), "png", f"a {name} square"
        )
        writers[index % 2].write(example)
    for writer in writers:
        writer.close()
    return str(root / "part-*.tfrecord")

"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import keras
import numpy as np

from declip_keras.model import DeCLIP
from declip_keras.synthetic import synthetic_batch

# Small enough that a forward and backward pass takes well under a second.
SMALL = {
    "vocabulary_size": 1000,
    "image_size": 32,
    "context_length": 16,
    "queue_size": 64,
    "seed": 1,
}


def small_model(**overrides) -> DeCLIP:
    return DeCLIP.from_preset("tiny", **{**SMALL, **overrides})


def small_batch(batch_size: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    return synthetic_batch(
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


COLOURS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220)}


def summarize(variables, grads) -> dict[str, list[float]]:
    """Each gradient as its norm and a fixed random projection, which changes
    if any direction of the gradient changes."""
    summary = {}
    for index, (variable, grad) in enumerate(zip(variables, grads, strict=True)):
        grad = np.asarray(grad, np.float64)
        probe = np.random.default_rng(index).standard_normal(grad.shape)
        summary[variable.path] = [
            float(np.linalg.norm(grad)),
            float(np.sum(grad * probe)),
        ]
    return summary

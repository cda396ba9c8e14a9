"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import keras
import numpy as np

from declip_keras.data.synthetic import synthetic_batch
from declip_keras.models.declip import DeCLIP

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


def flip_byte_in_record(shard, index: int) -> None:
    """Flips one payload byte of record `index` (0-based) of a TFRecord
    shard: its checksum then fails, and no reader gets past it."""
    data = bytearray(shard.read_bytes())
    position = 0
    for _ in range(index):  # past whole records: length, its CRC, payload, CRC
        length = int.from_bytes(data[position : position + 8], "little")
        position += 12 + length + 4
    data[position + 12 + 40] ^= 0xFF
    shard.write_bytes(bytes(data))


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


def queue_probe(model, batch, replicas: int = 2) -> tuple[dict, np.ndarray]:
    """What a per-replica queue test needs before the step: the text
    embeddings the step will enqueue (the EDA view's, then the masked
    caption's, by `FeatureQueue`'s order) and queries that are the masked
    captions of the *other* replica's rows (each replica's block swapped with
    its neighbour's), so a search that reaches another replica's queue finds
    the query itself."""
    keys = ("eda_token_ids", "token_ids")
    views = [to_numpy(model.encode_text(batch[k])) for k in keys]
    blocks = np.split(views[1], replicas)
    queries = np.concatenate(blocks[1:] + blocks[:1])
    return {"views": [v.tolist() for v in views]}, queries


def check_per_replica_queues(expected: dict, queues, queries, found) -> None:
    """Replica r's queue holds its own rows of both views, in order, and its
    queries' neighbours are rows of its queue, never the other replica's."""
    views = [np.asarray(v) for v in expected["views"]]
    replicas = len(queues)
    for r, (queue, query, neighbour) in enumerate(
        zip(queues, np.split(queries, replicas), np.split(found, replicas), strict=True)
    ):
        queue = np.asarray(queue)
        own = np.concatenate([np.split(v, replicas)[r] for v in views])
        np.testing.assert_allclose(queue[: len(own)], own, atol=1e-5, err_msg=str(r))
        distances = np.abs(np.asarray(neighbour)[:, None] - queue[None]).max(-1)
        assert (distances.min(1) < 1e-6).all(), f"replica {r}: a neighbour elsewhere"
        assert not np.allclose(neighbour, query, atol=1e-4), f"replica {r}: itself"

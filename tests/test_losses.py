"""Each loss against an independent float64 numpy computation."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from helpers import gradient, to_numpy
from keras import ops

from declip_keras.models import losses

SHAPES = [(1, 4), (5, 8), (16, 32), (33, 7)]


def unit_rows(rng, shape) -> np.ndarray:
    x = rng.standard_normal(shape)
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def ref_info_nce(queries: np.ndarray, keys: np.ndarray, scale: float) -> float:
    """Cross-entropy of each query against all keys, target = same row index."""
    logits = scale * queries.astype(np.float64) @ keys.astype(np.float64).T
    return float(-np.mean(np.diag(log_softmax(logits, axis=1))))


def ref_cosine(p: np.ndarray, z: np.ndarray) -> float:
    p, z = p.astype(np.float64), z.astype(np.float64)
    cos = (p * z).sum(-1) / (np.linalg.norm(p, axis=-1) * np.linalg.norm(z, axis=-1))
    return float(cos.mean())


@pytest.mark.parametrize("shape", SHAPES)
def test_contrastive_loss_matches_numpy(shape):
    rng = np.random.default_rng(shape[0])
    images, texts = unit_rows(rng, shape), unit_rows(rng, shape)
    expected = 0.5 * (
        ref_info_nce(images, texts, 14.3) + ref_info_nce(texts, images, 14.3)
    )
    got = to_numpy(losses.contrastive_loss(images, texts, 14.3))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_contrastive_loss_is_low_for_matching_pairs():
    rng = np.random.default_rng(0)
    embeddings = unit_rows(rng, (8, 64))
    matched = to_numpy(losses.contrastive_loss(embeddings, embeddings, 100.0))
    shuffled = to_numpy(losses.contrastive_loss(embeddings, embeddings[::-1], 100.0))
    assert matched < 0.01 < np.log(8) < shuffled


@pytest.mark.parametrize("num_images,num_texts", [(1, 1), (2, 1), (2, 2)])
def test_multi_view_contrastive_loss_averages_every_pair(num_images, num_texts):
    rng = np.random.default_rng(3)
    images = [unit_rows(rng, (6, 16)) for _ in range(num_images)]
    texts = [unit_rows(rng, (6, 16)) for _ in range(num_texts)]
    expected = np.mean(
        [
            0.5 * (ref_info_nce(i, t, 20.0) + ref_info_nce(t, i, 20.0))
            for i in images
            for t in texts
        ]
    )
    got = to_numpy(losses.multi_view_contrastive_loss(images, texts, 20.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("replicas", [2, 4])
def test_local_queries_on_global_keys_average_to_the_global_loss(replicas):
    """Each replica's rows against the gathered batch, labels offset by rank:
    the mean over replicas is the one-device loss (contrastive and NN)."""
    rng = np.random.default_rng(replicas)
    images, texts, neighbors = (unit_rows(rng, (8, 16)) for _ in range(3))
    local = 8 // replicas
    contrastive, neighbor = [], []
    for rank in range(replicas):
        rows = slice(rank * local, (rank + 1) * local)
        contrastive.append(
            losses.multi_view_contrastive_loss(
                [images[rows]], [texts[rows]], 9.0, [images], [texts], rank * local
            )
        )
        neighbor.append(
            losses.nearest_neighbor_loss(
                images[rows], neighbors[rows], 9.0, neighbors, rank * local
            )
        )
    expected = 0.5 * (
        ref_info_nce(images, texts, 9.0) + ref_info_nce(texts, images, 9.0)
    )
    np.testing.assert_allclose(
        np.mean(to_numpy(ops.stack(contrastive))), expected, rtol=1e-5
    )
    np.testing.assert_allclose(
        np.mean(to_numpy(ops.stack(neighbor))),
        ref_info_nce(images, neighbors, 9.0),
        rtol=1e-5,
    )


@pytest.mark.parametrize("shape", SHAPES)
def test_simsiam_loss_matches_numpy(shape):
    rng = np.random.default_rng(shape[1])
    p1, p2, z1, z2 = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    expected = -0.5 * (ref_cosine(p1, z2) + ref_cosine(p2, z1))
    got = to_numpy(losses.simsiam_loss(p1, p2, z1, z2))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_simsiam_gradient_stops_at_the_projections():
    rng = np.random.default_rng(0)
    p1, p2, z1, z2 = (rng.standard_normal((4, 8)).astype(np.float32) for _ in range(4))
    grad_z = gradient(lambda z: losses.simsiam_loss(p1, p2, z, z2), z1)
    grad_p = gradient(lambda p: losses.simsiam_loss(p, p2, z1, z2), p1)
    assert np.all(grad_z == 0)
    assert np.abs(grad_p).max() > 1e-3


@pytest.mark.parametrize("batch,masked,vocab", [(1, 1, 5), (4, 3, 50), (8, 12, 1000)])
def test_masked_lm_loss_matches_numpy(batch, masked, vocab):
    rng = np.random.default_rng(vocab)
    logits = (3 * rng.standard_normal((batch, masked, vocab))).astype(np.float32)
    labels = rng.integers(0, vocab, (batch, masked)).astype(np.int32)
    weights = (rng.random((batch, masked)) > 0.3).astype(np.float32)
    weights[0, 0] = 1.0
    nll = -np.take_along_axis(
        log_softmax(logits.astype(np.float64), axis=-1), labels[..., None], axis=-1
    )[..., 0]
    expected = (nll * weights).sum() / weights.sum()
    got = to_numpy(losses.masked_lm_loss(logits, labels, weights))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_masked_lm_loss_is_zero_without_masked_tokens():
    logits = np.random.default_rng(0).standard_normal((2, 3, 7)).astype(np.float32)
    labels = np.zeros((2, 3), np.int32)
    got = to_numpy(losses.masked_lm_loss(logits, labels, np.zeros((2, 3), np.float32)))
    assert got == 0.0
    grad = gradient(
        lambda x: losses.masked_lm_loss(x, labels, np.zeros((2, 3), np.float32)), logits
    )
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("batch,queue_size,dim", [(1, 1, 3), (4, 10, 8), (16, 100, 32)])
def test_nearest_neighbors_matches_numpy(batch, queue_size, dim):
    rng = np.random.default_rng(batch)
    queries, queue = unit_rows(rng, (batch, dim)), unit_rows(rng, (queue_size, dim))
    expected = queue[np.argmax(queries @ queue.T, axis=1)]
    got = to_numpy(losses.nearest_neighbors(queries, queue))
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_nearest_neighbors_finds_a_planted_row():
    rng = np.random.default_rng(1)
    queue = unit_rows(rng, (50, 16))
    queries = queue[[7, 3, 49]] + 0.01 * rng.standard_normal((3, 16)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    got = to_numpy(losses.nearest_neighbors(queries, queue))
    np.testing.assert_array_equal(got, queue[[7, 3, 49]])


@pytest.mark.parametrize("shape", SHAPES)
def test_nearest_neighbor_loss_matches_numpy(shape):
    rng = np.random.default_rng(7)
    images, neighbors = unit_rows(rng, shape), unit_rows(rng, shape)
    expected = ref_info_nce(images, neighbors, 50.0)
    got = to_numpy(losses.nearest_neighbor_loss(images, neighbors, 50.0))
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_neighbor_branch_carries_no_gradient_to_the_text_side():
    rng = np.random.default_rng(2)
    images, queue = unit_rows(rng, (4, 8)), unit_rows(rng, (12, 8))
    texts = unit_rows(rng, (4, 8))

    def loss_of_texts(t):
        return losses.nearest_neighbor_loss(
            images, losses.nearest_neighbors(t, queue), 10.0
        )

    def loss_of_images(i):
        return losses.nearest_neighbor_loss(
            i, losses.nearest_neighbors(texts, queue), 10.0
        )

    assert np.all(gradient(loss_of_texts, texts) == 0)
    assert np.abs(gradient(loss_of_images, images)).max() > 1e-3


def test_l2_normalize_epsilon():
    x = np.array([[3.0, 4.0]], np.float32)
    np.testing.assert_allclose(to_numpy(losses.l2_normalize(x)), [[0.6, 0.8]])
    np.testing.assert_allclose(
        to_numpy(losses.l2_normalize(x, epsilon=5.0)), [[0.3, 0.4]], rtol=1e-6
    )


def test_losses_compute_in_float32_for_bfloat16_inputs():
    rng = np.random.default_rng(0)
    images = ops.cast(unit_rows(rng, (4, 8)), "bfloat16")
    texts = ops.cast(unit_rows(rng, (4, 8)), "bfloat16")
    loss = losses.contrastive_loss(images, texts, 10.0)
    assert keras.backend.standardize_dtype(loss.dtype) == "float32"

"""DeCLIP's loss functions, written in `keras.ops` so they run on every backend.

All functions take float tensors and return a scalar (or, for
`nearest_neighbors`, a tensor without gradient). They compute in float32
whatever the input dtype, so a bfloat16 forward pass still gets a float32 loss.

Shapes: `B` is the batch size, `D` the embedding width, `Q` the queue length,
`M` the number of masked positions per caption and `V` the vocabulary size.
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import ops


def l2_normalize(x, epsilon: float = 0.0):
    """Divides the last axis by its L2 norm plus `epsilon`.

    The released DeCLIP code adds `1e-10` to the norm of text embeddings only;
    `epsilon` lets callers reproduce that exactly.
    """
    norm = ops.sqrt(ops.sum(ops.square(x), axis=-1, keepdims=True))
    return x / (norm + epsilon)


def _cross_entropy(logits, labels):
    """Mean cross-entropy of the rows of `logits` `[b, N]` at integer `labels` `[b]`."""
    log_probs = ops.log_softmax(logits, axis=-1)
    labels = ops.expand_dims(ops.cast(labels, "int32"), -1)
    return -ops.mean(ops.take_along_axis(log_probs, labels, axis=-1))


def _labels(queries, offset):
    """Row `i` of this replica's queries matches key `offset + i`."""
    return ops.cast(offset, "int32") + ops.arange(ops.shape(queries)[0], dtype="int32")


def _scaled_similarity(queries, keys, logit_scale):
    queries = ops.cast(queries, "float32")
    keys = ops.cast(keys, "float32")
    return ops.cast(logit_scale, "float32") * ops.matmul(queries, ops.transpose(keys))


def contrastive_loss(
    image_embeddings,
    text_embeddings,
    logit_scale,
    image_keys=None,
    text_keys=None,
    offset=0,
):
    """Symmetric InfoNCE loss of CLIP, optionally of local queries on global keys.

    Args:
        image_embeddings: `[b, D]`, L2-normalised.
        text_embeddings: `[b, D]`, L2-normalised; row `i` pairs with image `i`.
        logit_scale: scalar multiplier `s` of the cosine similarities (already
            exponentiated).
        image_keys, text_keys: `[N, D]`, the embeddings of the whole global
            batch when it is split over replicas (default: the local ones).
        offset: index in the keys of this replica's first row (rank x b).

    Returns:
        Scalar `0.5 * (CE(s I T_k^T, labels) + CE(s T I_k^T, labels))` with
        `labels = offset + arange(b)`. With one replica that is CLIP's loss;
        split over replicas, the mean of every replica's value equals it
        (OpenCLIP's `local_loss` with gathered features).
    """
    image_keys = image_embeddings if image_keys is None else image_keys
    text_keys = text_embeddings if text_keys is None else text_keys
    labels = _labels(image_embeddings, offset)
    image_to_text = _cross_entropy(
        _scaled_similarity(image_embeddings, text_keys, logit_scale), labels
    )
    text_to_image = _cross_entropy(
        _scaled_similarity(text_embeddings, image_keys, logit_scale), labels
    )
    return 0.5 * (image_to_text + text_to_image)


def multi_view_contrastive_loss(
    image_views: Sequence,
    text_views: Sequence,
    logit_scale,
    image_keys: Sequence | None = None,
    text_keys: Sequence | None = None,
    offset=0,
):
    """DeCLIP's multi-view supervision: `contrastive_loss` averaged over pairs.

    Args:
        image_views: list of `[b, D]` L2-normalised image embeddings.
        text_views: list of `[b, D]` L2-normalised text embeddings.
        logit_scale: scalar multiplier `s`.
        image_keys, text_keys: per view, `[N, D]` global keys (see
            `contrastive_loss`); default the views themselves.
        offset: index in the keys of this replica's first row.

    Returns:
        The mean of `contrastive_loss` over every image-view x text-view pair.
        With one view of each it is the plain CLIP loss.
    """
    image_keys = image_views if image_keys is None else image_keys
    text_keys = text_views if text_keys is None else text_keys
    losses = [
        contrastive_loss(image, text, logit_scale, image_key, text_key, offset)
        for image, image_key in zip(image_views, image_keys, strict=True)
        for text, text_key in zip(text_views, text_keys, strict=True)
    ]
    return ops.mean(ops.stack(losses))


def _mean_cosine(p, z):
    p = l2_normalize(ops.cast(p, "float32"))
    z = l2_normalize(ops.cast(z, "float32"))
    return ops.mean(ops.sum(p * z, axis=-1))


def simsiam_loss(p1, p2, z1, z2):
    """SimSiam's symmetric negative cosine similarity.

    Args:
        p1, p2: `[B, P]` predictor outputs of image views 1 and 2.
        z1, z2: `[B, P]` projector outputs of views 1 and 2; no gradient flows
            into them.

    Returns:
        Scalar `-0.5 * (mean cos(p1, sg(z2)) + mean cos(p2, sg(z1)))`, in [-1, 1].
    """
    # convert_to_tensor first: torch's stop_gradient rejects numpy arrays.
    z1 = ops.stop_gradient(ops.convert_to_tensor(z1))
    z2 = ops.stop_gradient(ops.convert_to_tensor(z2))
    return -0.5 * (_mean_cosine(p1, z2) + _mean_cosine(p2, z1))


def masked_lm_loss(logits, labels, weights):
    """Weighted mean cross-entropy over masked token positions.

    Args:
        logits: `[B, M, V]` predictions at the masked positions.
        labels: `[B, M]` integer ids of the original tokens.
        weights: `[B, M]`, 1 for a real masked position and 0 for padding.

    Returns:
        Scalar `sum(w * CE) / sum(w)`, and 0 (not NaN) when every weight is 0.
    """
    logits = ops.cast(logits, "float32")
    weights = ops.cast(weights, "float32")
    labels = ops.expand_dims(ops.cast(labels, "int32"), axis=-1)
    # log Z - z_label: no log-probabilities over the vocabulary are written
    # out, and the gradient is softmax - one-hot in one fused pass.
    target = ops.squeeze(ops.take_along_axis(logits, labels, axis=-1), -1)
    token_nll = ops.logsumexp(logits, axis=-1) - target
    return ops.divide_no_nan(ops.sum(token_nll * weights), ops.sum(weights))


def nearest_neighbors(queries, queue):
    """Top-1 cosine nearest neighbour of each query among the queue's rows.

    Args:
        queries: `[B, D]`, L2-normalised, or `[R, B, D]`: `R` sets of queries,
            set `r` searching queue `r`.
        queue: `[Q, D]` (or `[R, Q, D]`), L2-normalised.

    Returns:
        `[B, D]` (or `[R, B, D]`): for each query the row of its queue with the
        largest dot product. No gradient flows through the result.
    """
    if len(queue.shape) == 2:
        return nearest_neighbors(ops.expand_dims(queries, 0), queue[None])[0]
    queries = ops.cast(ops.stop_gradient(ops.convert_to_tensor(queries)), queue.dtype)
    index = ops.argmax(ops.matmul(queries, ops.swapaxes(queue, -1, -2)), axis=-1)
    # One gather from the stacked queues: row r * Q + index of the flat rows.
    sets, rows, dim = ops.shape(queue)
    index = index + ops.arange(sets, dtype=index.dtype)[:, None] * rows
    flat = ops.reshape(queue, (-1, dim))
    return ops.stop_gradient(ops.take(flat, index, axis=0))


def nearest_neighbor_loss(
    image_embeddings, neighbor_embeddings, logit_scale, neighbor_keys=None, offset=0
):
    """Image-to-text InfoNCE against nearest-neighbour captions.

    Args:
        image_embeddings: `[b, D]`, L2-normalised.
        neighbor_embeddings: `[b, D]`, the neighbour of caption `i` in row `i`.
        logit_scale: scalar multiplier `s`.
        neighbor_keys: `[N, D]`, the neighbours of the whole global batch when
            it is split over replicas (default: `neighbor_embeddings`).
        offset: index in the keys of this replica's first row.

    Returns:
        Scalar `CE(s I N_k^T, offset + arange(b))`, image->text direction only.
    """
    keys = neighbor_embeddings if neighbor_keys is None else neighbor_keys
    logits = _scaled_similarity(image_embeddings, keys, logit_scale)
    return _cross_entropy(logits, _labels(image_embeddings, offset))

"""Layers that DeCLIP needs and neither Keras nor keras-hub provides."""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from declip_keras.data.image_constants import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LUMA,
    blur_radius,
)
from declip_keras.models.initializers import torch_bias
from declip_keras.models.losses import l2_normalize, nearest_neighbors

PACKAGE = "declip_keras"


@keras.saving.register_keras_serializable(package=PACKAGE)
class ClipValue(keras.constraints.Constraint):
    """Clamps a variable to `[min_value, max_value]` after every optimizer step.

    The released DeCLIP configs clamp the log temperature to `[3, 6]` around each
    step; Keras optimizers apply a variable's constraint right after updating it,
    inside the compiled step, on every backend.
    """

    def __init__(self, min_value: float, max_value: float):
        self.min_value = float(min_value)
        self.max_value = float(max_value)

    def __call__(self, w):
        return ops.clip(w, self.min_value, self.max_value)

    def get_config(self) -> dict:
        return {"min_value": self.min_value, "max_value": self.max_value}


@keras.saving.register_keras_serializable(package=PACKAGE)
class UnitSphere(keras.initializers.Initializer):
    """Random rows drawn uniformly on the unit sphere (normal, then L2-normalised).

    The released DeCLIP code fills its neighbour queue this way before any
    caption has been enqueued.
    """

    def __init__(self, seed: int | None = None):
        self.seed = seed

    def __call__(self, shape, dtype=None):
        rows = keras.random.normal(shape, dtype=dtype, seed=self.seed)
        return l2_normalize(rows)

    def get_config(self) -> dict:
        return {"seed": self.seed}


@keras.saving.register_keras_serializable(package=PACKAGE)
class EndTokenPooler(keras.layers.Layer):
    """Picks each caption's feature at its end-of-text token.

    CLIP and DeCLIP give the end token the largest id in the vocabulary, so its
    position is `argmax(token_ids)`, whatever the padding id.

    Shapes:
        inputs `[B, L, W]` sequence and `[B, L]` token ids; output `[B, W]`.
    """

    def call(self, sequence, token_ids):
        end = ops.argmax(token_ids, axis=-1)[:, None, None]
        return ops.squeeze(ops.take_along_axis(sequence, end, axis=1), axis=1)

    def compute_output_shape(self, sequence_shape, token_ids_shape):
        return (sequence_shape[0], sequence_shape[2])


@keras.saving.register_keras_serializable(package=PACKAGE)
class AttentionPool2D(keras.layers.Layer):
    """CLIP's attention pooling of a convolutional feature map.

    The mean of the spatial positions is prepended as an extra token, a learned
    position embedding is added, and one multi-head attention layer whose only
    query is that mean token produces the pooled output.

    Args:
        num_heads: number of attention heads (CLIP RN50: 32).
        output_dim: width of the pooled output (the embedding width).

    Shapes:
        input `[B, H, W, C]` (channels last), output `[B, output_dim]`.

    Example:
    >>> pool = AttentionPool2D(num_heads=4, output_dim=64)
    >>> keras.ops.shape(pool(keras.random.normal((2, 7, 7, 128))))
    (2, 64)
    """

    def __init__(self, num_heads: int, output_dim: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.output_dim = output_dim

    def build(self, input_shape):
        _, height, width, channels = input_shape
        if channels % self.num_heads:
            raise ValueError(
                f"AttentionPool2D: channels ({channels}) must be divisible by "
                f"num_heads ({self.num_heads})."
            )
        self.position_embedding = self.add_weight(
            name="position_embedding",
            shape=(height * width + 1, channels),
            initializer=keras.initializers.RandomNormal(stddev=channels**-0.5),
        )
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=channels // self.num_heads,
            output_shape=self.output_dim,
            # CLIP's attention pooling: every projection N(0, channels**-0.5),
            # the biases at PyTorch's Linear default.
            kernel_initializer=keras.initializers.RandomNormal(stddev=channels**-0.5),
            bias_initializer=torch_bias(channels),
            dtype=self.dtype_policy,
            name="attention",
        )
        sequence_shape = (input_shape[0], height * width + 1, channels)
        self.attention.build(
            (input_shape[0], 1, channels), sequence_shape, sequence_shape
        )

    def call(self, inputs):
        batch = ops.shape(inputs)[0]
        tokens = ops.reshape(inputs, (batch, -1, inputs.shape[-1]))
        mean_token = ops.mean(tokens, axis=1, keepdims=True)
        tokens = ops.concatenate([mean_token, tokens], axis=1)
        tokens = tokens + ops.cast(self.position_embedding, tokens.dtype)
        pooled = self.attention(tokens[:, :1], tokens, tokens)
        return ops.squeeze(pooled, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.output_dim)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update({"num_heads": self.num_heads, "output_dim": self.output_dim})
        return config


@keras.saving.register_keras_serializable(package=PACKAGE)
class FeatureQueue(keras.layers.Layer):
    """FIFO queues of L2-normalised embeddings, one per replica, as released.

    Used for DeCLIP's nearest-neighbour supervision. The released code keeps
    one queue per GPU, fed with that GPU's own rows and searched by them
    alone. Where one step function sees every replica's rows (JAX's global
    view), the queue holds `replicas` slices `[replicas, Q, D]`: the batch's
    rows split into `replicas` equal consecutive blocks, as data parallelism
    shards it, and block `r` is searched against and written into slice `r`.
    Where each replica runs its own step (`tf.distribute`, torchrun),
    `replicas` is 1 and the variable itself is the replica's own (under
    `tf.distribute` it is synchronised on read: each replica keeps its copy,
    and a checkpoint holds replica 0's).

    The queue and its write pointer are ordinary Keras variables, so they are
    saved with the model, and `enqueue` inside a training step persists on
    JAX, TensorFlow and torch.

    Args:
        size: rows `Q` of each replica's queue (DeCLIP: 65,536).
        dim: embedding width `D`.
        replicas: queues held, one per replica whose rows a step sees.
        seed: seed of the random unit vectors the queues start with.

    Example:
    >>> queue = FeatureQueue(size=8, dim=4)
    >>> queue.enqueue(keras.ops.eye(4))
    >>> int(queue.pointer)
    4
    """

    def __init__(
        self, size: int, dim: int, replicas: int = 1, seed: int | None = None, **kwargs
    ):
        super().__init__(**kwargs)
        self.size = size
        self.dim = dim
        self.replicas = replicas
        self.seed = seed
        # float32 whatever the model's compute dtype: the queue only stores
        # normalised vectors and bf16 would blur its nearest-neighbour ranking.
        # Synchronised on read: under tf.distribute each replica keeps its own
        # copy (`add_weight` has no such argument); elsewhere a plain variable.
        with keras.name_scope(self.name, caller=self):
            self.features = keras.Variable(
                UnitSphere(seed),
                shape=(replicas, size, dim),
                dtype="float32",
                trainable=False,
                synchronization="on_read",
                aggregation="only_first_replica",
                name="features",
            )
        # Every replica writes as many rows per step, so pointers agree.
        self.pointer = self.add_weight(
            name="pointer",
            shape=(),
            dtype="int32",
            initializer="zeros",
            trainable=False,
            aggregation="only_first_replica",
        )
        self.built = True

    def _per_replica(self, rows):
        """`[N, D]` -> `[replicas, N / replicas, D]`, consecutive blocks."""
        count = rows.shape[0]
        if count is not None and count % self.replicas:
            raise ValueError(
                f"FeatureQueue: {count} rows do not split over {self.replicas} "
                "replicas' queues."
            )
        return ops.reshape(rows, (self.replicas, -1, self.dim))

    def nearest(self, queries):
        """Top-1 cosine neighbour of each `[N, D]` query in its replica's
        queue, `[N, D]`, without gradient."""
        queries = self._per_replica(queries)
        return ops.reshape(nearest_neighbors(queries, self.features), (-1, self.dim))

    def enqueue(self, rows) -> None:
        """Writes `[N, D]` rows at the pointer, wrapping around: block `r` of
        `N / replicas` rows (at most Q) into replica `r`'s queue."""
        rows = self._per_replica(
            ops.cast(ops.stop_gradient(ops.convert_to_tensor(rows)), "float32")
        )
        count = rows.shape[1]
        if count is not None and count > self.size:
            raise ValueError(
                f"FeatureQueue: cannot enqueue {count} rows into a queue of "
                f"{self.size}."
            )
        count = ops.shape(rows)[1]
        slots = (self.pointer + ops.arange(count, dtype="int32")) % self.size
        # Row (r, i) goes to slot r * Q + slots[i] of the flattened queues.
        offsets = ops.arange(self.replicas, dtype="int32")[:, None] * self.size
        indices = ops.reshape(offsets + slots[None], (-1, 1))
        flat = ops.reshape(self.features, (-1, self.dim))
        flat = ops.scatter_update(flat, indices, ops.reshape(rows, (-1, self.dim)))
        self.features.assign(ops.reshape(flat, (self.replicas, self.size, self.dim)))
        self.pointer.assign((self.pointer + count) % self.size)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            {
                "size": self.size,
                "dim": self.dim,
                "replicas": self.replicas,
                "seed": self.seed,
            }
        )
        return config

    def load_own_variables(self, store) -> None:
        # Files written before the queue was kept per replica hold `[Q, D]`.
        if len(store["0"].shape) == 2:
            store = {"0": np.asarray(store["0"])[None], "1": store["1"]}
        super().load_own_variables(store)


def _reflected_taps(size: int, radius: int) -> np.ndarray:
    """`[size, 2 * radius + 1, size]`: one-hot source pixel of each blur tap,
    reflected at the borders (as `declip_keras.data.augment` pads)."""
    offsets = np.arange(-radius, radius + 1)
    source = np.abs(np.arange(size)[:, None] + offsets)
    source = np.where(source >= size, 2 * (size - 1) - source, source)
    return (source[..., None] == np.arange(size)).astype("float32")


@keras.saving.register_keras_serializable(package=PACKAGE)
class PhotometricAugmentation(keras.layers.Layer):
    """The photometric half of MoCo v2's augmentation, from drawn parameters.

    The host draws each view's parameters (`declip_keras.data.augment
    .photometric_params`) and crops; this layer applies them to a batch on the
    accelerator: the fused colour jitter and grayscale map with normalisation,
    a clip to the image range, the Gaussian blur and the flip. It computes
    what `declip_keras.data.augment.apply_photometric` computes per view on the
    host. `DeCLIP` applies it to every image view whose batch carries a
    `declip_keras.data.batch_format.PHOTOMETRIC` key.

    Shapes:
        inputs: images float `[B, S, S, 3]` in [0, 1] and params float32
        `[B, 12]` (layout in `declip_keras.data.batch_format`); output float32
        `[B, S, S, 3]`, ImageNet-normalised.

    Example:
    >>> import numpy as np
    >>> std = np.array([0.229, 0.224, 0.225], "float32")
    >>> # Identity colour map, no blur, flipped: normalise and mirror.
    >>> params = np.concatenate([(np.eye(3) / std[:, None]).ravel(),
    ...                          [0.0, 0.0, 1.0]])[None].astype("float32")
    >>> images = np.random.rand(1, 8, 8, 3).astype("float32")
    >>> views = PhotometricAugmentation()(images, params)
    >>> mean = np.array([0.485, 0.456, 0.406], "float32")
    >>> bool(np.allclose(views, (images[:, :, ::-1] - mean) / std, atol=1e-5))
    True
    """

    def call(self, images, params):
        images = ops.cast(images, "float32")
        params = ops.cast(params, "float32")
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        matrix = ops.reshape(params[:, :9], (-1, 3, 3))
        coefficient, sigma, flip = params[:, 9], params[:, 10], params[:, 11]
        mean_luma = ops.sum(ops.mean(images, axis=(1, 2)) * np.array(LUMA), -1)
        offset = (coefficient[:, None] * mean_luma[:, None] - mean) / std
        views = ops.einsum("bhwc,bdc->bhwd", images, matrix) + offset[:, None, None]
        views = ops.minimum(ops.maximum(views, -mean / std), (1 - mean) / std)
        vertical = self._blur_matrices(sigma, images.shape[1], images.shape[1])
        horizontal = self._blur_matrices(sigma, images.shape[2], images.shape[1])
        views = ops.einsum("bij,bjwc->biwc", vertical, views)
        views = ops.einsum("bhwc,bvw->bhvc", views, horizontal)
        flipped = ops.reshape(flip > 0.5, (-1, 1, 1, 1))
        return ops.where(flipped, ops.flip(views, axis=2), views)

    @staticmethod
    def _blur_matrices(sigma, size: int, view_size: int):
        """`[B, size, size]` Gaussian blur matrices; the identity where sigma is 0."""
        radius = blur_radius(view_size)
        offsets = np.arange(-radius, radius + 1, dtype="float32")
        blur = sigma > 0
        safe_sigma = ops.where(blur, sigma, 1.0)
        kernel = ops.exp(-0.5 * ops.square(offsets / safe_sigma[:, None]))
        kernel = kernel / ops.sum(kernel, axis=-1, keepdims=True)
        matrices = ops.einsum("bk,iks->bis", kernel, _reflected_taps(size, radius))
        identity = np.eye(size, dtype="float32")
        return ops.where(ops.reshape(blur, (-1, 1, 1)), matrices, identity)

    def compute_output_shape(self, images_shape, params_shape):
        return images_shape

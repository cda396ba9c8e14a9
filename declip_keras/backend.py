"""The only place with backend-specific code; one function per need."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import keras


def sync_model_state(model: keras.Model) -> None:
    """Makes `model.weights` current inside `fit` (before saving, say).

    The JAX trainer keeps the training state outside the Keras variables
    between steps and writes it back only when asked.
    """
    if keras.backend.backend() == "jax":
        model.jax_state_sync()


@dataclasses.dataclass(frozen=True)
class Replicas:
    """How a run is spread: devices in all, and this host among the hosts."""

    devices: int = 1
    host_index: int = 0
    host_count: int = 1
    strategy: Any = None  # a tf.distribute strategy, under TensorFlow

    def scope(self) -> contextlib.AbstractContextManager:
        """Where models and optimizers must be built (TensorFlow strategies)."""
        return self.strategy.scope() if self.strategy else contextlib.nullcontext()


def configure_distribution() -> Replicas:
    """Spreads training over every device the backend sees.

    JAX: `keras.distribution.DataParallel` over all devices; the jitted step
    sees the global batch, so contrastive and neighbour losses use global
    negatives with no explicit gather (XLA adds the collectives). With
    `JAX_COORDINATOR_ADDRESS` set (or on a TPU pod), `jax.distributed` joins
    the hosts first and each host reads its share of the shards.
    TensorFlow: `MultiWorkerMirroredStrategy` when `TF_CONFIG` describes a
    cluster, `MirroredStrategy` over two or more GPUs; each replica's step
    sees its slice of the batch and `gather_replicas` supplies global keys.
    torch: one process on one device.
    """
    backend = keras.backend.backend()
    if backend == "tensorflow":
        return _tf_distribution()
    if backend != "jax":
        return Replicas()
    import jax

    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        jax.distributed.initialize()
    devices = jax.devices()
    if len(devices) > 1:
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices)
        )
    return Replicas(len(devices), jax.process_index(), jax.process_count())


def _tf_distribution() -> Replicas:
    import tensorflow as tf

    if "TF_CONFIG" in os.environ:
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        resolver = strategy.cluster_resolver
        tasks = resolver.cluster_spec().as_dict()
        # The chief (if any) is host 0 and the workers follow it.
        chiefs = len(tasks.get("chief", []))
        host = resolver.task_id + (chiefs if resolver.task_type == "worker" else 0)
        hosts = chiefs + len(tasks.get("worker", []))
        return Replicas(strategy.num_replicas_in_sync, host, hosts, strategy)
    if len(tf.config.list_logical_devices("GPU")) > 1:
        strategy = tf.distribute.MirroredStrategy()
        return Replicas(strategy.num_replicas_in_sync, strategy=strategy)
    return Replicas()


def _tf_replica_context():
    """TensorFlow's replica context when a step runs split over replicas."""
    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return None
    return context


def gather_replicas(x):
    """`[b, ...]` of every replica concatenated to `[N, ...]`, with gradient.

    Under `tf.distribute` each replica's step sees its own slice of the batch,
    so contrastive keys must be gathered (the gather's gradient sums the
    upstream gradients and hands each replica its slice). A JAX data-parallel
    step already sees the global batch, and torch runs one process: `x` as is.
    """
    context = _tf_replica_context()
    return x if context is None else context.all_gather(x, axis=0)


def replica_offset(local_batch):
    """Index of this replica's first row in `gather_replicas`' output."""
    context = _tf_replica_context()
    if context is None:
        return 0
    return context.replica_id_in_sync_group * local_batch


def scale_loss_for_replicas(loss):
    """Divides by the replica count where the trainer sums replicas' gradients.

    Keras' TensorFlow trainer sums gradients over replicas and multiplies the
    logged loss back; its own losses pre-divide, so a `compute_loss` override
    must too.
    """
    context = _tf_replica_context()
    return loss if context is None else loss / context.num_replicas_in_sync


def can_export_saved_model() -> bool:
    """JAX (through jax2tf) and TensorFlow write SavedModels; torch cannot."""
    return keras.backend.backend() in ("jax", "tensorflow")

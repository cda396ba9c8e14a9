"""The only place with backend-specific code; one function per need."""

from __future__ import annotations

import dataclasses
import os

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


def configure_distribution() -> Replicas:
    """Spreads training over every device the backend sees.

    JAX: `keras.distribution.DataParallel` over all devices; the jitted step
    sees the global batch, so contrastive and neighbour losses use global
    negatives with no explicit gather (XLA adds the collectives). With
    `JAX_COORDINATOR_ADDRESS` set (or on a TPU pod), `jax.distributed` joins
    the hosts first and each host reads its share of the shards. TensorFlow
    and torch: one device (see README for what is and is not supported).
    """
    if keras.backend.backend() != "jax":
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


def can_export_saved_model() -> bool:
    """JAX (through jax2tf) and TensorFlow write SavedModels; torch cannot."""
    return keras.backend.backend() in ("jax", "tensorflow")

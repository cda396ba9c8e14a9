"""The only place with backend-specific code; one function per need."""

from __future__ import annotations

import keras


def sync_model_state(model: keras.Model) -> None:
    """Makes `model.weights` current inside `fit` (before saving, say).

    The JAX trainer keeps the training state outside the Keras variables
    between steps and writes it back only when asked.
    """
    if keras.backend.backend() == "jax":
        model.jax_state_sync()

"""The Keras private APIs this library relies on, each in one place.

Keras 3 has no public way to do what these do. Each says why it is needed,
and `tests/test_compat.py` checks each against the installed Keras, so an
upgrade that moves one fails there, by name, rather than deep in a run.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import keras

from declip_keras.models.layers import PACKAGE


def torch_fused_adamw() -> type:
    """Keras' multi-tensor AdamW for the torch backend (`torch._foreach`).

    Keras swaps it in for `keras.optimizers.AdamW` itself but not for a
    subclass, which would update variable by variable; subclassing it
    directly keeps the fused update (`declip_keras.backend.keras_adamw`).
    """
    from keras.src.backend.torch.optimizers.torch_adamw import AdamW

    return AdamW


def nested_layers(layer: keras.layers.Layer) -> list[keras.layers.Layer]:
    """`layer` and every layer inside it, at any depth.

    `Layer.layers` lists only direct children, and a keras-hub tower nests
    its batch norms several levels down; `_flatten_layers` is the walk
    Keras itself uses for its weights.
    """
    return list(layer._flatten_layers())


@contextlib.contextmanager
def values_replaced(variables: Sequence, values: Sequence) -> Iterator[None]:
    """Inside, each of `variables` holds the matching value as it is; after,
    its own again.

    Saving reads a variable's `_value`. `assign` would lay the value out
    again by the variable's layout, across hosts the very split to undo
    (`declip_keras.backend.whole_state`), so the value is set where Keras
    keeps it.
    """
    originals = [v._value for v in variables]
    try:
        for variable, value in zip(variables, values, strict=True):
            variable._value = value
        yield
    finally:
        for variable, value in zip(variables, originals, strict=True):
            variable._value = value


class FitsAcrossWorkers:
    """A `keras.Model` mixin with which Keras 3's TensorFlow `fit` runs under
    `MultiWorkerMirroredStrategy`; other trainers never call what it changes.

    Two steps of that trainer fail across workers (tensorflow#72388):
    - it draws a batch and reduces it with the strategy before checking
      whether anything is left to build (`_maybe_symbolic_build`), and the
      strategy cannot reduce a dict of per-replica batches: skipped when the
      model and its optimizer are built and no loss or metric is compiled,
      as a run here builds them before `fit`;
    - it reduces each replica's logs with `strategy.reduce("MEAN", axis=0)`,
      which fails on scalars (`_collective_all_reduce_multi_worker` decides):
      length-1 vectors reduce to the same scalars.
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        unbuilt = [
            not all(layer.built for layer in nested_layers(self)),
            self.optimizer is not None and not self.optimizer.built,
            *(
                part is not None and not part.built
                for part in (self._compile_loss, self._compile_metrics)
            ),
        ]
        if any(unbuilt):
            super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def get_metrics_result(self):
        logs = super().get_metrics_result()
        if keras.backend.backend() != "tensorflow":
            return logs
        import tensorflow as tf
        from keras.src.backend.tensorflow.trainer import (
            _collective_all_reduce_multi_worker,
        )

        if not tf.distribute.has_strategy() or tf.distribute.in_cross_replica_context():
            return logs
        if _collective_all_reduce_multi_worker(tf.distribute.get_strategy()):
            return {name: tf.reshape(value, [1]) for name, value in logs.items()}
        return logs


# `LossScaleOptimizer` calls one of these when the scaled gradients overflow:
# the stateful one under TensorFlow and torch, the stateless one under JAX.
NON_FINITE_HOOKS = (
    "_stateful_handle_non_finite_grads",
    "_stateless_handle_non_finite_grads",
)


@keras.saving.register_keras_serializable(package=PACKAGE)
class CountingLossScaleOptimizer(keras.optimizers.LossScaleOptimizer):
    """Dynamic loss scaling (float16) whose skipped steps still count.

    Keras' `LossScaleOptimizer` skips the update when the scaled gradients
    overflow and leaves `iterations` (its inner optimizer's) where it was. A
    run here counts its steps, names its checkpoints and positions its data
    stream by `iterations`, so a skipped step advances it too; the learning
    rate schedule then moves on, as PyTorch's does beside its `GradScaler`.
    The weights and the moments are untouched by a skipped step.

    Example (a scale of 2**40 overflows float16, so the step is skipped):
    >>> from keras import ops
    >>> model = keras.Sequential([keras.layers.Dense(1, dtype="mixed_float16")])
    >>> model.build((None, 2))
    >>> before = ops.convert_to_numpy(model.layers[0].kernel)
    >>> optimizer = CountingLossScaleOptimizer(
    ...     keras.optimizers.SGD(), initial_scale=2.0**40)
    >>> model.compile(optimizer=optimizer, loss="mse")
    >>> _ = model.fit(ops.ones((4, 2)), ops.ones((4, 1)), verbose=0)
    >>> int(optimizer.iterations), float(optimizer.dynamic_scale) == 2.0**39
    (1, True)
    >>> bool((ops.convert_to_numpy(model.layers[0].kernel) == before).all())
    True
    """

    def _stateful_handle_non_finite_grads(self):
        super()._stateful_handle_non_finite_grads()
        self.iterations.assign_add(1)

    def _stateless_handle_non_finite_grads(
        self, optimizer_variables, trainable_variables
    ):
        trainable_variables, optimizer_variables = (
            super()._stateless_handle_non_finite_grads(
                optimizer_variables, trainable_variables
            )
        )
        mapping = list(zip(self.variables, optimizer_variables, strict=True))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            self.iterations.assign_add(1)
        return trainable_variables, [scope.get_current_value(v) for v in self.variables]

"""Each Keras private API in `declip_keras.compat` against the installed Keras:
an upgrade that moves one fails here, by name."""

import keras
import numpy as np
import pytest

from declip_keras.compat import (
    NON_FINITE_HOOKS,
    CountingLossScaleOptimizer,
    FitsAcrossWorkers,
    nested_layers,
    torch_fused_adamw,
    values_replaced,
)


def test_torch_fused_adamw_is_what_keras_runs_for_adamw_under_torch():
    fused = torch_fused_adamw()
    assert issubclass(fused, keras.optimizers.AdamW)
    if keras.backend.backend() == "torch":
        # Keras swaps it in for its own AdamW, which is why it is subclassed.
        assert type(keras.optimizers.AdamW(1e-3)) is fused


def test_nested_layers_reaches_layers_inside_layers():
    inner = keras.Sequential([keras.layers.Dense(2), keras.layers.BatchNormalization()])
    outer = keras.Sequential([inner, keras.layers.Dense(1)])
    outer.build((None, 3))
    assert not any(
        isinstance(layer, keras.layers.BatchNormalization) for layer in outer.layers
    )
    found = nested_layers(outer)
    assert sum(isinstance(layer, keras.layers.BatchNormalization) for layer in found)
    assert outer in found and inner in found


def test_loss_scale_optimizer_still_calls_the_hooks_overridden():
    for hook in NON_FINITE_HOOKS:
        assert callable(getattr(keras.optimizers.LossScaleOptimizer, hook, None)), hook
        assert hook in vars(CountingLossScaleOptimizer), hook


def test_an_overflowing_step_still_counts_through_fit():
    model = keras.Sequential([keras.layers.Dense(1, dtype="mixed_float16")])
    model.build((None, 2))
    optimizer = CountingLossScaleOptimizer(
        keras.optimizers.SGD(), initial_scale=2.0**40
    )
    model.compile(optimizer=optimizer, loss="mse")
    model.fit(np.ones((8, 2)), np.ones((8, 1)), batch_size=4, epochs=1, verbose=0)
    assert int(optimizer.iterations) == 2
    assert float(optimizer.dynamic_scale) == 2.0**38


def test_values_replaced_swaps_values_and_restores_them():
    variable = keras.Variable(np.zeros(3, "float32"))
    with pytest.raises(RuntimeError), values_replaced([variable], [keras.ops.ones(3)]):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), 1.0)
        raise RuntimeError
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), 0.0)


def test_fits_across_workers_overrides_what_the_tensorflow_trainer_calls():
    """The hooks it overrides and the private names it reads still exist; the
    two-worker test in test_distribution runs them."""
    tf = pytest.importorskip("tensorflow")
    from keras.src.backend.tensorflow import trainer

    assert callable(trainer.TensorFlowTrainer._maybe_symbolic_build)
    assert callable(keras.Model.get_metrics_result)
    assert not trainer._collective_all_reduce_multi_worker(tf.distribute.get_strategy())
    model = keras.Model()
    assert model._compile_loss is None and model._compile_metrics is None
    for hook in ("_maybe_symbolic_build", "get_metrics_result"):
        assert hook in vars(FitsAcrossWorkers), hook

"""Backend-specific helpers, checked on every backend."""

from __future__ import annotations

import keras
import pytest
from helpers import small_batch, small_model

from declip_keras.backend import loss_term_gradient_norms


def test_each_terms_gradient_reaches_only_the_towers_it_depends_on():
    batch = small_batch()

    def norms(**weights):
        keras.utils.set_random_seed(0)  # the same initial weights each time
        model = small_model(**weights)
        model(batch)
        groups = {
            "image": model.image_encoder.trainable_variables,
            "text": model.text_encoder.trainable_variables,
        }
        return loss_term_gradient_norms(model, batch, groups)

    result = norms()
    assert set(result) == {"clip_loss", "ss_loss", "mlm_loss", "nn_loss"}
    # The contrastive term trains both towers; SimSiam only the image tower;
    # MLM only the text tower; NNS only the image tower (neighbours are detached).
    assert result["clip_loss"]["image"] > 0 and result["clip_loss"]["text"] > 0
    assert result["ss_loss"]["image"] > 0 and result["ss_loss"]["text"] == 0
    assert result["mlm_loss"]["image"] == 0 and result["mlm_loss"]["text"] > 0
    assert result["nn_loss"]["image"] > 0 and result["nn_loss"]["text"] == 0
    # Norms are of the weighted terms: doubling a weight doubles its norm.
    doubled = norms(clip_weight=0.8)
    for tower in ("image", "text"):
        assert doubled["clip_loss"][tower] == pytest.approx(
            2 * result["clip_loss"][tower], rel=1e-3
        )


def test_a_batch_is_split_per_replica_only_under_tf_distribute():
    """MLM targets are packed per slice a step sees (`trim_captions`): the
    host's replicas under `tf.distribute`; JAX's jitted step and each torch
    process see their host's whole batch."""
    from declip_keras.backend import Replicas

    strategy = object()  # stands for a tf.distribute strategy
    assert Replicas(devices=4, strategy=strategy).batch_splits == 4
    assert Replicas(8, host_index=1, host_count=2, strategy=strategy).batch_splits == 4
    assert Replicas(devices=8, host_count=2).batch_splits == 1  # JAX, 2 hosts
    assert Replicas(devices=4, host_count=4).batch_splits == 1  # torchrun


@pytest.mark.backend_independent
@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"JAX_NUM_PROCESSES": "2"}, "JAX_PROCESS_ID not"),
        ({}, "JAX_NUM_PROCESSES and JAX_PROCESS_ID not"),
        ({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "2"}, r"not in 0\.\.1"),
        ({"JAX_NUM_PROCESSES": "two", "JAX_PROCESS_ID": "0"}, "must be integers"),
    ],
)
def test_joining_jax_processes_names_what_the_environment_lacks(
    monkeypatch, environ, message
):
    """Checked before `jax.distributed` is asked, which would wait for peers
    or fail with a message that does not name the variable."""
    from declip_keras.backend import _join_jax_processes

    for name in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "127.0.0.1:1")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        _join_jax_processes()

"""Run by test_distribution.py under JAX: with two simulated CPU devices, or
as one of two processes joined by `jax.distributed` (JAX_COORDINATOR_ADDRESS
set), one CPU device each.

Computes DeCLIP's loss terms and their gradients for one global batch on one
device and under `keras.distribution.DataParallel` over two, prints both.
"""

import json
import os
import sys

import jax
import keras
from helpers import queue_probe, summarize

import declip_keras as dk
from declip_keras.backend import configure_distribution


def terms_and_grads(model, batch):
    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]

    def loss(trainable_values, batch):
        outputs, _ = model.stateless_call(
            trainable_values, non_trainable, batch, training=True
        )
        terms = model.compute_loss_terms(batch, outputs)
        picked = {k: terms[k] for k in ("loss", "clip_loss", "nn_loss", "ss_loss")}
        return terms["loss"], picked

    (_, terms), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(
        trainable, batch
    )
    summary = summarize(model.trainable_variables, grads)
    return {k: float(v) for k, v in terms.items()}, summary


def per_replica_queues(model_path: str) -> dict:
    """One fit step of a model with a queue per device (as `train` builds it),
    with learning rate 0; each device's queue and neighbours after it."""
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=5)
    model = keras.models.load_model(model_path)
    assert model.queue_replicas == 2
    expected, queries = queue_probe(model, batch)
    model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    model.fit(batch, batch_size=8, epochs=1, shuffle=False, verbose=0)
    layout = keras.distribution.distribution().get_data_layout(queries.shape)
    sharded = keras.distribution.distribute_tensor(queries, layout)
    found = jax.jit(model.queue.nearest)(sharded)
    features = model.queue.features.value
    return {
        **expected,
        "queue_shards": [list(s.data.shape) for s in features.addressable_shards],
        "queues": keras.ops.convert_to_numpy(features).tolist(),
        "queries": queries.tolist(),
        "found": keras.ops.convert_to_numpy(found).tolist(),
    }


def main(model_path: str, queue_model_path: str) -> None:
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=4)
    model = keras.models.load_model(model_path)
    single = terms_and_grads(model, batch)

    replicas = configure_distribution()
    assert replicas.devices == 2, replicas
    model = keras.models.load_model(model_path)  # variables laid out for the mesh
    layout = keras.distribution.distribution().get_data_layout((8, 32, 32, 3))
    sharded = {
        k: keras.distribution.distribute_tensor(v, layout)
        if k.startswith("image")
        else v
        for k, v in batch.items()
    }
    parallel = terms_and_grads(model, sharded)
    model.compile(optimizer="adamw")
    history = model.fit(batch, batch_size=8, epochs=1, verbose=0).history
    print(
        json.dumps(
            {
                "single": single,
                "parallel": parallel,
                "fit": history,
                "devices": [str(d) for d in jax.devices()],
                "queue": per_replica_queues(queue_model_path),
            }
        )
    )


def across_processes(model_path: str) -> None:
    """The same comparison with the two devices in two processes; the first
    prints it. The processes join before any JAX op, as JAX requires."""
    replicas = configure_distribution()
    assert (replicas.host_count, replicas.devices) == (2, 2), replicas
    distribution = keras.distribution.distribution()
    # The same initial draws on each (load_model overwrites them), as
    # `device_put` onto both processes' devices requires.
    keras.utils.set_random_seed(0)
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=4)  # the same on each
    keras.distribution.set_distribution(None)  # this process's device alone
    single = terms_and_grads(keras.models.load_model(model_path), batch)
    keras.distribution.set_distribution(distribution)
    model = keras.models.load_model(model_path)  # variables on both processes
    mesh = distribution.device_mesh.backend_mesh
    rows = distribution.get_data_layout((8, 32, 32, 3))
    everywhere = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharded = {
        k: keras.distribution.distribute_tensor(
            v, rows if k.startswith("image") else everywhere
        )
        for k, v in batch.items()
    }
    parallel = terms_and_grads(model, sharded)
    if replicas.host_index == 0:
        print(json.dumps({"single": single, "parallel": parallel}))


if __name__ == "__main__":
    if "JAX_COORDINATOR_ADDRESS" in os.environ:
        across_processes(*sys.argv[1:])
    else:
        main(*sys.argv[1:])

"""Run by test_distribution.py under TensorFlow with two logical CPUs, or as
one of two workers of a `TF_CONFIG` cluster (one CPU replica each).

Computes DeCLIP's contrastive and nearest-neighbour terms and the gradients
of their weighted sum for one global batch on one device and under
`MirroredStrategy` over two, then runs `fit` under the strategy; prints JSON.
"""

import contextlib
import json
import os
import sys

import tensorflow as tf

ACROSS_WORKERS = "TF_CONFIG" in os.environ
if not ACROSS_WORKERS:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2
    )

import keras  # noqa: E402
from helpers import queue_probe, summarize  # noqa: E402

import declip_keras as dk  # noqa: E402
from declip_keras.backend import scale_loss_for_replicas  # noqa: E402
from declip_keras.data.masking import pack_targets  # noqa: E402

TERMS = ("loss", "clip_loss", "nn_loss")


def split_over(strategy, batch):
    """A global batch as the strategy's replicas see it: rows in equal
    consecutive blocks, replica 0's first."""
    dataset = tf.data.Dataset.from_tensors(batch)
    return next(iter(strategy.experimental_distribute_dataset(dataset)))


def replica_step(model, batch):
    with tf.GradientTape() as tape:
        terms = model.compute_loss_terms(batch, model(batch, training=True))
        loss = scale_loss_for_replicas(terms["loss"])
    # Dense, so embedding gradients (IndexedSlices) reduce and compare too.
    grads = [
        tf.convert_to_tensor(g) for g in tape.gradient(loss, model.trainable_variables)
    ]
    return {k: terms[k] for k in TERMS}, grads


def per_replica_queues(strategy, model_path: str) -> dict:
    """One `fit` step with learning rate 0; each replica's queue (its copy of
    the variable) and the neighbours its rows find after it."""
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=5)
    with strategy.scope():
        model = keras.models.load_model(model_path)
        model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
    expected, queries = queue_probe(model, batch)
    model.fit(batch, batch_size=8, epochs=1, shuffle=False, verbose=0)
    found = strategy.run(
        tf.function(model.queue.nearest), (split_over(strategy, queries),)
    )
    return {
        **expected,
        "queues": [v.numpy().tolist()[0] for v in model.queue.features.value.values],
        "queries": queries.tolist(),
        "found": tf.concat(strategy.experimental_local_results(found), 0)
        .numpy()
        .tolist(),
    }


def batch_norm_statistics(strategy, model_path: str) -> dict:
    """The image tower's batch-norm moving statistics after one `fit` step
    (learning rate 0) on one device and split over the strategy's replicas."""
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=6)
    statistics = {}
    scopes = {"single": contextlib.nullcontext(), "parallel": strategy.scope()}
    for name, scope in scopes.items():
        with scope:
            model = keras.models.load_model(model_path)
            model.compile(optimizer=keras.optimizers.SGD(learning_rate=0.0))
        model.fit(batch, batch_size=8, epochs=1, shuffle=False, verbose=0)
        statistics[name] = {
            v.path: v.numpy().tolist()
            for v in model.image_encoder.non_trainable_variables
            if "moving" in v.path
        }
    return statistics


def per_replica_heads(strategy, model_path: str) -> dict:
    """SimSiam's and MLM's terms under the strategy, on a batch whose MLM
    targets are packed per replica slice (as `training_dataset` packs them),
    against a reference that runs each replica's half on its own, and the
    whole batch's terms on one device."""
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=7)
    single = keras.models.load_model(model_path)

    def heads(model, batch):
        terms = model.compute_loss_terms(batch, model(batch, training=True))
        return {k: terms[k] for k in ("ss_loss", "mlm_loss")}

    halves = [{k: v[4 * r : 4 * (r + 1)] for k, v in batch.items()} for r in (0, 1)]
    per_half = [heads(single, half) for half in halves]
    report = {
        "reference": {k: float(sum(h[k] for h in per_half) / 2) for k in per_half[0]},
        "whole": {k: float(v) for k, v in heads(single, batch).items()},
    }
    batch = {k: tf.constant(v) for k, v in batch.items()}
    packed = {**batch, **pack_targets(batch, groups=2)}
    report["packed_slots"] = int(packed["mask_rows"].shape[1])
    with strategy.scope():
        model = keras.models.load_model(model_path)

    @tf.function
    def step(batch):
        terms = strategy.run(heads, (model, batch))
        return {k: strategy.reduce("MEAN", v, axis=None) for k, v in terms.items()}

    report["parallel"] = {
        k: float(v) for k, v in step(split_over(strategy, packed)).items()
    }
    return report


def split_by_replica(strategy, batch):
    """`split_over`'s layout, each replica taking its own block: a dataset
    distributed across workers would be sharded by worker first."""
    rows = len(next(iter(batch.values()))) // strategy.num_replicas_in_sync

    def block(context):
        start = rows * context.replica_id_in_sync_group
        return {k: tf.constant(v[start : start + rows]) for k, v in batch.items()}

    return strategy.experimental_distribute_values_from_function(block)


def one_device_and_replicas(strategy, model_path: str, batch, split) -> tuple:
    """The terms and gradient summaries of `batch` on one device, and with
    the batch `split(strategy, batch)` over the strategy's replicas."""
    model = keras.models.load_model(model_path)
    terms, grads = replica_step(model, batch)
    single = (
        {k: float(v) for k, v in terms.items()},
        summarize(model.trainable_variables, grads),
    )
    with strategy.scope():
        model = keras.models.load_model(model_path)

    @tf.function
    def step(batch):
        terms, grads = strategy.run(replica_step, (model, batch))
        terms = {k: strategy.reduce("MEAN", v, axis=None) for k, v in terms.items()}
        grads = [strategy.reduce("SUM", g, axis=None) for g in grads]
        return terms, grads

    terms, grads = step(split(strategy, batch))
    parallel = (
        {k: float(v) for k, v in terms.items()},
        summarize(model.trainable_variables, grads),
    )
    return single, parallel


def main(model_path: str, fit_model_path: str, resnet_model_path: str) -> None:
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=4)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    single, parallel = one_device_and_replicas(strategy, model_path, batch, split_over)

    with strategy.scope():
        model = keras.models.load_model(fit_model_path)
        model.compile(optimizer="adamw")
    history = model.fit(batch, batch_size=8, epochs=2, verbose=0).history
    print(
        json.dumps(
            {
                "single": single,
                "parallel": parallel,
                "fit": history,
                "replicas": strategy.num_replicas_in_sync,
                "queue_pointer": int(model.queue.pointer.numpy()),
                "queue": per_replica_queues(strategy, fit_model_path),
                "batch_norm": batch_norm_statistics(strategy, resnet_model_path),
                "heads": per_replica_heads(strategy, fit_model_path),
            }
        )
    )


def across_workers(model_path: str) -> None:
    """`one_device_and_replicas` over the workers' replicas
    (`MultiWorkerMirroredStrategy`, created before any other op as
    TensorFlow requires); the first worker prints both."""
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=4)  # the same on each
    single, parallel = one_device_and_replicas(
        strategy, model_path, batch, split_by_replica
    )
    if strategy.cluster_resolver.task_id == 0:
        print(json.dumps({"single": single, "parallel": parallel}))


if __name__ == "__main__":
    if ACROSS_WORKERS:
        across_workers(*sys.argv[1:])
    else:
        main(*sys.argv[1:])

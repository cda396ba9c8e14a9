"""Run by test_distribution.py under torchrun: two processes, gloo, CPU.

Each process computes DeCLIP's contrastive and nearest-neighbour terms and the
gradients of their weighted sum for the global batch alone (before joining
the process group), then for its half of the batch as a torchrun process;
process 0 writes both to the JSON file named on the command line.
"""

import json
import sys

import keras
import torch.distributed
from helpers import queue_probe, summarize

import declip_keras as dk
from declip_keras.backend import (
    configure_distribution,
    global_value,
    share_across_processes,
)

TERMS = ("loss", "clip_loss", "nn_loss")


def terms_and_grads(model, batch):
    model.zero_grad()
    terms = model.compute_loss_terms(batch, model(batch, training=True))
    global_value(terms["loss"]).backward()
    grads = [v.value.grad.numpy() for v in model.trainable_variables]
    values = {k: float(global_value(terms[k]).detach()) for k in TERMS}
    return values, summarize(model.trainable_variables, grads)


def heads(model, batch) -> dict:
    """SimSiam's and MLM's terms of a training forward pass (batch statistics)."""
    terms = model.compute_loss_terms(batch, model(batch, training=True))
    return {k: terms[k] for k in ("ss_loss", "mlm_loss")}


def main(model_path: str, declip_path: str, out_path: str) -> None:
    batch = dk.synthetic_batch(8, 32, 16, 1000, seed=4)
    single = terms_and_grads(keras.models.load_model(model_path), batch)
    # Each process's half on its own, and the whole batch, on one process.
    heads_batch = dk.synthetic_batch(8, 32, 16, 1000, seed=7)
    declip = keras.models.load_model(declip_path)
    halves = [heads(declip, {k: v[4 * r : 4 * (r + 1)] for k, v in heads_batch.items()})
              for r in (0, 1)]  # fmt: skip
    heads_report = {
        "reference": {k: float(sum(h[k] for h in halves) / 2) for k in halves[0]},
        "whole": {k: float(v) for k, v in heads(declip, heads_batch).items()},
    }

    replicas = configure_distribution()
    assert replicas.devices == 2, replicas
    rank = replicas.host_index
    local = {key: value[4 * rank : 4 * (rank + 1)] for key, value in batch.items()}
    model = keras.models.load_model(model_path)
    share_across_processes(model)
    parallel = terms_and_grads(model, local)
    declip = keras.models.load_model(declip_path)
    share_across_processes(declip)
    own = {k: v[4 * rank : 4 * (rank + 1)] for k, v in heads_batch.items()}
    heads_report["parallel"] = {
        k: float(global_value(v).detach()) for k, v in heads(declip, own).items()
    }

    # A training step's enqueue (as `fit`'s compute_loss makes it), then each
    # process's queue and the neighbours its rows find.
    queue_batch = dk.synthetic_batch(8, 32, 16, 1000, seed=5)
    expected, queries = queue_probe(model, queue_batch)
    own = {key: value[4 * rank : 4 * (rank + 1)] for key, value in queue_batch.items()}
    model.compute_loss_terms(own, model(own, training=True), training=True)
    found = model.queue.nearest(queries[4 * rank : 4 * (rank + 1)])
    queue = {
        "queue": keras.ops.convert_to_numpy(model.queue.features)[0].tolist(),
        "found": keras.ops.convert_to_numpy(found).tolist(),
    }
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, queue)
    if rank == 0:
        report = {
            "single": single,
            "parallel": parallel,
            "heads": heads_report,
            "queue": {
                **expected,
                "queues": [g["queue"] for g in gathered],
                "queries": queries.tolist(),
                "found": [row for g in gathered for row in g["found"]],
            },
        }
        with open(out_path, "w") as file:
            json.dump(report, file)


if __name__ == "__main__":
    main(*sys.argv[1:])

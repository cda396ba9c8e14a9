"""Loads a saved DeCLIP and batch under $KERAS_BACKEND and writes what it computes.

Run by test_parity.py in a subprocess: Keras fixes its backend at import time.
Usage: python parity_worker.py MODEL.keras BATCH.npz OUT.npz
"""

import sys

import keras
import numpy as np

import declip_keras  # noqa: F401  (registers its classes, as load_model needs)


def compute(model_path: str, batch_path: str) -> dict[str, np.ndarray]:
    model = keras.models.load_model(model_path)
    batch = dict(np.load(batch_path))
    # training=True exercises the batch-norm batch statistics; the terms are
    # computed without the queue update so every backend sees the same queue.
    terms = model.compute_loss_terms(batch, model(batch, training=True))
    results = {f"term/{k}": keras.ops.convert_to_numpy(v) for k, v in terms.items()}
    results["image_embeddings"] = keras.ops.convert_to_numpy(
        model.encode_image(batch["image_1"])
    )
    results["text_embeddings"] = keras.ops.convert_to_numpy(
        model.encode_text(batch["token_ids"])
    )
    return results


if __name__ == "__main__":
    model_path, batch_path, out_path = sys.argv[1:]
    np.savez(out_path, **compute(model_path, batch_path))

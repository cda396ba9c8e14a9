"""One set of weights and one batch give the same numbers on every backend.

The model is built and saved under torch; JAX and TensorFlow then load the
file in their own processes. It runs in the torch pass of `make test` only:
the other passes would repeat the same comparisons at several minutes each.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from helpers import small_batch, small_model
from parity_worker import compute

WORKER = Path(__file__).with_name("parity_worker.py")
BACKENDS = ("jax", "tensorflow", "torch")


def run_worker(backend: str, model_path: Path, batch_path: Path, out: Path) -> dict:
    env = {**os.environ, "KERAS_BACKEND": backend}
    result = subprocess.run(
        [sys.executable, str(WORKER), str(model_path), str(batch_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"{backend} worker failed:\n{result.stderr[-3000:]}"
    return dict(np.load(out))


@pytest.mark.one_backend("torch", reason="compares all backends; run once")
@pytest.mark.slow
def test_terms_and_embeddings_agree_across_backends(tmp_path):
    model = small_model()
    model.compile(optimizer="adamw")
    batch = small_batch()
    # A few steps so that the queue, temperature and norms are not at their init.
    model.fit(batch, epochs=2, batch_size=8, verbose=0)
    model_path, batch_path = tmp_path / "model.keras", tmp_path / "batch.npz"
    model.save(model_path)
    np.savez(batch_path, **small_batch(seed=1))

    reference = compute(str(model_path), str(batch_path))
    results = {
        backend: run_worker(
            backend, model_path, batch_path, tmp_path / f"{backend}.npz"
        )
        for backend in BACKENDS
        if backend != keras.backend.backend()
    }
    terms = [k for k in reference if k.startswith("term/")]
    assert {
        f"term/{n}" for n in ("loss", "clip_loss", "ss_loss", "mlm_loss", "nn_loss")
    } <= set(terms)
    for backend, values in results.items():
        for key in terms:
            np.testing.assert_allclose(
                values[key], reference[key], rtol=1e-4, err_msg=f"{backend} {key}"
            )
        for key in ("image_embeddings", "text_embeddings"):
            np.testing.assert_allclose(
                values[key],
                reference[key],
                rtol=1e-5,
                atol=1e-6,
                err_msg=f"{backend} {key}",
            )

"""Data parallelism gives the single-device numbers for the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import small_model

WORKER = Path(__file__).with_name("distribution_worker.py")


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="keras.distribution is JAX's"
)
def test_jax_data_parallel_matches_one_device(tmp_path):
    model = small_model(vocabulary_size=1000)
    model.save(tmp_path / "model.keras")
    env = {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
    }
    result = subprocess.run(
        [sys.executable, str(WORKER), str(tmp_path / "model.keras")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(report["devices"]) == 2
    single_terms, single_grads = report["single"]
    parallel_terms, parallel_grads = report["parallel"]
    for name in ("loss", "clip_loss", "nn_loss", "ss_loss"):
        np.testing.assert_allclose(parallel_terms[name], single_terms[name], rtol=1e-4)
    assert single_grads.keys() == parallel_grads.keys()
    for path, norm in single_grads.items():
        np.testing.assert_allclose(
            parallel_grads[path], norm, rtol=1e-4, atol=1e-7, err_msg=path
        )
    assert all(np.isfinite(v[0]) for v in report["fit"].values())

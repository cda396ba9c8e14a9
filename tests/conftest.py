"""Fixtures, and the markers that decide which pass runs a test. The suite
runs once per backend (`make test`); helpers shared by test modules are in
helpers.py."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest
from helpers import COLOURS

# Scripts the tests run in subprocesses (they set up backends at import), not
# test modules: kept out of --doctest-modules' collection.
collect_ignore_glob = ["*_worker.py", "export_reader.py"]


# The pass that runs the backend-independent tests: TensorFlow's in `make
# test` (its pass is the shortest); `make test-fast` runs one backend and
# names it here.
INDEPENDENT_TESTS_BACKEND = os.environ.get(
    "DECLIP_KERAS_INDEPENDENT_TESTS_BACKEND", "tensorflow"
)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "one_backend(name, reason): run only in that backend's pass of the suite "
        "(a backend's own machinery, or a test that drives every backend itself)",
    )
    config.addinivalue_line(
        "markers",
        "backend_independent: code that Keras' backend does not reach (tf.data, "
        "configuration, the command line's checks); runs in one pass",
    )
    config.addinivalue_line(
        "markers",
        "slow: an end-to-end run of a minute or more (training processes, "
        "notebooks, benchmarks); `make test-fast` leaves these out",
    )


def pytest_collection_modifyitems(config, items):
    backend = keras.backend.backend()
    for item in items:
        marker = item.get_closest_marker("one_backend")
        if marker and marker.args[0] != backend:
            reason = marker.kwargs.get("reason", "runs in one backend's pass")
            item.add_marker(pytest.mark.skip(reason=f"{marker.args[0]} only: {reason}"))
        elif (
            item.get_closest_marker("backend_independent")
            and backend != INDEPENDENT_TESTS_BACKEND
        ):
            reason = f"backend-independent: in the {INDEPENDENT_TESTS_BACKEND} pass"
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def shape_shards(tmp_path_factory):
    """Two shards of 48 coloured-square pairs ("a red square on white", ...)."""
    import io

    import tensorflow as tf
    from PIL import Image

    from declip_keras.data.records import encode_example

    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    writers = [tf.io.TFRecordWriter(str(root / f"part-{i}.tfrecord")) for i in range(2)]
    for index in range(48):
        name = list(COLOURS)[index % 3]
        pixels = np.full((40, 40, 3), 255, np.uint8)
        x, y = rng.integers(0, 20, 2)
        pixels[y : y + 20, x : x + 20] = COLOURS[name]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG")
        example = encode_example(
            str(index), buffer.getvalue(), "png", f"a {name} square"
        )
        writers[index % 2].write(example)
    for writer in writers:
        writer.close()
    return str(root / "part-*.tfrecord")

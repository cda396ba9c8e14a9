"""The package's front door: its public names, and subpackages that import light."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import declip_keras

tf_only = pytest.mark.one_backend("tensorflow", reason="backend-independent; run once")


@tf_only
def test_every_public_name_comes_from_its_subpackage_module():
    for name in declip_keras.__all__:
        value = getattr(declip_keras, name)
        home = "declip_keras." + declip_keras._HOMES[name]
        if inspect.isclass(value) or inspect.isfunction(value):
            assert value.__module__ == home, name
        else:  # PRESETS
            assert getattr(sys.modules[home], name) is value, name


@tf_only
def test_light_modules_import_without_keras_or_tensorflow():
    """What the command line's parser reads must not load a framework."""
    light = [
        "declip_keras.data.batch_format",
        "declip_keras.data.image_constants",
        "declip_keras.evaluation.metric_names",
        "declip_keras.evaluation.sources",
        "declip_keras.models.loss_terms",
        "declip_keras.models.presets",
        "declip_keras.training.config",
    ]
    code = (
        "import importlib, sys\n"
        f"for name in {light!r}: importlib.import_module(name)\n"
        "heavy = {'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)\n"
        "assert not heavy, heavy"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

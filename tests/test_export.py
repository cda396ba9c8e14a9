from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from helpers import small_batch, small_model, to_numpy

from declip_keras.backend import can_export_saved_model
from declip_keras.data.augment import eval_view
from declip_keras.data.batch_format import END_TOKEN_ID, START_TOKEN_ID, VOCABULARY_SIZE
from declip_keras.data.tokenizer import CaptionTokenizer
from declip_keras.interop.export import export

READER = Path(__file__).with_name("export_reader.py")
CAPTIONS = np.array(
    ["a photo of a cat.", "The Digit 7, handwritten!", "🙂 grinning face", ""]
)


@pytest.fixture(scope="module")
def trained():
    """A small model after two optimizer steps, with CLIP's full vocabulary."""
    # Context 40: captions run at lengths 16, 32 or 40 in the SavedModel.
    model = small_model(vocabulary_size=VOCABULARY_SIZE, context_length=40)
    model.compile(optimizer=keras.optimizers.AdamW(1e-3))
    model.fit(small_batch(8), epochs=2, batch_size=8, verbose=0)
    return model


def _inputs(model) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    context = model.text_encoder.context_length
    return {
        # Two batch sizes, neither image of the model's size nor square.
        "images_1": rng.integers(0, 256, (1, 45, 60, 3), np.uint8),
        "images_5": rng.integers(0, 256, (5, 70, 50, 3), np.uint8),
        "captions_2": CAPTIONS[:2],
        "captions_4": CAPTIONS,
        "ids_3": rng.integers(0, 1000, (3, context)).astype(np.int32),
        "ids_short": short_captions(rng, 2, ends=(5, 12), context=context),
        "ids_middle": short_captions(rng, 2, ends=(5, 20), context=context),
    }


def short_captions(rng, count: int, ends: tuple[int, ...], context: int):
    """Captions `[count, context]` that end (end token) at `ends`, then pad 0."""
    ids = np.zeros((count, context), np.int32)
    for row, end in enumerate(ends):
        ids[row, 0] = START_TOKEN_ID
        ids[row, 1:end] = rng.integers(1, 1000, end - 1)
        ids[row, end] = END_TOKEN_ID
    return ids


def _expected(model, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the in-memory model gives, with preprocessing done in Python."""
    size = model.image_encoder.image_size
    tokenizer = CaptionTokenizer(model.text_encoder.context_length)
    expected = {}
    for name, value in inputs.items():
        if name.startswith("images"):
            pixels = eval_view(tf.constant(value), size).numpy()
            expected[name] = to_numpy(model.encode_image(pixels))
        elif name.startswith("captions"):
            ids = np.asarray(tokenizer(list(value)))
            expected[name] = to_numpy(model.encode_text(ids))
        else:
            expected[name] = to_numpy(model.encode_text(value))
    return expected


def _served(saved_model: Path, inputs: dict, tmp_path: Path) -> dict[str, np.ndarray]:
    np.savez(tmp_path / "inputs.npz", **inputs)
    result = subprocess.run(
        [sys.executable, str(READER), str(saved_model), str(tmp_path / "inputs.npz"),
         str(tmp_path / "served.npz")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return dict(np.load(tmp_path / "served.npz"))


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory) -> dict:
    """JAX/TF export in process; torch weights go through `declip-keras export`,
    which re-runs itself under TensorFlow."""
    folder = tmp_path_factory.mktemp("export")
    if can_export_saved_model():
        return export(trained, folder / "export")
    trained.save(folder / "model.keras")
    command = [sys.executable, "-m", "declip_keras.cli", "export",
               str(folder / "model.keras"), str(folder / "export")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((folder / "export" / "export.json").read_text())
    assert info["exported_with_backend"] == "tensorflow"
    return info


@pytest.mark.slow
def test_saved_model_matches_the_model_without_keras(trained, exported, tmp_path):
    info = exported
    assert info["caption_lengths"] == [16, 32, 40]
    inputs = _inputs(trained)
    served = _served(Path(info["saved_model"]), inputs, tmp_path)
    expected = _expected(trained, inputs)
    for name, value in expected.items():
        assert served[name].shape == value.shape, name
        np.testing.assert_allclose(served[name], value, rtol=0, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(np.linalg.norm(served[name], axis=-1), 1, atol=1e-5)


def test_towers_are_saved_as_standalone_keras_files(trained, exported):
    info = exported
    image_tower = keras.models.load_model(info["image_encoder"])
    text_tower = keras.models.load_model(info["text_encoder"])
    batch = small_batch(4)
    np.testing.assert_allclose(
        to_numpy(image_tower(batch["image_1"])),
        to_numpy(trained.image_encoder(batch["image_1"])),
        atol=1e-6,
    )
    np.testing.assert_allclose(
        to_numpy(text_tower(batch["token_ids"])["features"]),
        to_numpy(trained.text_encoder(batch["token_ids"])["features"]),
        atol=1e-6,
    )
    folder = Path(info["saved_model"]).parents[1]
    if can_export_saved_model():
        with pytest.raises(FileExistsError, match="another --version"):
            export(trained, folder)
    # A new version into an existing export would replace its towers: refused.
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(trained, folder, version=2)
    assert not (folder / "saved_model" / "2").exists()

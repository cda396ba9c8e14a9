"""Export: a TensorFlow SavedModel that embeds raw images and raw captions.

The SavedModel carries the preprocessing, so a consumer needs TensorFlow (and
`tensorflow_text` for the tokenizer's ops) but neither Keras nor this package:

- `encode_image(images)`: uint8 `[B, H, W, 3]` of any batch and image size ->
  float32 `[B, D]`; resize (shorter side to `S * 256 / 224`), centre crop `S`
  and ImageNet normalisation inside, as in evaluation.
- `encode_text(captions)`: string `[B]` -> float32 `[B, D]`; CLIP's BPE
  tokenizer, start/end tokens and padding inside the graph.
- `encode_token_ids(token_ids)`: int32 `[B, L]` -> float32 `[B, D]`.
  Captions run at the shortest of a few fixed lengths that holds the batch's
  longest (`declip_keras.data.pipeline.CAPTION_BUCKETS`; exact, as the text tower is
  causal), each compiled once as `encode_token_ids_<length>`.
- `encode_pixels(pixels)`: preprocessed float32 `[B, S, S, 3]` -> `[B, D]`.

Every output is L2-normalised, so a dot product is the cosine similarity.
Export works on the JAX (through jax2tf) and TensorFlow backends; under
torch, `export_trained` runs the export in a TensorFlow process (`.keras`
files are backend-independent).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import tensorflow as tf

from declip_keras.backend import can_export_saved_model
from declip_keras.data.augment import eval_view
from declip_keras.data.pipeline import caption_lengths
from declip_keras.data.tokenizer import CaptionTokenizer, clip_tokenizer
from declip_keras.models.declip import DeCLIP
from declip_keras.training.files import save_atomically, write_json
from declip_keras.training.runs import load_trained_model, model_tokenizer

ENDPOINTS = ["encode_image", "encode_text", "encode_token_ids", "encode_pixels"]


def _tf_resources(layer: keras.layers.Layer) -> list:
    return [
        value
        for value in vars(layer).values()
        if isinstance(value, tf.__internal__.tracking.Trackable)
    ]


def _as_float32(fn):
    return lambda x: keras.ops.cast(fn(x), "float32")


def export_saved_model(
    model: DeCLIP,
    path: str | Path,
    tokenizer: CaptionTokenizer | None = None,
    verbose: bool = False,
) -> None:
    """Writes `model`'s image and text towers as a SavedModel at `path`.

    Args:
        model: a `DeCLIP` model.
        path: the SavedModel folder (for TF Serving, `BASE/<version>`).
        tokenizer: the captions' tokenizer; default CLIP's BPE at the model's
            context length.
        verbose: let Keras print the exported variables.

    Example (writes files, so not run as a doctest; tests/test_export.py
    runs the same calls):
    >>> export_saved_model(model, "export/saved_model/1")  # doctest: +SKIP
    >>> served = tf.saved_model.load("export/saved_model/1")  # doctest: +SKIP
    >>> served.encode_text(tf.constant(["a photo of a cat"])).shape  # doctest: +SKIP
    TensorShape([1, 256])
    """
    if not can_export_saved_model():
        raise RuntimeError(
            "SavedModel export runs on the JAX or TensorFlow backend, not "
            f"{keras.backend.backend()}. "
            "Load the .keras file with KERAS_BACKEND=tensorflow (or jax) and export "
            "there; `declip-keras export` does this for you."
        )
    size = model.image_encoder.image_size
    context = model.text_encoder.context_length
    tokenizer = tokenizer or clip_tokenizer(context)
    if tokenizer.context_length != context:
        raise ValueError(
            f"The tokenizer packs {tokenizer.context_length} tokens; "
            f"the text encoder takes {context}."
        )

    archive = keras.export.ExportArchive()
    archive.track(model.image_encoder)
    archive.track(model.text_encoder)
    # The tokenizer's lookup tables and merge cache are TF resources; the JAX
    # archive only tracks a layer's Keras variables, so track them one by one.
    for resource in _tf_resources(tokenizer.tokenizer):
        archive.track(resource)
    encode_pixels = archive.add_endpoint(
        "encode_pixels",
        _as_float32(model.encode_image),
        input_signature=[keras.InputSpec(shape=(None, size, size, 3), dtype="float32")],
    )
    lengths = caption_lengths(context)
    encoders = [
        archive.add_endpoint(
            f"encode_token_ids_{length}",
            _as_float32(model.encode_text),
            input_signature=[keras.InputSpec(shape=(None, length), dtype="int32")],
        )
        for length in lengths
    ]

    @tf.function(input_signature=[tf.TensorSpec([None, context], tf.int32)])
    def encode_token_ids(token_ids):
        # The end token has the largest id, so argmax finds each caption's end.
        ends = tf.argmax(token_ids, axis=-1, output_type=tf.int32)
        needed = tf.reduce_max(ends) + 1
        bucket = tf.reduce_sum(tf.cast(tf.constant(lengths) < needed, tf.int32))

        def run(encoder, length):
            return lambda: encoder(token_ids[:, :length])

        branches = [run(e, n) for e, n in zip(encoders, lengths, strict=True)]
        return tf.switch_case(bucket, branches)

    @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.uint8)])
    def encode_image(images):
        return encode_pixels(eval_view(images, size))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
    def encode_text(captions):
        return encode_token_ids(tf.cast(tokenizer(captions), tf.int32))

    # TF Serving's default signature is the first endpoint: raw images.
    archive.add_endpoint("serving_default", encode_image)
    archive.add_endpoint("encode_image", encode_image)
    archive.add_endpoint("encode_text", encode_text)
    archive.add_endpoint("encode_token_ids", encode_token_ids)
    archive.write_out(str(path), verbose=verbose)


def _check_free(output: Path, version: int, overwrite: bool) -> None:
    """Raises FileExistsError where an export would replace one unasked."""
    saved_model = output / "saved_model" / str(version)
    if overwrite:
        return
    if saved_model.exists():
        raise FileExistsError(
            f"{saved_model} exists; choose another --version, or pass "
            "--overwrite to replace it."
        )
    if (output / "export.json").exists():
        raise FileExistsError(
            f"{output} holds an export (export.json, the towers); pass "
            "--overwrite to replace them, or choose another folder."
        )


def export(
    model: DeCLIP,
    output: str | Path,
    version: int = 1,
    tokenizer: CaptionTokenizer | None = None,
    source: str | None = None,
    overwrite: bool = False,
) -> dict:
    """The full export folder: SavedModel, standalone towers and a summary.

    An existing export is replaced only with `overwrite=True`; every file is
    written under a temporary name and renamed when complete.

    Layout of `output`:
        saved_model/<version>/   SavedModel (a TF Serving model base path)
        image_encoder.keras      image tower (preprocessed images -> features)
        text_encoder.keras       text tower (token ids -> features)
        export.json              sizes, endpoints and where the weights came from

    Returns the contents of `export.json`.
    """
    output = Path(output)
    saved_model = output / "saved_model" / str(version)
    _check_free(output, version, overwrite)
    output.mkdir(parents=True, exist_ok=True)
    partial = saved_model.with_name(f".{version}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    export_saved_model(model, partial, tokenizer)
    shutil.rmtree(saved_model, ignore_errors=True)
    os.replace(partial, saved_model)
    save_atomically(model.image_encoder, output / "image_encoder.keras")
    save_atomically(model.text_encoder, output / "text_encoder.keras")
    info = {
        "saved_model": str(saved_model),
        "image_encoder": str(output / "image_encoder.keras"),
        "text_encoder": str(output / "text_encoder.keras"),
        "endpoints": ENDPOINTS,
        "image_size": model.image_encoder.image_size,
        "context_length": model.text_encoder.context_length,
        "caption_lengths": caption_lengths(model.text_encoder.context_length),
        "embed_dim": model.image_encoder.embed_dim,
        "exported_with_backend": keras.backend.backend(),
        "source": source,
    }
    write_json(output / "export.json", info)
    return info


class ExportError(RuntimeError):
    """The TensorFlow process that exports for a torch session failed."""


def export_trained(
    model: str | Path,
    output: str | Path,
    version: int = 1,
    vocabulary: str | None = None,
    overwrite: bool = False,
) -> dict:
    """`export` of a `.keras` file or a run folder, with its tokenizer.

    Args:
        model: `model.keras`, a checkpoint, or a run folder.
        vocabulary: tokenizer folder; default: the run's, else CLIP's BPE.

    Under torch, which cannot write a SavedModel, the export runs in a
    TensorFlow subprocess; either way the contents of `export.json` return.
    """
    if can_export_saved_model():
        trained = load_trained_model(model)
        tokenizer = model_tokenizer(trained, model, vocabulary)
        return export(
            trained, output, version, tokenizer, source=str(model), overwrite=overwrite
        )
    # What can be refused is refused before a TensorFlow process starts.
    _check_free(Path(output), version, overwrite)
    model_tokenizer(load_trained_model(model), model, vocabulary)
    backend = keras.backend.backend()
    print(f"{backend} cannot write a SavedModel; exporting with tensorflow.")
    arguments = [str(model), str(output), version, vocabulary, overwrite]
    done = subprocess.run(
        [sys.executable, "-m", "declip_keras.interop.export", json.dumps(arguments)],
        env={**os.environ, "KERAS_BACKEND": "tensorflow"},
        check=False,
    )
    if done.returncode:
        raise ExportError(f"the tensorflow export failed (exit {done.returncode}).")
    return json.loads((Path(output) / "export.json").read_text())


if __name__ == "__main__":  # the TensorFlow side of `export_trained`
    try:
        export_trained(*json.loads(sys.argv[1]))
    except (ValueError, OSError) as error:  # a user's mistake: one line
        print(f"declip-keras export: error: {error}", file=sys.stderr)
        sys.exit(2)

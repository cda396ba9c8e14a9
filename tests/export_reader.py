"""Embeds images and captions with an exported SavedModel, without Keras.

Run by test_export.py in a fresh process. `keras`, `keras_hub` and
`declip_keras` are made unimportable first, so the SavedModel must stand on
TensorFlow alone (plus TF Text's regex-split op, which the tokenizer uses).
Usage: python export_reader.py SAVED_MODEL INPUTS.npz OUT.npz
"""

import importlib.util
import sys
from pathlib import Path

for blocked in ("keras", "keras_hub", "declip_keras"):
    sys.modules[blocked] = None  # any import of it now raises ImportError

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

text_ops = (
    Path(importlib.util.find_spec("tensorflow_text").origin).parent / "python/ops"
)
tf.load_op_library(str(text_ops / "_regex_split_ops.so"))

if __name__ == "__main__":
    saved_model, inputs_path, out_path = sys.argv[1:]
    served = tf.saved_model.load(saved_model)
    inputs = np.load(inputs_path)
    results = {}
    for name in inputs.files:
        if name.startswith("images"):
            results[name] = served.encode_image(tf.constant(inputs[name])).numpy()
        elif name.startswith("captions"):
            results[name] = served.encode_text(tf.constant(inputs[name])).numpy()
        else:
            results[name] = served.encode_token_ids(tf.constant(inputs[name])).numpy()
    np.savez(out_path, **results)

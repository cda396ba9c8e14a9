"""Ranks captions for images with an exported DeCLIP SavedModel, without Keras.

    declip-keras export runs/demo export/
    python scripts/serve_example.py export/saved_model/1 \\
        --images cat.jpg dog.png --captions "a photo of a cat" "a photo of a dog"

Only TensorFlow and TF Text (whose regex-split op the in-graph tokenizer uses)
are needed. The same folder serves with TF Serving, which takes the parent of
the version folder as the model base path:

    tensorflow_model_server --rest_api_port=8501 --model_name=declip \\
        --model_base_path="$PWD/export/saved_model"

Its default signature is `encode_image` (uint8 images); `encode_text` takes a
batch of strings. Without image files (`--images` omitted) this script draws
a few synthetic pictures so that it runs anywhere.
"""

from __future__ import annotations

import argparse

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer's ops)


def load_images(paths: list[str]) -> list[np.ndarray]:
    return [
        tf.io.decode_image(tf.io.read_file(p), channels=3, expand_animations=False)
        for p in paths
    ]


def synthetic_images() -> tuple[list[np.ndarray], list[str]]:
    """A red square, a green disc and a blue bar, with captions for each."""
    y, x = np.mgrid[:128, :128]
    red, green, blue = (np.full((128, 128, 3), 255, np.uint8) for _ in range(3))
    red[32:96, 32:96] = (220, 30, 30)
    green[(y - 64) ** 2 + (x - 64) ** 2 < 40**2] = (30, 200, 30)
    blue[56:72, 8:120] = (30, 30, 220)
    captions = ["a red square", "a green circle", "a blue line"]
    return [red, green, blue], captions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("saved_model", help="export/saved_model/<version>")
    parser.add_argument("--images", nargs="*", default=[])
    parser.add_argument("--captions", nargs="*", default=[])
    args = parser.parse_args()

    model = tf.saved_model.load(args.saved_model)
    if args.images:
        images, names = load_images(args.images), args.images
    else:
        images, default_captions = synthetic_images()
        names = [f"synthetic {c}" for c in default_captions]
        args.captions = args.captions or default_captions
    if not args.captions:
        parser.error("give --captions to rank")

    # One call per image: encode_image takes a batch of one size.
    image_embeddings = np.concatenate(
        [model.encode_image(tf.expand_dims(image, 0)).numpy() for image in images]
    )
    text_embeddings = model.encode_text(tf.constant(args.captions)).numpy()
    similarity = image_embeddings @ text_embeddings.T  # cosines: unit vectors
    for name, row in zip(names, similarity, strict=True):
        order = np.argsort(-row)
        ranked = ", ".join(f"{args.captions[i]!r} {row[i]:.3f}" for i in order)
        print(f"{name}: {ranked}")


if __name__ == "__main__":
    main()

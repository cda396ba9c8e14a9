"""Pairs per second of the full DeCLIP input pipeline, per CPU core.

Builds JPEG shards (photos from scikit-image and scikit-learn when installed,
else generated images, at 500x375 like a typical web image; or with
`--jpeg-size HxW` the smooth random JPEGs that
`../shared/peers/torchvision_twoview.py --size HxW` times), then times the
training pipeline: decode once, two augmented views, EDA, BPE tokenization of
both captions, MLM masking and batching. Prints pairs/s in total and per
core, at 224 px and at the `tiny` preset's size, with the photometric
augmentation on the host and, with `--device-augmentation`, left to the
model's step (the host then decodes, crops and resizes).

    python scripts/benchmark_input.py [--pairs 2000] [--batch-size 64]
    taskset -c 0 python scripts/benchmark_input.py --jpeg-size 320x400  # one core
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import numpy as np
import tensorflow as tf
from PIL import Image

from declip_keras.data.checks import SkipCounter
from declip_keras.data.pipeline import PipelineOptions, training_dataset
from declip_keras.data.records import encode_example
from declip_keras.models.presets import PRESETS

CAPTIONS = [
    "a photo of a cat sitting on a wooden table",
    "two people riding bicycles along the beach at sunset",
    "a red car parked in front of an old brick building",
    "a bowl of fresh fruit with apples and bananas",
]


def sample_images(count: int, rng: np.random.Generator) -> list[bytes]:
    size = (500, 375)
    photos = []
    try:
        from skimage import data as skdata

        photos = [
            skdata.astronaut(),
            skdata.chelsea(),
            skdata.coffee(),
            skdata.rocket(),
        ]
    except ImportError:
        pass
    images = []
    for i in range(count):
        if photos:
            array = photos[i % len(photos)]
        else:
            array = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
        image = Image.fromarray(array).convert("RGB").resize(size)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        images.append(buffer.getvalue())
    return images


def peer_jpegs(height: int, width: int) -> list[bytes]:
    """The peer's test images: 32 smooth random JPEGs (quality 90), made the
    way `torchvision_twoview.py` makes them, with the same seed."""
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(32):
        small = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((width, height), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=90)
        jpegs.append(buffer.getvalue())
    return jpegs


def write_shards(
    folder: str, pairs: int, jpeg_size: str | None = None, shards: int = 8
) -> str:
    if jpeg_size:
        height, width = (int(side) for side in jpeg_size.split("x"))
        images = peer_jpegs(height, width)
    else:
        images = sample_images(64, np.random.default_rng(0))
    writers = [
        tf.io.TFRecordWriter(f"{folder}/bench-{s}.tfrecord") for s in range(shards)
    ]
    for i in range(pairs):
        caption = CAPTIONS[i % len(CAPTIONS)]
        writers[i % shards].write(
            encode_example(f"{i}", images[i % len(images)], "jpg", caption)
        )
    for writer in writers:
        writer.close()
    return f"{folder}/bench-*.tfrecord"


def measure(
    pattern: str,
    image_size: int,
    context: int,
    batch_size: int,
    batches: int,
    device_augmentation: bool = False,
) -> float:
    options = PipelineOptions(
        batch_size,
        image_size,
        context,
        shuffle_buffer=256,
        device_augmentation=device_augmentation,
    )
    dataset = training_dataset(pattern, options, counter=SkipCounter())
    iterator = iter(dataset)
    for _ in range(3):  # warm up: tracing, autotuning, buffers
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument(
        "--jpeg-size", metavar="HxW", help="the peer's smooth random JPEGs"
    )
    parser.add_argument(
        "--device-augmentation",
        action="store_true",
        help="also time the pipeline that leaves colour, blur and flip to the model",
    )
    args = parser.parse_args()
    cores = (
        len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count()
    )
    tiny = PRESETS["tiny"]
    with tempfile.TemporaryDirectory() as folder:
        pattern = write_shards(folder, args.pairs, args.jpeg_size)
        runs = [("224 px, context 77", 224, 77, False)]
        if args.device_augmentation:
            runs.append(("224 px, context 77, device augmentation", 224, 77, True))
        size, context = tiny["image_size"], tiny["context_length"]
        runs.append((f"tiny: {size} px, context {context}", size, context, False))
        for label, size, context, device in runs:
            rate = measure(
                pattern, size, context, args.batch_size, args.batches, device
            )
            per_core = rate / cores
            print(f"{label}: {rate:.0f} pairs/s on {cores} cores = {per_core:.0f}/core")


if __name__ == "__main__":
    main()

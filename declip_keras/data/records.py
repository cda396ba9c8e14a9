"""Image-caption TFRecords in img2dataset's schema.

One `tf.train.Example` per pair with bytes features `key`, the encoded image
under its format's name (`jpg`, `png` or `webp`) and `txt` (the UTF-8
caption), as `img2dataset --output_format tfrecord` writes them. An optional
int64 `label` carries a class index for evaluation sets.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import tensorflow as tf

from declip_keras.data.image_constants import IMAGE_SUFFIXES

# The image fields of a record, one per format.
IMAGE_FIELDS = tuple(dict.fromkeys(IMAGE_SUFFIXES.values()))


def list_shards(pattern: str) -> list[str]:
    """Sorted files matching a glob (local path or `gs://`, `s3://` URL).

    A comma-separated list of patterns is accepted too.

    Raises:
        FileNotFoundError: naming the pattern when nothing matches.
    """
    files = sorted(
        {f for part in pattern.split(",") for f in tf.io.gfile.glob(part.strip())}
    )
    if not files:
        raise FileNotFoundError(f"No TFRecord shard matches {pattern!r}.")
    return files


def encode_example(
    key: str,
    image: bytes,
    image_format: str,
    caption: str | bytes,
    label: int | None = None,
) -> bytes:
    """Serialises one pair; `caption` may be raw bytes (kept as they are)."""
    if image_format not in IMAGE_FIELDS:
        raise ValueError(
            f"image_format must be one of {IMAGE_FIELDS}, got {image_format!r}"
        )
    text = caption.encode("utf-8") if isinstance(caption, str) else caption

    def bytes_feature(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        "key": bytes_feature(key.encode("utf-8")),
        image_format: bytes_feature(image),
        "txt": bytes_feature(text),
    }
    if label is not None:
        features["label"] = tf.train.Feature(
            int64_list=tf.train.Int64List(value=[label])
        )
    return tf.train.Example(
        features=tf.train.Features(feature=features)
    ).SerializeToString()


def parse_example(serialized):
    """One serialised pair -> `key`, `image` (whichever image field is set),
    `txt` and `label` (-1 when absent), as TF tensors; for `tf.data` maps."""
    spec = {
        name: tf.io.FixedLenFeature([], tf.string, "")
        for name in ("key", "txt", *IMAGE_FIELDS)
    }
    spec["label"] = tf.io.FixedLenFeature([], tf.int64, -1)
    record = tf.io.parse_single_example(serialized, spec)
    image = record[IMAGE_FIELDS[0]]
    for name in IMAGE_FIELDS[1:]:
        image = tf.where(tf.strings.length(image) > 0, image, record[name])
    return {
        "key": record["key"],
        "image": image,
        "txt": record["txt"],
        "label": record["label"],
    }


@dataclass(frozen=True)
class ShardScan:
    """What a pass over a shard's record framing found."""

    path: str
    records: int
    truncated: bool


def scan_shard(path: str) -> ShardScan:
    """Counts whole records and tells whether the file ends inside one.

    Reads only the 12-byte record headers and seeks over the payloads, so it is
    cheap next to decoding. A truncated tail (an interrupted download or
    copy) is what makes `TFRecordDataset` fail at the end of a shard.
    """
    records = 0
    with tf.io.gfile.GFile(path, "rb") as handle:
        size = handle.size()
        position = 0
        while position < size:
            header = handle.read(12)
            if len(header) < 12:
                return ShardScan(path, records, truncated=True)
            (length,) = struct.unpack("<Q", header[:8])
            position += 12 + length + 4
            if position > size:
                return ShardScan(path, records, truncated=True)
            handle.seek(position)
            records += 1
    return ShardScan(path, records, truncated=False)


def readable_records(path: str) -> int:
    """How many records of a shard read back whole from its start. Reading
    stops at the first record whose checksum fails (one flipped byte), as
    every TFRecord reader does, or at a cut-off tail: with `scan_shard`'s
    count, what the damage made unreadable."""
    dataset = tf.data.TFRecordDataset(path).ignore_errors()
    return int(dataset.reduce(tf.constant(0, tf.int64), lambda count, _: count + 1))


def iterate_examples(path: str) -> Iterator[dict[str, bytes | int]]:
    """Python-side reader of one shard's pairs (for tools and tests)."""
    for raw in tf.data.TFRecordDataset(path).ignore_errors():
        example = tf.train.Example.FromString(raw.numpy())
        features = example.features.feature
        record: dict[str, bytes | int] = {
            name: features[name].bytes_list.value[0]
            for name in ("key", "txt", *IMAGE_FIELDS)
            if name in features
        }
        if "label" in features:
            record["label"] = int(features["label"].int64_list.value[0])
        yield record


def read_labels(paths: list[str]) -> np.ndarray:
    """Every record's `label` (-1 where a record has none), parsing nothing
    else: a pass over an evaluation set's labels, not its images."""
    spec = {"label": tf.io.FixedLenFeature([], tf.int64, default_value=-1)}
    labels = (
        tf.data.TFRecordDataset(paths)
        .ignore_errors()
        .batch(4096)
        .map(lambda raw: tf.io.parse_example(raw, spec)["label"])
    )
    chunks = [batch.numpy() for batch in labels]
    return np.concatenate(chunks) if chunks else np.zeros([0], np.int64)

"""The `tf.data` input pipelines: DeCLIP training batches and evaluation batches
(from TFRecord shards or from image files).

Training, per pair: decode the image once and make two augmented views, apply
one EDA operation to the caption, tokenize both captions with CLIP's BPE, and
mask one of them for MLM (per-token draws, `declip_keras.data.masking`). Everything runs
as TF graph ops with parallel calls; no Python runs per record.

Bad records never stop a run: `declip_keras.data.checks` keeps them out and counts
them by reason; what still fails to decode is dropped by `ignore_errors` and
counted as `decode_error`. Shards whose end is cut off are found by a framing
scan when the pipeline is built (`truncated_shard`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import tensorflow as tf

from declip_keras.data import batch_format
from declip_keras.data.augment import (
    eval_view,
    photometric_params,
    random_crop,
    random_view,
)
from declip_keras.data.checks import SkipCounter, check_record
from declip_keras.data.eda import EDA
from declip_keras.data.image_constants import default_augmentation
from declip_keras.data.masking import mask_tokens, pack_targets
from declip_keras.data.records import (
    list_shards,
    parse_example,
    readable_records,
    scan_shard,
)
from declip_keras.data.tokenizer import CaptionTokenizer, clip_tokenizer

AUTOTUNE = tf.data.AUTOTUNE
# Caption lengths a batch is trimmed to: the smallest that holds its longest
# caption. The text tower is causal and reads the end token's position, so the
# padding after every caption's end changes nothing, and a few fixed lengths
# mean a few compiled shapes. Web captions average 10-20 of the 77 tokens.
CAPTION_BUCKETS = (16, 32, 48, 77)


def caption_lengths(
    context_length: int, buckets: Sequence[int] = CAPTION_BUCKETS
) -> list[int]:
    """The lengths captions are trimmed to: the buckets up to `context_length`."""
    return sorted({min(b, context_length) for b in buckets} | {context_length})


def trim_captions(
    batch: dict, context_length: int, buckets: Sequence[int] = CAPTION_BUCKETS
) -> dict:
    """Trims the batch's captions (`token_ids`, `eda_token_ids`) to one length.

    The length is the smallest of `buckets` (capped at `context_length`) that
    holds every caption's end token, found as `argmax` (the end token has the
    largest id, and padding repeats it). MLM positions always precede the end
    token, so they still index correctly. Other keys are left as they are.
    Works eagerly and inside `tf.data` graphs.

    Example:
    >>> ids = tf.constant([[49406, 320, 49407, 0, 0, 0]])
    >>> trim_captions({"token_ids": ids}, 6, buckets=(4,))["token_ids"].shape
    TensorShape([1, 4])
    """
    views = [key for key in batch_format.TEXT_VIEWS if key in batch]
    ends = [tf.argmax(batch[key], axis=-1, output_type=tf.int32) for key in views]
    needed = tf.reduce_max(tf.concat(ends, axis=0)) + 1
    length = _smallest_at_least(caption_lengths(context_length, buckets), needed)
    return {**batch, **{key: batch[key][:, :length] for key in views}}


def _smallest_at_least(values: Sequence[int], needed):
    """The smallest of the sorted `values` that is at least `needed`."""
    values = tf.constant(values, tf.int32)
    return tf.reduce_min(tf.boolean_mask(values, values >= needed))


# Reason codes of the markers a cycling pipeline puts in its record stream:
# one ends each pass over the shards, the other ends a stream whose last
# pass found no usable record (so a run on bad data stops, not spins).
END_OF_PASS, END_OF_DATA = -1, -2


def _records(
    files: Sequence[str],
    counter: SkipCounter,
    shuffle_files: bool,
    seed: int,
    repeat: bool = False,
    cycle_length: int = 8,
):
    """Parsed, checked records of the files, interleaved, with `counted`
    (whether `counter` counted them); bad ones counted and dropped.
    `repeat` cycles over the files forever, counting the first pass only."""
    dataset = tf.data.Dataset.from_tensor_slices(list(files))
    if shuffle_files:
        dataset = dataset.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    dataset = dataset.interleave(
        # ignore_errors ends a shard quietly at a cut-off tail; the framing scan
        # has counted it already.
        lambda path: tf.data.TFRecordDataset(path).ignore_errors(),
        cycle_length=min(cycle_length, len(files)),
        num_parallel_calls=AUTOTUNE,
        deterministic=True,
    )

    def parse_and_check(serialized):
        record = parse_example(serialized)
        record["reason"] = check_record(record)
        if repeat:
            return record  # counted by the cycling stage, first pass only
        with tf.control_dependencies([counter.record(record["reason"])]):
            return {**record, "counted": tf.constant(True)}

    # A record that is not a parseable Example fails here and is dropped.
    dataset = dataset.map(parse_and_check, num_parallel_calls=AUTOTUNE).ignore_errors()
    if repeat:
        dataset = _cycle_counting_first_pass(dataset, counter)
    return dataset.filter(lambda record: record["reason"] == 0)


def _cycle_counting_first_pass(dataset: tf.data.Dataset, counter: SkipCounter):
    """`dataset` forever, an end-of-pass marker after each pass, counted in
    one sequential stage (so the marker is counted after every record of
    its pass and before any of the next). Ends after a pass without a
    usable record."""
    marker = tf.nest.map_structure(
        lambda spec: tf.zeros([d or 0 for d in spec.shape], spec.dtype),
        dataset.element_spec,
    )
    marker["reason"] = tf.constant(END_OF_PASS, marker["reason"].dtype)
    dataset = dataset.concatenate(tf.data.Dataset.from_tensors(marker)).repeat()

    def count(usable_in_pass, record):
        reason = record["reason"]
        end_of_pass = reason == END_OF_PASS
        counted = counter.count_pass(reason, end_of_pass)
        usable = tf.cast(reason == 0, tf.int64)
        if_empty = tf.where(usable_in_pass > 0, reason, END_OF_DATA)
        record = {
            **record,
            "reason": tf.where(end_of_pass, if_empty, reason),
            "counted": counted,
        }
        zero = tf.zeros_like(usable_in_pass)
        return tf.where(end_of_pass, zero, usable_in_pass + usable), record

    dataset = dataset.scan(tf.constant(0, tf.int64), count)
    return dataset.take_while(lambda record: record["reason"] != END_OF_DATA)


def host_shards(pattern: str, host_index: int = 0, host_count: int = 1) -> list[str]:
    """The shards of `pattern` that host `host_index` of `host_count` reads:
    every `host_count`-th from its index, so the hosts' shares are disjoint
    and together hold every shard."""
    files = list_shards(pattern)
    if len(files) < host_count:
        raise ValueError(
            f"{pattern!r} matches {len(files)} shards, fewer than the {host_count} "
            "hosts reading it; write more shards."
        )
    return files[host_index::host_count]


def _prepare_files(
    pattern: str, counter: SkipCounter, host_index: int, host_count: int, scan: bool
) -> list[str]:
    files = host_shards(pattern, host_index, host_count)
    if scan:
        scans = [scan_shard(f) for f in files]
        counter.truncated_shards = sum(scan.truncated for scan in scans)
        counter.framed_records = sum(scan.records for scan in scans)
    return files


@dataclass(frozen=True)
class PipelineOptions:
    """What `training_dataset` makes of the shards; `train` builds one from
    the run's config.

    Args:
        batch_size: batch size of this host (the global batch over all hosts).
        image_size: side of the square views.
        context_length: token ids per caption.
        seed: seed of the shuffles and of every augmentation draw.
        declip: `True` for DeCLIP's views (two images, MLM-masked and EDA
            captions); `False` for plain CLIP (one view with crop scale
            0.5-1, the unmasked caption).
        mlm: mask the first caption for MLM (DeCLIP only): each ordinary
            token with probability 0.15, then 80% mask / 10% random / 10%
            kept (`declip_keras.data.masking.mask_tokens`), seeded per batch.
        augmentation: `"mocov2"`, `"mocov2-noflip"` or `"crop"` (see
            `declip_keras.data.augment`); default: the released choice,
            `"mocov2"` for DeCLIP and `"crop"` for plain CLIP.
        shuffle_buffer: records in the shuffle buffer.
        repeat: cycle over the data forever (`fit` then needs
            `steps_per_epoch`).
        host_index, host_count: read every `host_count`-th shard from
            `host_index` (multi-host data parallelism).
        scan_shards: scan the shards' framing for cut-off tails first.
        start_step: batches already trained on; a resumed run continues the
            same stream (records are skipped before any decoding).
        bucket_captions: trim each batch's captions to the smallest of
            `CAPTION_BUCKETS` that holds them (`trim_captions`) and pack its
            MLM targets (`declip_keras.data.masking.pack_targets`); exact,
            and off when several hosts read (their batches must agree in
            shape).
        replica_splits: replicas this host's batch is split over before the
            step sees it: the local replica count under `tf.distribute`
            (the MLM targets are packed per replica), else 1.
        device_augmentation: leave the photometric step (colour, blur, flip)
            to the model: the views are crops in [0, 1] and each comes with
            its parameters (`image_1_photometric`, ...), which `DeCLIP`
            applies on the accelerator. The views equal the host's.

    Example:
    >>> PipelineOptions(batch_size=8, image_size=32, context_length=16).augmentation
    'mocov2'
    """

    batch_size: int
    image_size: int
    context_length: int
    seed: int = 0
    declip: bool = True
    mlm: bool = True
    augmentation: str | None = None
    shuffle_buffer: int = 10_000
    repeat: bool = True
    host_index: int = 0
    host_count: int = 1
    scan_shards: bool = True
    start_step: int = 0
    bucket_captions: bool = True
    replica_splits: int = 1
    device_augmentation: bool = False

    def __post_init__(self):
        if self.batch_size % self.replica_splits:
            raise ValueError(
                f"batch_size {self.batch_size} does not split over "
                f"{self.replica_splits} replicas."
            )
        if self.augmentation is None:
            # Frozen: the resolved default is set once, here.
            object.__setattr__(self, "augmentation", default_augmentation(self.declip))

    @property
    def fixed_shapes(self) -> bool:
        """Whether every batch has the same caption and target shapes: when
        several hosts read, their batches must agree."""
        return not self.bucket_captions or self.host_count > 1


def training_dataset(
    pattern: str,
    options: PipelineOptions,
    *,
    counter: SkipCounter | None = None,
    tokenizer: CaptionTokenizer | None = None,
) -> tf.data.Dataset:
    """Batches for `DeCLIP.fit` from TFRecord shards.

    Args:
        pattern: glob of shards (local or cloud URL; comma-separated allowed).
        options: the batches' size, views, seeds and layout (`PipelineOptions`).
        counter: receives the skip counts; pass one to read them.
        tokenizer: defaults to CLIP's BPE with DeCLIP's special ids.

    Returns:
        A dataset of dicts: `image_1` (and `image_2`) float32 `[B, S, S, 3]`
        (with `image_1_photometric`, ... `[B, 12]` under `device_augmentation`),
        `token_ids` `[B, L]`, and for DeCLIP `eda_token_ids` `[B, L]` and
        `mask_positions`, `mask_ids`, `mask_weights` `[B, M]` (with
        `mask_rows` `[B, M]` when packed, see `bucket_captions`).
    """
    o = options
    counter = counter or SkipCounter()
    tokenizer = tokenizer or clip_tokenizer(o.context_length)
    files = _prepare_files(pattern, counter, o.host_index, o.host_count, o.scan_shards)
    dataset = _records(files, counter, shuffle_files=True, seed=o.seed, repeat=o.repeat)
    dataset = dataset.shuffle(o.shuffle_buffer, seed=o.seed).enumerate()
    if o.start_step:
        dataset = dataset.skip(o.start_step * o.batch_size)
    eda = EDA() if o.declip else None

    def make_views(index, record):
        element_seed = tf.stack([tf.constant(o.seed, tf.int64), index])
        seeds = tf.random.experimental.stateless_split(element_seed, 3)
        image = counter.decode(record["image"], record["counted"])
        views = {batch_format.TOKEN_IDS: record["txt"]}
        for index, key in enumerate(batch_format.IMAGE_VIEWS[: 2 if o.declip else 1]):
            size, augmentation = o.image_size, o.augmentation
            if o.device_augmentation:
                views[key] = random_crop(image, seeds[index], size, augmentation)
                views[batch_format.PHOTOMETRIC[key]] = photometric_params(
                    seeds[index], size, augmentation
                )
            else:
                views[key] = random_view(image, seeds[index], size, augmentation)
        if o.declip:
            views[batch_format.EDA_TOKEN_IDS] = eda(record["txt"], seeds[2])
        return views

    dataset = dataset.map(make_views, num_parallel_calls=AUTOTUNE).ignore_errors()
    dataset = dataset.batch(o.batch_size, drop_remainder=True)

    def tokenize(step, batch):
        # Whole batches: keras-hub's BPE costs far less per caption this way.
        # Both text views in one call: tracing keras-hub's tokenizer takes
        # seconds and thousands of graph ops per call, which tf.data then
        # optimises again at every iterator.
        keys = [key for key in batch_format.TEXT_VIEWS if key in batch]
        tokens = tokenizer(tf.concat([batch[key] for key in keys], axis=0))
        for key, ids in zip(keys, tf.split(tokens, len(keys)), strict=True):
            batch[key] = ids
        if o.declip and o.mlm:
            # Negative indices keep the batch seeds apart from element seeds.
            batch_seed = tf.stack([tf.constant(o.seed, tf.int64), -1 - step])
            batch.update(
                mask_tokens(
                    batch[batch_format.TOKEN_IDS],
                    batch_seed,
                    tokenizer.special_token_ids,
                )
            )
        # Two steps, in this map rather than in map stages of their own: as
        # stages of their own they changed the batches `fit` drew after a
        # resume (test_train's kill-and-resume test), for a reason not found.
        if not o.fixed_shapes:
            batch = trim_captions(batch, o.context_length)
            if o.declip and o.mlm:
                batch.update(pack_targets(batch, o.replica_splits))
        return batch

    # Numbered from start_step, so a resumed stream draws the same masks.
    dataset = dataset.enumerate(start=o.start_step)
    dataset = dataset.map(tokenize, num_parallel_calls=AUTOTUNE)
    if o.host_count > 1:
        # Each host already reads its own shards; tf.distribute must not re-shard.
        sharding = tf.data.Options()
        sharding.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        dataset = dataset.with_options(sharding)
    return dataset.prefetch(AUTOTUNE)


def eval_dataset(
    pattern: str,
    batch_size: int,
    image_size: int,
    context_length: int,
    *,
    counter: SkipCounter | None = None,
    tokenizer: CaptionTokenizer | None = None,
    bucket_captions: bool = True,
) -> tf.data.Dataset:
    """Evaluation batches in file order: one centre-cropped view, plain tokens.

    Yields dicts with `images` `[B, S, S, 3]`, `token_ids` `[B, L]` (`L`
    trimmed by `trim_captions` unless `bucket_captions=False`), `key`,
    `txt` (the caption) and `label` (-1 where the record has none). The last
    batch may be smaller.
    """
    counter = counter or SkipCounter()
    tokenizer = tokenizer or clip_tokenizer(context_length)
    files = _prepare_files(pattern, counter, 0, 1, scan=True)
    dataset = _records(files, counter, shuffle_files=False, seed=0)

    def prepare(record):
        image = counter.decode(record["image"])
        return {
            "images": eval_view(image, image_size),
            batch_format.TOKEN_IDS: tokenizer(record["txt"]),
            "key": record["key"],
            "txt": record["txt"],
            "label": record["label"],
        }

    dataset = dataset.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    dataset = dataset.ignore_errors().batch(batch_size)
    if bucket_captions:
        dataset = dataset.map(lambda batch: trim_captions(batch, context_length))
    return dataset.prefetch(AUTOTUNE)


def image_files_dataset(
    paths: Sequence[str],
    batch_size: int,
    image_size: int,
    labels: Sequence[int] | None = None,
    counter: SkipCounter | None = None,
) -> tf.data.Dataset:
    """Evaluation batches read from image files, in order.

    Yields `images` `[B, S, S, 3]` (resize, centre crop, normalise), `key`
    (the path) and `label` (-1 without labels). An unreadable image is
    skipped and counted in `counter`; its key is then missing from the output.
    """
    counter = counter or SkipCounter()
    labels = [-1] * len(paths) if labels is None else labels
    files = tf.data.Dataset.from_tensor_slices(
        {"key": list(paths), "label": np.asarray(labels, np.int64)}
    )

    def prepare(item):
        image = counter.decode(tf.io.read_file(item["key"]))
        return {
            "images": eval_view(image, image_size),
            "key": item["key"],
            "label": item["label"],
        }

    dataset = files.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return dataset.ignore_errors().batch(batch_size).prefetch(AUTOTUNE)


def check_data(pattern: str) -> dict[str, Any]:
    """Reads every record through the training decode path; returns the
    counts, with `unreadable` records (those a damaged record hides: no
    reader gets past a failed checksum) and `damaged_shards`, each shard
    with records unreadable -> how many."""
    counter = SkipCounter()
    files = _prepare_files(pattern, counter, 0, 1, scan=False)
    damaged, truncated = {}, 0
    for path in files:
        scan = scan_shard(path)
        truncated += scan.truncated
        if lost := scan.records - readable_records(path):
            damaged[path] = lost
    counter.truncated_shards = truncated

    def decode(record):
        image = counter.decode(record["image"])
        return tf.shape(image, tf.int64)[0]

    dataset = _records(files, counter, shuffle_files=False, seed=0)
    dataset = dataset.map(decode, num_parallel_calls=AUTOTUNE).ignore_errors()
    dataset.reduce(tf.constant(0, tf.int64), lambda total, _: total + 1)
    return {
        **counter.counts(),
        "unreadable": sum(damaged.values()),
        "damaged_shards": damaged,
    }

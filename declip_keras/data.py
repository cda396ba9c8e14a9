"""The `tf.data` input pipelines: DeCLIP training batches and evaluation batches.

Training, per pair: decode the image once and make two augmented views, apply
one EDA operation to the caption, tokenize both captions with CLIP's BPE, and
mask one of them for MLM (per-token draws, `declip_keras.masking`). Everything runs
as TF graph ops with parallel calls; no Python runs per record.

Bad records never stop a run. Checks written as predicates catch each known
kind before the op that would fail on it, and `SkipCounter` counts them by
reason while the pipeline runs; what still fails to decode is dropped by
`ignore_errors` and counted as `decode_error`. Shards whose end is cut off are
found by a framing scan when the pipeline is built (`truncated_shard`).
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from declip_keras.augment import decode_rgb, eval_view, random_view
from declip_keras.eda import EDA
from declip_keras.masking import mask_tokens
from declip_keras.records import IMAGE_FIELDS, list_shards, scan_shard
from declip_keras.tokenizer import CaptionTokenizer

# Reasons a record is skipped, in the order the checks run.
SKIP_REASONS = (
    "empty_image",
    "not_an_image",
    "truncated_image",
    "empty_caption",
    "caption_not_utf8",
)
AUTOTUNE = tf.data.AUTOTUNE


class SkipCounter:
    """Counts of records read and skipped, kept in TF variables.

    The pipeline updates them as it runs, so they can be read at any time:
    during training (`declip_keras` callbacks log them) and after it.
    """

    def __init__(self):
        with tf.init_scope():
            self._by_reason = tf.Variable(
                tf.zeros([len(SKIP_REASONS) + 1], tf.int64), trainable=False
            )
            self._attempted = tf.Variable(tf.constant(0, tf.int64), trainable=False)
            self._decoded = tf.Variable(tf.constant(0, tf.int64), trainable=False)
        self.truncated_shards = 0

    def record(self, reason):
        """Counts one record's check result (0: usable, k: SKIP_REASONS[k-1])."""
        return self._by_reason.assign_add(
            tf.one_hot(reason, len(SKIP_REASONS) + 1, dtype=tf.int64)
        )

    def decode(self, image_bytes):
        """`decode_rgb`, counting attempts and successes around it."""
        with tf.control_dependencies([self._attempted.assign_add(1)]):
            image = decode_rgb(image_bytes)
        with tf.control_dependencies([image]):
            success = self._decoded.assign_add(1)
        with tf.control_dependencies([success]):
            return tf.identity(image)

    def counts(self) -> dict[str, int]:
        """`read`, `usable` and one count per skip reason.

        `read` counts records checked so far, shuffle buffers included.
        `decode_error` is the number of records that passed the checks but
        failed to decode; while a pipeline runs it can include the few
        records being decoded at that moment.
        """
        by_reason = [int(x) for x in self._by_reason.numpy()]
        decoded = int(self._decoded.numpy())
        counts = dict(zip(SKIP_REASONS, by_reason[1:], strict=True))
        counts["decode_error"] = int(self._attempted.numpy()) - decoded
        counts["truncated_shard"] = self.truncated_shards
        counts["read"] = sum(by_reason)
        counts["usable"] = decoded
        return counts

    def skipped(self) -> int:
        counts = self.counts()
        return sum(counts[r] for r in (*SKIP_REASONS, "decode_error"))


def _parse(serialized):
    spec = {
        name: tf.io.FixedLenFeature([], tf.string, "")
        for name in ("key", "txt", *IMAGE_FIELDS)
    }
    spec["label"] = tf.io.FixedLenFeature([], tf.int64, -1)
    record = tf.io.parse_single_example(serialized, spec)
    image = record["jpg"]
    for name in IMAGE_FIELDS[1:]:
        image = tf.where(tf.strings.length(image) > 0, image, record[name])
    return {
        "key": record["key"],
        "image": image,
        "txt": record["txt"],
        "label": record["label"],
    }


def _ends_with_any(data, suffix: bytes, window: int):
    """Whether `suffix` occurs within the last `window` bytes of `data`."""
    length = tf.strings.length(data)
    starts = tf.maximum(length - tf.range(len(suffix), window + 1), 0)
    lengths = tf.fill(tf.shape(starts), len(suffix))
    tails = tf.strings.substr(tf.fill(tf.shape(starts), data), starts, lengths)
    return tf.reduce_any(tf.equal(tails, suffix))


def _image_check(image):
    """0 if the bytes look like a whole image, else the 1-based reason code."""
    # Padded so that bytes shorter than a header still compare (substr fails
    # on a start past the end).
    header = tf.strings.join([tf.strings.substr(image, 0, 12), b"\0" * 12])
    head = tf.strings.substr(header, 0, 4)
    is_jpeg = tf.strings.substr(header, 0, 3) == b"\xff\xd8\xff"
    is_png = head == b"\x89PNG"
    is_webp = tf.logical_and(
        head == b"RIFF", tf.strings.substr(header, 8, 4) == b"WEBP"
    )
    is_gif = head == b"GIF8"
    is_bmp = tf.strings.substr(header, 0, 2) == b"BM"
    known = is_jpeg | is_png | is_webp | is_gif | is_bmp

    def riff_complete():
        size = tf.io.decode_raw(
            tf.strings.substr(image, 4, 4), tf.int32, little_endian=True
        )[0]
        return tf.cast(size, tf.int64) + 8 <= tf.cast(
            tf.strings.length(image), tf.int64
        )

    complete = tf.case(
        [
            (is_jpeg, lambda: _ends_with_any(image, b"\xff\xd9", 16)),
            (is_png, lambda: _ends_with_any(image, b"IEND", 16)),
            (is_webp, riff_complete),
            (is_gif, lambda: _ends_with_any(image, b";", 4)),
        ],
        default=lambda: tf.constant(True),
    )
    reason = tf.where(complete, 0, SKIP_REASONS.index("truncated_image") + 1)
    reason = tf.where(known, reason, SKIP_REASONS.index("not_an_image") + 1)
    return tf.where(
        tf.strings.length(image) > 0, reason, SKIP_REASONS.index("empty_image") + 1
    )


def _caption_check(caption):
    valid = tf.equal(
        tf.strings.unicode_transcode(caption, "UTF-8", "UTF-8", errors="ignore"),
        caption,
    )
    blank = tf.equal(tf.strings.length(tf.strings.strip(caption)), 0)
    reason = tf.where(valid, 0, SKIP_REASONS.index("caption_not_utf8") + 1)
    return tf.where(blank, SKIP_REASONS.index("empty_caption") + 1, reason)


def check_record(record):
    """The skip reason code of a parsed record: 0 when it is usable."""
    image_reason = _image_check(record["image"])
    return tf.where(image_reason > 0, image_reason, _caption_check(record["txt"]))


def _records(
    files: Sequence[str],
    counter: SkipCounter,
    shuffle_files: bool,
    seed: int,
    cycle_length: int = 8,
):
    """Parsed, checked records of the files, interleaved; bad ones counted, dropped."""
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
        record = _parse(serialized)
        reason = check_record(record)
        with tf.control_dependencies([counter.record(reason)]):
            record["reason"] = tf.identity(reason)
        return record

    # A record that is not a parseable Example fails here and is dropped.
    dataset = dataset.map(parse_and_check, num_parallel_calls=AUTOTUNE).ignore_errors()
    return dataset.filter(lambda record: record["reason"] == 0)


def _prepare_files(
    pattern: str, counter: SkipCounter, host_index: int, host_count: int, scan: bool
) -> list[str]:
    files = list_shards(pattern)
    if host_count > 1:
        if len(files) < host_count:
            raise ValueError(
                f"{pattern!r} matches {len(files)} shards, fewer than the {host_count} "
                "hosts reading it; write more shards."
            )
        files = files[host_index::host_count]
    if scan:
        counter.truncated_shards = sum(scan_shard(f).truncated for f in files)
    return files


def training_dataset(
    pattern: str,
    batch_size: int,
    image_size: int,
    context_length: int,
    *,
    seed: int = 0,
    declip: bool = True,
    mlm: bool = True,
    augmentation: str | None = None,
    shuffle_buffer: int = 10_000,
    repeat: bool = True,
    counter: SkipCounter | None = None,
    tokenizer: CaptionTokenizer | None = None,
    host_index: int = 0,
    host_count: int = 1,
    scan_shards: bool = True,
    start_step: int = 0,
) -> tf.data.Dataset:
    """Batches for `DeCLIP.fit` from TFRecord shards.

    Args:
        pattern: glob of shards (local or cloud URL; comma-separated allowed).
        batch_size: batch size of this host (the global batch over all hosts).
        image_size: side of the square views.
        context_length: token ids per caption.
        seed: seed of the shuffles and of every augmentation draw.
        declip: `True` for DeCLIP's views (two images, MLM-masked and EDA
            captions); `False` for plain CLIP (one view with crop scale
            0.5-1, the unmasked caption).
        mlm: mask the first caption for MLM (DeCLIP only): each ordinary
            token with probability 0.15, then 80% mask / 10% random / 10%
            kept (`declip_keras.masking.mask_tokens`), seeded per batch.
        augmentation: `"mocov2"` or `"crop"` (see `declip_keras.augment`);
            default: the released choice, `"mocov2"` for DeCLIP and `"crop"`
            for plain CLIP.
        shuffle_buffer: records in the shuffle buffer.
        repeat: cycle over the data forever (`fit` then needs
            `steps_per_epoch`).
        counter: receives the skip counts; pass one to read them.
        tokenizer: defaults to CLIP's BPE with DeCLIP's special ids.
        host_index, host_count: read every `host_count`-th shard from
            `host_index` (multi-host data parallelism).
        scan_shards: scan the shards' framing for cut-off tails first.
        start_step: batches already trained on; a resumed run continues the
            same stream (records are skipped before any decoding).

    Returns:
        A dataset of dicts: `image_1` (and `image_2`) float32 `[B, S, S, 3]`,
        `token_ids` `[B, L]`, and for DeCLIP `eda_token_ids` `[B, L]` and
        `mask_positions`, `mask_ids`, `mask_weights` `[B, M]`.
    """
    counter = counter or SkipCounter()
    tokenizer = tokenizer or CaptionTokenizer(context_length)
    files = _prepare_files(pattern, counter, host_index, host_count, scan_shards)
    dataset = _records(files, counter, shuffle_files=True, seed=seed)
    if repeat:
        dataset = dataset.repeat()
    dataset = dataset.shuffle(shuffle_buffer, seed=seed).enumerate()
    if start_step:
        dataset = dataset.skip(start_step * batch_size)
    eda = EDA() if declip else None
    augmentation = augmentation or ("mocov2" if declip else "crop")

    def make_views(index, record):
        element_seed = tf.stack([tf.constant(seed, tf.int64), index])
        seeds = tf.random.experimental.stateless_split(element_seed, 3)
        image = counter.decode(record["image"])
        if not declip:
            return {
                "image_1": random_view(image, seeds[0], image_size, augmentation),
                "token_ids": record["txt"],
            }
        return {
            "image_1": random_view(image, seeds[0], image_size, augmentation),
            "image_2": random_view(image, seeds[1], image_size, augmentation),
            "token_ids": record["txt"],
            "eda_token_ids": eda(record["txt"], seeds[2]),
        }

    dataset = dataset.map(make_views, num_parallel_calls=AUTOTUNE).ignore_errors()
    dataset = dataset.batch(batch_size, drop_remainder=True)

    def tokenize(step, batch):
        # Whole batches: keras-hub's BPE costs far less per caption this way.
        for key in ("token_ids", "eda_token_ids"):
            if key in batch:
                batch[key] = tokenizer(batch[key])
        if declip and mlm:
            # Negative indices keep the batch seeds apart from element seeds.
            batch_seed = tf.stack([tf.constant(seed, tf.int64), -1 - step])
            batch.update(
                mask_tokens(batch["token_ids"], batch_seed, tokenizer.special_token_ids)
            )
        return batch

    # Numbered from start_step, so a resumed stream draws the same masks.
    dataset = dataset.enumerate(start=start_step)
    dataset = dataset.map(tokenize, num_parallel_calls=AUTOTUNE)
    if host_count > 1:
        # Each host already reads its own shards; tf.distribute must not re-shard.
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = (
            tf.data.experimental.AutoShardPolicy.OFF
        )
        dataset = dataset.with_options(options)
    return dataset.prefetch(AUTOTUNE)


def eval_dataset(
    pattern: str,
    batch_size: int,
    image_size: int,
    context_length: int,
    *,
    counter: SkipCounter | None = None,
    tokenizer: CaptionTokenizer | None = None,
) -> tf.data.Dataset:
    """Evaluation batches in file order: one centre-cropped view, plain tokens.

    Yields dicts with `images` `[B, S, S, 3]`, `token_ids` `[B, L]`, `key`,
    `txt` (the caption) and `label` (-1 where the record has none). The last
    batch may be smaller.
    """
    counter = counter or SkipCounter()
    tokenizer = tokenizer or CaptionTokenizer(context_length)
    files = _prepare_files(pattern, counter, 0, 1, scan=True)
    dataset = _records(files, counter, shuffle_files=False, seed=0)

    def prepare(record):
        image = counter.decode(record["image"])
        return {
            "images": eval_view(image, image_size),
            "token_ids": tokenizer(record["txt"]),
            "key": record["key"],
            "txt": record["txt"],
            "label": record["label"],
        }

    dataset = dataset.map(prepare, num_parallel_calls=AUTOTUNE, deterministic=True)
    return dataset.ignore_errors().batch(batch_size).prefetch(AUTOTUNE)


def check_data(pattern: str) -> dict[str, int]:
    """Reads every record through the training decode path; returns the counts."""
    counter = SkipCounter()
    files = _prepare_files(pattern, counter, 0, 1, scan=True)

    def decode(record):
        image = counter.decode(record["image"])
        return tf.shape(image, tf.int64)[0]

    dataset = _records(files, counter, shuffle_files=False, seed=0)
    dataset = dataset.map(decode, num_parallel_calls=AUTOTUNE).ignore_errors()
    dataset.reduce(tf.constant(0, tf.int64), lambda total, _: total + 1)
    return counter.counts()

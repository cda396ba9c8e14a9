"""Checks that keep bad records out of a run, and the counts of what they kept out.

Each known kind of bad record is caught by a predicate, in TF ops, before the
op that would fail on it, so one bad record never stops a long run;
`SkipCounter` counts the records by reason while a pipeline runs. What still
fails to decode is counted as `decode_error`, and shards whose end is cut
off as `truncated_shard` (found by `records.scan_shard`).
"""

from __future__ import annotations

import tensorflow as tf

from declip_keras.data.augment import decode_rgb

# Reasons a record is skipped, in the order the checks run.
SKIP_REASONS = (
    "empty_image",
    "not_an_image",
    "truncated_image",
    "empty_caption",
    "caption_not_utf8",
)


class SkipCounter:
    """Counts of records read and skipped, kept in TF variables.

    The pipeline updates them as it runs, so they can be read at any time:
    during training (`declip_keras` callbacks log them) and after it. Each
    record is counted once: a training pipeline that cycles over its shards
    counts its first pass only (`count_pass`), so one bad record is one
    skip however many passes a run makes.
    """

    def __init__(self):
        with tf.init_scope():
            self._by_reason = tf.Variable(
                tf.zeros([len(SKIP_REASONS) + 1], tf.int64), trainable=False
            )
            # Decodes: attempted and done, of every record drawn, and of
            # the counted (first-pass) ones, whose difference is the errors.
            self._decodes = tf.Variable(tf.zeros([2, 2], tf.int64), trainable=False)
            self._pass_counted = tf.Variable(False, trainable=False)
        self.truncated_shards = 0
        # Records the shards' framing holds (set by a pipeline that scanned
        # them): those a whole pass did not read are `unreadable`.
        self.framed_records: int | None = None

    def record(self, reason, counted=True):
        """Counts one record's check result (0: usable, k: SKIP_REASONS[k-1])
        unless `counted` is false."""
        return self._by_reason.assign_add(
            tf.one_hot(reason, len(SKIP_REASONS) + 1, dtype=tf.int64)
            * tf.cast(counted, tf.int64)
        )

    def count_pass(self, reason, end_of_pass):
        """The first-pass counting of a pipeline that cycles: counts `reason`
        until the first `end_of_pass`, then nothing; returns whether this
        record was counted (its decode is counted only then)."""
        counted = tf.logical_and(
            tf.logical_not(self._pass_counted.read_value()),
            tf.logical_not(end_of_pass),
        )
        with tf.control_dependencies([self.record(reason, counted)]):
            done = self._pass_counted.assign(
                tf.logical_or(self._pass_counted.read_value(), end_of_pass)
            )
        with tf.control_dependencies([done]):
            return tf.identity(counted)

    def decode(self, image_bytes, counted=True):
        """`decode_rgb`, counting attempts and successes around it; a
        failure counts as a `decode_error` only if `counted` (a record of a
        later pass was counted in the first)."""
        one = tf.stack([tf.constant(1, tf.int64), tf.cast(counted, tf.int64)])
        none = tf.zeros_like(one)
        attempt = self._decodes.assign_add(tf.stack([one, none]))
        with tf.control_dependencies([attempt]):
            image = decode_rgb(image_bytes)
        with tf.control_dependencies([image]):
            success = self._decodes.assign_add(tf.stack([none, one]))
        with tf.control_dependencies([success]):
            return tf.identity(image)

    def counts(self) -> dict[str, int]:
        """`read`, `usable` and one count per skip reason.

        `read` counts records checked so far, shuffle buffers included (each
        record once). `usable` counts the images decoded (each time a record
        is drawn, read-ahead included). `decode_error` is the number of
        records that passed the checks but failed to decode (each once);
        while a pipeline runs it can include the few records being decoded
        at that moment. `unreadable` (once a pass is complete, when the
        shards were scanned) counts the records of the shards' framing that
        no reader got to: those a damaged record hides, or that do not parse.
        """
        by_reason = [int(x) for x in self._by_reason.numpy()]
        (_, attempted), (decoded, decoded_counted) = self._decodes.numpy().tolist()
        counts = dict(zip(SKIP_REASONS, by_reason[1:], strict=True))
        counts["decode_error"] = attempted - decoded_counted
        counts["truncated_shard"] = self.truncated_shards
        counts["read"] = sum(by_reason)
        counts["usable"] = decoded
        if self.framed_records is not None and bool(self._pass_counted.numpy()):
            counts["unreadable"] = self.framed_records - counts["read"]
        return counts

    def skipped(self) -> int:
        counts = self.counts()
        return sum(
            counts.get(r, 0) for r in (*SKIP_REASONS, "decode_error", "unreadable")
        )


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

"""The input pipeline on generated shards, good and bad records mixed."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from helpers import flip_byte_in_record, small_model, to_numpy
from PIL import Image

from declip_keras import DeCLIP
from declip_keras.data import batch_format, checks
from declip_keras.data import pipeline as data
from declip_keras.data.batch_format import (
    END_TOKEN_ID,
    MASK_TOKEN_ID,
    START_TOKEN_ID,
    VOCABULARY_SIZE,
)
from declip_keras.data.image_constants import IMAGENET_MEAN, IMAGENET_STD
from declip_keras.data.masking import mlm_selection_length
from declip_keras.data.records import encode_example, iterate_examples, scan_shard

RNG = np.random.default_rng(0)
# tf.data code does not depend on the Keras backend: run it in one pass of the
# suite. Only the test that feeds `fit` runs under every backend.


def image_bytes(mode: str = "RGB", fmt: str = "JPEG", size=(40, 30)) -> bytes:
    pixels = (RNG.random((size[1], size[0], 3)) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, fmt)
    return buffer.getvalue()


# Usable despite unusual encodings: each must come out as an RGB pair.
GOOD = [
    ("rgb_jpeg", image_bytes(), "jpg", "a red square"),
    ("gray_png", image_bytes("L", "PNG"), "png", "a gray square"),
    ("cmyk_jpeg", image_bytes("CMYK"), "jpg", "a cmyk picture"),
    ("palette_png", image_bytes("P", "PNG"), "png", "a palette picture"),
    ("alpha_png", image_bytes("RGBA", "PNG"), "png", "a transparent picture"),
    ("webp", image_bytes("RGB", "WEBP"), "webp", "a webp picture"),
    ("large_jpeg", image_bytes(size=(3000, 2000)), "jpg", "a very large picture"),
]
_jpeg = image_bytes()
BAD = {
    "empty_image": [("no_image", b"", "jpg", "nothing here")],
    "not_an_image": [("text_bytes", b"this is not an image at all", "jpg", "text")],
    "truncated_image": [
        ("cut_jpeg", _jpeg[: len(_jpeg) // 2], "jpg", "half a picture")
    ],
    "decode_error": [
        ("garbage_jpeg", b"\xff\xd8\xff" + RNG.bytes(300) + b"\xff\xd9", "jpg", "noise")
    ],
    "empty_caption": [
        ("empty_caption", image_bytes(), "jpg", ""),
        ("blank_caption", image_bytes(), "jpg", " \t\n "),
    ],
    "caption_not_utf8": [("latin1", image_bytes(), "jpg", "caf\xe9".encode("latin-1"))],
}


def write_shard(path, pairs) -> None:
    with tf.io.TFRecordWriter(str(path)) as writer:
        for key, image, fmt, caption in pairs:
            writer.write(encode_example(key, image, fmt, caption))


@pytest.fixture(scope="module")
def dirty_shards(tmp_path_factory):
    """Two clean-framed shards mixing good and bad pairs, and one cut-off shard."""
    root = tmp_path_factory.mktemp("dirty")
    bad = [pair for pairs in BAD.values() for pair in pairs]
    write_shard(root / "part-0.tfrecord", GOOD[:4] + bad[:4])
    write_shard(root / "part-1.tfrecord", GOOD[4:] + bad[4:])
    # A shard whose last record is cut off mid-payload (one good pair survives).
    write_shard(root / "part-2.tfrecord", [GOOD[0], GOOD[1]])
    whole = (root / "part-2.tfrecord").read_bytes()
    (root / "part-2.tfrecord").write_bytes(whole[:-50])
    return root


def expected_skips() -> dict[str, int]:
    return {reason: len(pairs) for reason, pairs in BAD.items()}


def first_batch(shards, **options) -> dict[str, np.ndarray]:
    """The first training batch of `shards` at small shapes, as numpy."""
    tf.random.set_seed(0)
    defaults = {"batch_size": 4, "image_size": 32, "context_length": 16, "seed": 3}
    dataset = data.training_dataset(
        str(shards / "*.tfrecord"),
        data.PipelineOptions(shuffle_buffer=16, **{**defaults, **options}),
    )
    return {key: value.numpy() for key, value in next(iter(dataset)).items()}


@pytest.mark.backend_independent
def test_writer_reader_round_trip(tmp_path):
    write_shard(tmp_path / "a.tfrecord", GOOD[:2])
    records = list(iterate_examples(str(tmp_path / "a.tfrecord")))
    assert [r["key"] for r in records] == [b"rgb_jpeg", b"gray_png"]
    assert records[1]["png"] == GOOD[1][1] and records[1]["txt"] == b"a gray square"
    assert scan_shard(str(tmp_path / "a.tfrecord")).records == 2


@pytest.mark.backend_independent
def test_scan_finds_a_cut_off_tail(dirty_shards):
    scan = scan_shard(str(dirty_shards / "part-2.tfrecord"))
    assert scan.truncated and scan.records == 1
    assert not scan_shard(str(dirty_shards / "part-0.tfrecord")).truncated


@pytest.mark.backend_independent
def test_eval_pipeline_yields_exactly_the_good_pairs_and_counts_the_bad(dirty_shards):
    counter = checks.SkipCounter()
    dataset = data.eval_dataset(
        str(dirty_shards / "*.tfrecord"),
        batch_size=4,
        image_size=32,
        context_length=16,
        counter=counter,
    )
    keys, images = [], []
    for batch in dataset:
        keys += [k.decode() for k in batch["key"].numpy()]
        images.append(batch["images"].numpy())
    assert sorted(keys) == sorted([pair[0] for pair in GOOD] + ["rgb_jpeg"])
    assert np.concatenate(images).shape == (len(keys), 32, 32, 3)
    counts = counter.counts()
    for reason, count in expected_skips().items():
        assert counts[reason] == count, reason
    assert counts["truncated_shard"] == 1
    assert counts["usable"] == len(keys)


@pytest.mark.backend_independent
def test_check_data_reports_the_same_counts(dirty_shards):
    counts = data.check_data(str(dirty_shards / "*.tfrecord"))
    for reason, count in expected_skips().items():
        assert counts[reason] == count, reason
    assert counts["usable"] == len(GOOD) + 1
    assert counts["truncated_shard"] == 1


@pytest.mark.backend_independent
def test_check_data_counts_what_a_flipped_byte_hides(tmp_path, capsys):
    """One flipped byte in record 4 of 24: no reader gets past it, and
    `check-data` names the shard with the 21 records lost."""
    from declip_keras.cli import main

    shard = tmp_path / "part-0.tfrecord"
    write_shard(shard, [(f"k{i}", GOOD[0][1], "jpg", f"pair {i}") for i in range(24)])
    flip_byte_in_record(shard, 3)
    assert main(["check-data", str(shard)]) == 0
    captured = capsys.readouterr()
    counts = json.loads(captured.out)
    assert counts["usable"] == 3 and counts["unreadable"] == 21
    assert counts["damaged_shards"] == {str(shard): 21}
    assert captured.err.strip().splitlines() == [
        f"{shard}: 21 record(s) unreadable past a damaged record (a failed "
        "checksum); rewrite the shard from its source."
    ]


@pytest.mark.backend_independent
def test_no_matching_shard_names_the_pattern(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        data.check_data(str(tmp_path / "nothing-here-*.tfrecord"))


@pytest.mark.backend_independent
def test_training_batches_have_declip_structure(dirty_shards):
    counter = checks.SkipCounter()
    dataset = data.training_dataset(
        str(dirty_shards / "*.tfrecord"),
        data.PipelineOptions(
            batch_size=4, image_size=32, context_length=16, seed=3, shuffle_buffer=16
        ),
        counter=counter,
    )
    batch = next(iter(dataset))
    assert batch["image_1"].shape == batch["image_2"].shape == (4, 32, 32, 3)
    assert batch["token_ids"].shape == batch["eda_token_ids"].shape == (4, 16)
    # Packed targets (`pack_targets`): a few slots per row, naming captions.
    slots = batch["mask_weights"].shape
    for key in ("mask_rows", "mask_positions", "mask_ids"):
        assert batch[key].shape == slots
    assert slots[0] == 4 and slots[1] <= mlm_selection_length(16)
    assert set(batch["mask_rows"].numpy().ravel()) <= {0, 1, 2, 3}
    # The two views of one image are independent draws.
    assert not np.allclose(batch["image_1"].numpy(), batch["image_2"].numpy())
    ids = batch["eda_token_ids"].numpy()
    assert np.all(ids[:, 0] == START_TOKEN_ID)
    assert np.all(np.argmax(ids, axis=1) > 0)  # an end token after the start
    assert np.all(ids <= END_TOKEN_ID)
    # Masked positions hold the mask id (or a random/kept token), never specials.
    positions = batch["mask_positions"].numpy()
    weights = batch["mask_weights"].numpy()
    targets = batch["mask_ids"].numpy()
    assert np.all(
        np.isin(
            targets[weights > 0],
            [MASK_TOKEN_ID, START_TOKEN_ID, END_TOKEN_ID],
            invert=True,
        )
    )
    assert positions.max() < 16
    assert counter.skipped() >= 1


@pytest.mark.backend_independent
def test_a_cycling_pipeline_counts_each_record_once(dirty_shards):
    """Many passes over the dirty shards: the counts are one pass's."""
    counter = checks.SkipCounter()
    options = data.PipelineOptions(
        batch_size=4, image_size=32, context_length=16, seed=3, shuffle_buffer=4
    )
    dataset = data.training_dataset(str(dirty_shards / "*.tfrecord"), options,
                                    counter=counter)  # fmt: skip
    usable = len(GOOD) + 1
    for _ in zip(range(6 * usable // 4), dataset, strict=False):  # ~6 passes
        pass
    counts = counter.counts()
    for reason, count in expected_skips().items():
        assert counts[reason] == count, reason
    assert counts["usable"] >= 6 * usable  # decodes: every pass draws them
    assert counts["read"] == usable + sum(expected_skips().values())
    # The framing scan saw every record, and a whole pass read them all.
    assert counts["unreadable"] == 0


@pytest.mark.backend_independent
def test_training_pipeline_is_deterministic_for_a_seed(dirty_shards):
    a, b = first_batch(dirty_shards, seed=5), first_batch(dirty_shards, seed=5)
    for key in ("image_1", "image_2", "token_ids", "eda_token_ids", "mask_positions"):
        np.testing.assert_array_equal(a[key], b[key])


@pytest.mark.backend_independent
def test_a_batch_that_does_not_split_over_the_replicas_is_one_error(dirty_shards):
    with pytest.raises(ValueError, match="batch_size 6 does not split over 4"):
        data.training_dataset(
            str(dirty_shards / "*.tfrecord"),
            data.PipelineOptions(6, 32, 16, replica_splits=4),
        )


@pytest.mark.backend_independent
def test_plain_clip_batches_have_one_view_and_unmasked_captions(dirty_shards):
    dataset = data.training_dataset(
        str(dirty_shards / "*.tfrecord"),
        data.PipelineOptions(
            batch_size=4,
            image_size=32,
            context_length=16,
            declip=False,
            shuffle_buffer=16,
        ),
    )
    batch = next(iter(dataset))
    assert set(batch) == {"image_1", "token_ids"}
    assert not np.any(batch["token_ids"].numpy() == MASK_TOKEN_ID)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def short_caption_shards(tmp_path_factory):
    """1,200 pairs whose captions are three one-token words."""
    words = ("red", "blue", "green", "cat", "dog", "car", "big", "small", "tree")
    rng = np.random.default_rng(1)
    pixels = png_bytes(np.full((8, 8, 3), 128, np.uint8))
    pairs = [
        (str(i), pixels, "png", " ".join(rng.choice(words, 3))) for i in range(1200)
    ]
    root = tmp_path_factory.mktemp("short")
    write_shard(root / "part-0.tfrecord", pairs)
    return str(root / "*.tfrecord")


@pytest.mark.backend_independent
def test_mlm_in_the_pipeline_selects_each_token_with_probability_015(
    short_caption_shards,
):
    """Per-token Bernoulli(0.15) inside tf.data, then 80/10/10, as released."""

    def batches(mlm: bool):
        return data.training_dataset(
            short_caption_shards,
            data.PipelineOptions(
                batch_size=100,
                image_size=8,
                context_length=8,
                seed=4,
                mlm=mlm,
                repeat=False,
                shuffle_buffer=100,
            ),
        )

    # Each target as (caption in the whole stream, position, original id);
    # the batches' targets are packed, `mask_rows` naming their captions.
    original, masked, rows, positions, targets = [], [], [], [], []
    for plain, batch in zip(batches(False), batches(True), strict=True):
        real = batch["mask_weights"].numpy() > 0
        rows.append(batch["mask_rows"].numpy()[real] + 100 * len(original))
        positions.append(batch["mask_positions"].numpy()[real])
        targets.append(batch["mask_ids"].numpy()[real])
        original.append(plain["token_ids"].numpy())
        masked.append(batch["token_ids"].numpy())
    original, masked = np.concatenate(original), np.concatenate(masked)
    rows, positions = np.concatenate(rows), np.concatenate(positions)
    targets = np.concatenate(targets)
    assert len(original) == 1200
    ordinary = ~np.isin(original, [MASK_TOKEN_ID, START_TOKEN_ID, END_TOKEN_ID])
    assert np.all(ordinary.sum(axis=1) == 3)

    selected = np.zeros_like(ordinary)
    selected[rows, positions] = True
    assert selected.sum() == len(rows)  # no target twice
    assert not np.any(selected & ~ordinary)  # never start, end or padding
    # Targets are the original tokens; only selected tokens change.
    np.testing.assert_array_equal(targets, original[rows, positions])
    assert not np.any((masked != original) & ~selected)

    # Binomial standard errors: rate 0.006 (3,600 tokens), none-masked share
    # 0.014 (1,200 captions), mask share 0.017 (~540 selections); the bounds
    # are about 3.5 of them. keras-hub's MaskedLMMaskGenerator in this graph
    # gave a rate of 0.18 with every caption masked.
    rate = selected.sum() / ordinary.sum()
    assert abs(rate - 0.15) < 0.021
    nothing_masked = np.mean(selected.sum(axis=1) == 0)
    assert abs(nothing_masked - 0.85**3) < 0.05
    to_mask = np.mean(masked[selected] == MASK_TOKEN_ID)
    kept = np.mean(masked[selected] == original[selected])
    assert abs(to_mask - 0.8) < 0.06
    assert abs(kept - 0.1) < 0.045
    assert abs(1 - to_mask - kept - 0.1) < 0.045  # random replacements
    # Random replacements are ordinary tokens, never an id that outranks the end.
    assert np.all(masked[selected & (masked != MASK_TOKEN_ID)] < MASK_TOKEN_ID)


@pytest.mark.backend_independent
def test_plain_clip_views_are_crops_only(tmp_path):
    """The CLIP baseline's default augmentation: random resized crop, no
    colour jitter, grayscale, blur or flip (the released STANDARD_SLIP)."""
    pixels = np.zeros((64, 64, 3), np.uint8)
    pixels[:, :32, 0] = 255  # red left half
    pixels[:, 32:, 2] = 255  # blue right half
    write_shard(
        tmp_path / "part-0.tfrecord",
        [(str(i), png_bytes(pixels), "png", "red and blue") for i in range(32)],
    )

    def views(**kwargs):
        dataset = data.training_dataset(
            str(tmp_path / "*.tfrecord"),
            data.PipelineOptions(
                batch_size=32, image_size=24, context_length=8, repeat=False, **kwargs
            ),
        )
        batch = next(iter(dataset))
        mean, std = np.array(IMAGENET_MEAN), np.array(IMAGENET_STD)
        return batch["image_1"].numpy() * std + mean

    crops = views(declip=False)
    # No hue, saturation, grayscale or blur: green stays 0, red and blue are
    # each either full or empty away from the colour edge; no flip: red left.
    assert np.abs(crops[..., 1]).max() < 1e-5
    assert np.all(crops[:, :, 0, 0] > 0.99) and np.all(crops[:, :, -1, 2] > 0.99)
    assert np.all(crops[:, :, 0, 2] < 0.01) and np.all(crops[:, :, -1, 0] < 0.01)
    # Chosen explicitly, the plain-CLIP pipeline takes DeCLIP's views too.
    jittered = views(declip=False, augmentation="mocov2")
    assert np.abs(jittered[..., 1]).max() > 0.05


@pytest.mark.backend_independent
def test_batches_are_trimmed_to_the_smallest_bucket_that_holds_their_captions(
    dirty_shards,
):
    def batches(bucket_captions):
        dataset = data.training_dataset(
            str(dirty_shards / "*.tfrecord"),
            data.PipelineOptions(
                batch_size=4,
                image_size=32,
                context_length=77,
                seed=1,
                shuffle_buffer=16,
                bucket_captions=bucket_captions,
            ),
        )
        return [next(it) for it in [iter(dataset)] for _ in range(3)]

    for cut, full in zip(batches(True), batches(False), strict=True):
        length = cut["token_ids"].shape[1]
        assert cut["eda_token_ids"].shape[1] == length
        assert full["token_ids"].shape[1] == 77
        ends = [
            np.argmax(full[k].numpy(), axis=1) for k in ("token_ids", "eda_token_ids")
        ]
        needed = max(e.max() for e in ends) + 1
        assert length == min(b for b in data.CAPTION_BUCKETS if b >= needed)
        for key in ("token_ids", "eda_token_ids"):
            np.testing.assert_array_equal(
                cut[key].numpy(), full[key].numpy()[:, :length]
            )
            assert np.all(full[key].numpy()[:, length:] == END_TOKEN_ID)
        # MLM targets: packed, caption by caption, into the fewest slots per
        # row that hold them; every target kept, in order, naming its caption.
        weights = full["mask_weights"].numpy()
        caption, slot = np.nonzero(weights > 0)
        kept = cut["mask_weights"].numpy() > 0
        assert cut["mask_weights"].shape[1] == max(1, -(-len(caption) // 4))
        np.testing.assert_array_equal(cut["mask_rows"].numpy()[kept], caption)
        for key in ("mask_positions", "mask_ids"):
            np.testing.assert_array_equal(
                cut[key].numpy()[kept], full[key].numpy()[caption, slot]
            )
        assert cut["mask_positions"].numpy().max() < length
    evaluation = next(
        iter(data.eval_dataset(str(dirty_shards / "*.tfrecord"), 8, 32, 77))
    )
    assert evaluation["token_ids"].shape[1] in data.CAPTION_BUCKETS


def test_a_trimmed_and_packed_pipeline_batch_gives_the_untrimmed_losses(
    dirty_shards,
):
    """The pipeline's own batch, trimmed to its bucket with end-id padding cut
    and its MLM targets packed, gives the model every loss term of the same
    batch at full context length and unpacked, to 1e-5."""
    options = {"context_length": 77, "batch_size": 8, "seed": 2}
    cut = first_batch(dirty_shards, **options)
    full = first_batch(dirty_shards, bucket_captions=False, **options)
    assert cut["token_ids"].shape[1] < 77 and "mask_rows" in cut
    assert full["token_ids"].shape[1] == 77 and "mask_rows" not in full
    assert cut["mask_weights"].shape[1] < full["mask_weights"].shape[1]
    assert full["mask_weights"].sum() > 0
    model = small_model(context_length=77, vocabulary_size=VOCABULARY_SIZE)
    terms = [model.compute_loss_terms(b, model(b)) for b in (cut, full)]
    assert set(terms[0]) == {"loss", "logit_scale", "clip_loss", "ss_loss",
                             "mlm_loss", "nn_loss"}  # fmt: skip
    for name, value in terms[1].items():
        np.testing.assert_allclose(
            to_numpy(terms[0][name]), to_numpy(value), rtol=1e-5, atol=1e-6,
            err_msg=name,
        )  # fmt: skip


def test_device_augmentation_gives_the_host_views(dirty_shards):
    """With device-side augmentation the pipeline ships crops and parameters,
    and the model's photometric step turns them into the host's views."""

    host = first_batch(dirty_shards)
    device = first_batch(dirty_shards, device_augmentation=True)
    assert set(device) - set(host) == set(batch_format.PHOTOMETRIC.values())
    model = DeCLIP.from_preset("tiny", image_size=32, context_length=16, queue_size=64)
    for key, params in batch_format.PHOTOMETRIC.items():
        views = to_numpy(model.photometric(device[key], device[params]))
        np.testing.assert_allclose(views, host[key], atol=1e-5)
    # DeCLIP applies the parameters itself.
    np.testing.assert_allclose(
        to_numpy(model(device)["image_embeddings"]),
        to_numpy(model(host)["image_embeddings"]),
        atol=1e-5,
    )


@pytest.mark.parametrize("device_augmentation", [False, True])
def test_fit_consumes_the_pipeline(dirty_shards, device_augmentation):
    """The tf.data batches train a DeCLIP under the active backend."""
    dataset = data.training_dataset(
        str(dirty_shards / "*.tfrecord"),
        data.PipelineOptions(
            batch_size=4,
            image_size=32,
            context_length=77,  # batches trimmed to their captions' bucket
            shuffle_buffer=16,
            device_augmentation=device_augmentation,
        ),
    )
    model = DeCLIP.from_preset("tiny", image_size=32, context_length=77, queue_size=64)
    model.compile(optimizer="adamw")
    history = model.fit(dataset, steps_per_epoch=2, epochs=1, verbose=0).history
    assert all(np.isfinite(v[0]) for v in history.values())

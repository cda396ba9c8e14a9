from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from declip_keras.data.batch_format import (
    END_TOKEN_ID,
    MASK_TOKEN_ID,
    START_TOKEN_ID,
    VOCABULARY_SIZE,
)
from declip_keras.data.tokenizer import CaptionTokenizer, clip_vocabulary

# Ids from OpenAI's reference tokenizer (open_clip's SimpleTokenizer, whose
# start/end are 49406/49407), without the special tokens.
REFERENCE = [
    ("a photo of a cat", [320, 1125, 539, 320, 2368]),
    ("A Photo of a DOG!!", [320, 1125, 539, 320, 1929, 748]),
    (
        "two men riding horses on the beach, at sunset.",
        [1237, 1656, 6765, 8809, 525, 518, 2117, 267, 536, 3424, 269],
    ),
    (
        "it's 3:45pm & we're   late",
        [585, 568, 274, 281, 275, 276, 990, 261, 649, 982, 2325],
    ),
    (
        "naïve café über résumé",
        [1097, 35689, 563, 15304, 6522, 1516, 29106, 7054, 4166],
    ),
    ("emoji 🙂 and 日本語 text", [16327, 14860, 537, 39121, 44353, 34002, 508, 4160]),
    ("Grinning face with big eyes", [709, 4415, 1710, 593, 1205, 3095]),
    ("handwritten digit 7, white on black", [35192, 27472, 278, 267, 1579, 525, 1449]),
    (
        "COVID-19 cases rose 12.5% in 2021",
        [
            622,
            9284,
            268,
            272,
            280,
            6888,
            3568,
            272,
            273,
            269,
            276,
            260,
            530,
            273,
            271,
            273,
            272,
        ],
    ),
]
CONTEXT = 24


def expected_ids(ids: list[int], context: int = CONTEXT) -> list[int]:
    ids = [START_TOKEN_ID, *ids[: context - 2], END_TOKEN_ID]
    return ids + [END_TOKEN_ID] * (context - len(ids))


@pytest.fixture(scope="module")
def tokenizer() -> CaptionTokenizer:
    return CaptionTokenizer(context_length=CONTEXT)


def test_vocabulary_layout():
    vocabulary, merges = clip_vocabulary()
    assert len(vocabulary) == VOCABULARY_SIZE == 49409
    assert len(merges) == 48894
    assert (MASK_TOKEN_ID, START_TOKEN_ID, END_TOKEN_ID) == (49406, 49407, 49408)
    assert vocabulary["<|mask|>"] == MASK_TOKEN_ID
    assert vocabulary["!"] == 0


def test_ids_equal_the_reference_tokenizer_eagerly(tokenizer):
    ids = np.asarray(tokenizer([text for text, _ in REFERENCE]))
    for (text, reference), row in zip(REFERENCE, ids, strict=True):
        assert row.tolist() == expected_ids(reference), text


def test_ids_equal_the_reference_tokenizer_in_tf_data(tokenizer):
    texts = [text for text, _ in REFERENCE]
    dataset = tf.data.Dataset.from_tensor_slices(texts).map(tokenizer).batch(len(texts))
    ids = next(iter(dataset)).numpy()
    for (text, reference), row in zip(REFERENCE, ids, strict=True):
        assert row.tolist() == expected_ids(reference), text


def test_truncation_keeps_start_and_end():
    short = CaptionTokenizer(context_length=6)
    text, reference = REFERENCE[2]
    row = np.asarray(short([text]))[0].tolist()
    assert row == [START_TOKEN_ID, *reference[:4], END_TOKEN_ID]
    assert int(np.argmax(row)) == 5


def test_custom_vocabulary_must_put_end_last():
    vocabulary = {"a": 0, "<|mask|>": 3, "<|startoftext|>": 1, "<|endoftext|>": 2}
    with pytest.raises(ValueError, match="largest id"):
        CaptionTokenizer(vocabulary=vocabulary, merges=[])

from __future__ import annotations

from collections import Counter

import pytest
import tensorflow as tf

from declip_keras.data.eda import EDA, RANDOM_DELETION, RANDOM_SWAP, SYNONYM_REPLACEMENT

pytestmark = pytest.mark.backend_independent
CAPTION = "a photo of the smiling dog on a sunny beach"
SYNONYMS = {"photo": ["picture", "photograph"], "dog": ["hound"], "the": ["ze"]}


@pytest.fixture(scope="module")
def eda():
    return EDA(synonyms=SYNONYMS)


def run(eda, caption, seed, operation):
    out = eda(tf.constant(caption), tf.constant([0, seed]), tf.constant(operation))
    return out.numpy().decode().split()


def test_synonym_replacement_changes_one_word_to_a_synonym(eda):
    words = CAPTION.split()
    for seed in range(20):
        out = run(eda, CAPTION, seed, SYNONYM_REPLACEMENT)
        changed = [(a, b) for a, b in zip(words, out, strict=True) if a != b]
        assert len(changed) == 1
        original, new = changed[0]
        assert new in SYNONYMS[original]
        assert original != "the"  # stop words are never replaced


def test_synonym_replacement_without_candidates_is_identity(eda):
    assert run(eda, "a sunny beach", 0, SYNONYM_REPLACEMENT) == ["a", "sunny", "beach"]


def test_random_swap_swaps_exactly_two_words(eda):
    words = CAPTION.split()
    for seed in range(20):
        out = run(eda, CAPTION, seed, RANDOM_SWAP)
        assert Counter(out) == Counter(words)
        assert sum(a != b for a, b in zip(words, out, strict=True)) in (0, 2)
        assert out != words or len(set(words)) < len(words)
    assert run(eda, "alone", 0, RANDOM_SWAP) == ["alone"]


def test_random_deletion_drops_about_a_tenth_and_never_everything(eda):
    caption = " ".join(f"w{i}" for i in range(50))
    kept = [len(run(eda, caption, seed, RANDOM_DELETION)) for seed in range(40)]
    assert 0.85 < sum(kept) / (50 * 40) < 0.95
    for seed in range(30):
        assert len(run(eda, "one two", seed, RANDOM_DELETION)) >= 1


def test_operations_are_chosen_uniformly_and_the_wordnet_table_loads():
    eda = EDA()  # the shipped WordNet table
    outcomes = Counter()
    for seed in range(300):
        out = eda(tf.constant(CAPTION), tf.constant([1, seed])).numpy().decode().split()
        if len(out) < len(CAPTION.split()):
            outcomes["deletion"] += 1
        elif sorted(out) == sorted(CAPTION.split()):
            outcomes["swap_or_noop"] += 1
        else:
            outcomes["synonym"] += 1
    assert 60 < outcomes["synonym"] < 140
    replaced = eda.synonym_replacement(tf.constant(["photo"]), tf.constant([0, 0]))
    assert replaced.numpy()[0].decode() in {"exposure", "photograph", "pic", "picture"}

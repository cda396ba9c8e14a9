"""Easy Data Augmentation (EDA) of captions, in TF string ops for `tf.data`.

DeCLIP's second text view applies one EDA operation, chosen uniformly: synonym
replacement of one word (WordNet, stop words excluded), a random swap of two
words, or random deletion of each word with probability 0.1. Random insertion
is not used. Every choice is drawn from stateless random ops seeded per
element, so the pipeline is deterministic for a given seed.
"""

from __future__ import annotations

import gzip
from importlib import resources

import tensorflow as tf

# Common English function words; synonym replacement leaves them alone.
STOP_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been
    before being below between both but by can could did do does doing down during
    each few for from further had has have having he her here hers herself him
    himself his how i if in into is it its itself just me more most my myself no nor
    not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these
    they this those through to too under until up very was we were what when where
    which while who whom why will with would you your yours yourself yourselves
    """.split()
)

SYNONYM_REPLACEMENT, RANDOM_SWAP, RANDOM_DELETION = 0, 1, 2


def load_synonyms() -> dict[str, list[str]]:
    """The shipped WordNet 3.0 synonym table: word -> synonyms."""
    path = resources.files("declip_keras") / "assets" / "wordnet_synonyms.tsv.gz"
    with gzip.open(path.open("rb"), "rt", encoding="utf-8") as handle:
        rows = (line.rstrip("\n").split("\t") for line in handle)
        return {word: synonyms.split("|") for word, synonyms in rows}


class EDA:
    """One random EDA operation per caption.

    Args:
        synonyms: word -> synonyms; the shipped WordNet table by default.
        deletion_rate: probability of deleting each word in random deletion.
        stop_words: words never replaced by a synonym.

    Call with a scalar string caption and a `[2]` int seed; returns the
    augmented caption (words joined by single spaces).

    Example:
    >>> eda = EDA()
    >>> eda(tf.constant("a photo of a dog"), tf.constant([0, 1]))
    <tf.Tensor: shape=(), dtype=string, numpy=b'a photograph of a dog'>
    """

    def __init__(
        self,
        synonyms: dict[str, list[str]] | None = None,
        deletion_rate: float = 0.1,
        stop_words: frozenset[str] = STOP_WORDS,
    ):
        synonyms = load_synonyms() if synonyms is None else synonyms
        keys = [w for w, s in synonyms.items() if s and w not in stop_words]
        values = ["|".join(synonyms[w]) for w in keys]
        self.deletion_rate = deletion_rate
        self.table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(keys, values), default_value=""
        )

    def __call__(self, caption, seed, operation=None):
        """Augments `caption`; `operation` forces one of the three (for tests)."""
        seeds = tf.random.experimental.stateless_split(seed, 4)
        words = tf.strings.split(caption)
        if operation is None:
            operation = tf.random.stateless_uniform([], seeds[0], 0, 3, tf.int32)
        words = tf.switch_case(
            operation,
            [
                lambda: self.synonym_replacement(words, seeds[1]),
                lambda: self.random_swap(words, seeds[2]),
                lambda: self.random_deletion(words, seeds[3]),
            ],
        )
        return tf.strings.reduce_join(words, separator=" ")

    def synonym_replacement(self, words, seed):
        """Replaces one word that has WordNet synonyms by one of them."""
        keys = tf.strings.regex_replace(tf.strings.lower(words), r"[^a-z'-]", "")
        synonyms = self.table.lookup(keys)
        candidates = tf.where(synonyms != "")[:, 0]
        count = tf.size(candidates)
        pick_seed, synonym_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed)
        )

        def replace():
            index = candidates[
                tf.random.stateless_uniform([], pick_seed, 0, count, tf.int32)
            ]
            options = tf.strings.split(synonyms[index], "|")
            choice = tf.random.stateless_uniform(
                [], synonym_seed, 0, tf.size(options), tf.int32
            )
            return tf.tensor_scatter_nd_update(words, [[index]], [options[choice]])

        return tf.cond(count > 0, replace, lambda: words)

    @staticmethod
    def random_swap(words, seed):
        """Swaps two different words (captions of one word stay as they are)."""
        count = tf.size(words)

        def swap():
            first_seed, offset_seed = tf.unstack(
                tf.random.experimental.stateless_split(seed)
            )
            i = tf.random.stateless_uniform([], first_seed, 0, count, tf.int32)
            offset = tf.random.stateless_uniform([], offset_seed, 1, count, tf.int32)
            j = (i + offset) % count
            return tf.tensor_scatter_nd_update(
                words, [[i], [j]], tf.stack([words[j], words[i]])
            )

        return tf.cond(count > 1, swap, lambda: words)

    def random_deletion(self, words, seed):
        """Drops each word with probability `deletion_rate`; keeps one if all go."""
        count = tf.size(words)
        keep_seed, rescue_seed = tf.unstack(
            tf.random.experimental.stateless_split(seed)
        )
        keep = tf.random.stateless_uniform([count], keep_seed) >= self.deletion_rate
        kept = tf.boolean_mask(words, keep)

        def one_word():
            index = tf.random.stateless_uniform([], rescue_seed, 0, count, tf.int32)
            return words[index : index + 1]

        return tf.cond(
            tf.logical_and(tf.size(kept) == 0, count > 0), one_word, lambda: kept
        )

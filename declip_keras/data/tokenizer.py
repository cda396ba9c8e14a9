"""CLIP's byte-level BPE tokenizer with DeCLIP's mask token and id layout.

The 49,408-token CLIP vocabulary is rebuilt from the merges file shipped in
`declip_keras/assets` (MIT, OpenAI), then `<|mask|>`, `<|startoftext|>` and
`<|endoftext|>` take ids 49406, 49407 and 49408: the end token has the largest
id, so the text tower pools at `argmax(token_ids)`. Captions are packed to the
context length as `start, tokens..., end` (truncation keeps both) and padded
with the end id: padding then never outranks the real end position, and the
MLM mask generator skips it by excluding the special ids only, so token 0
("!") stays maskable.
"""

from __future__ import annotations

import functools
import gzip
import json
from importlib import resources

import keras_hub
import tensorflow as tf

from declip_keras.data.batch_format import END_TOKEN_ID, MASK_TOKEN_ID

MASK_TOKEN = "<|mask|>"
START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"
# CLIP keeps the first 49152 - 256 - 2 merges of the file.
NUM_MERGES = 48894


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 bytes to printable characters."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


@functools.lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[str]]:
    """DeCLIP's vocabulary dict (49,409 entries) and CLIP's merge list."""
    path = resources.files("declip_keras") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(path.open("rb"), "rt", encoding="utf-8") as handle:
        merges = handle.read().split("\n")[1 : NUM_MERGES + 1]
    byte_chars = list(_bytes_to_unicode().values())
    tokens = byte_chars + [c + "</w>" for c in byte_chars]
    tokens += ["".join(merge.split(" ")) for merge in merges]
    tokens += [MASK_TOKEN, START_TOKEN, END_TOKEN]
    vocabulary = {token: index for index, token in enumerate(tokens)}
    assert vocabulary[MASK_TOKEN] == MASK_TOKEN_ID
    assert vocabulary[END_TOKEN] == END_TOKEN_ID
    return vocabulary, merges


class CaptionTokenizer:
    """Turns captions into fixed-length DeCLIP token ids, eagerly or in `tf.data`.

    Wraps keras-hub's `CLIPTokenizer` and `StartEndPacker`.

    Args:
        context_length: ids per caption, start and end included (CLIP: 77).
        vocabulary, merges: a BPE vocabulary other than CLIP's (for example from
            `declip-keras train-tokenizer`); it must hold the three special
            tokens with the end token at the largest id.

    Example:
    >>> tokenizer = CaptionTokenizer(context_length=8)
    >>> import numpy as np
    >>> np.asarray(tokenizer(["a photo of a cat"]))[0].tolist()
    [49407, 320, 1125, 539, 320, 2368, 49408, 49408]
    """

    def __init__(
        self,
        context_length: int = 77,
        vocabulary: dict[str, int] | None = None,
        merges: list[str] | None = None,
    ):
        if vocabulary is None:
            vocabulary, merges = clip_vocabulary()
        for token in (MASK_TOKEN, START_TOKEN, END_TOKEN):
            if token not in vocabulary:
                raise ValueError(f"The vocabulary has no {token} token.")
        if vocabulary[END_TOKEN] != max(vocabulary.values()):
            raise ValueError(f"{END_TOKEN} must have the largest id of the vocabulary.")
        self.context_length = context_length
        self.vocabulary_size = len(vocabulary)
        self.mask_token_id = vocabulary[MASK_TOKEN]
        self.start_token_id = vocabulary[START_TOKEN]
        self.end_token_id = vocabulary[END_TOKEN]
        self.tokenizer = keras_hub.tokenizers.CLIPTokenizer(
            vocabulary=vocabulary, merges=merges
        )
        self.packer = keras_hub.layers.StartEndPacker(
            sequence_length=context_length,
            start_value=self.start_token_id,
            end_value=self.end_token_id,
            pad_value=self.end_token_id,
            return_padding_mask=False,
        )
        # Traced once per tokenizer, then called as one graph function:
        # tracing keras-hub's BPE takes seconds and thousands of graph ops,
        # which every `tf.data` pipeline calling it would pay again.
        self._ids = tf.function(
            self._tokenize, input_signature=[tf.TensorSpec([None], tf.string)]
        )

    @property
    def special_token_ids(self) -> list[int]:
        return [self.mask_token_id, self.start_token_id, self.end_token_id]

    def __call__(self, captions):
        """Strings `[B]` (or a scalar string) -> int32 ids `[B, context_length]`."""
        captions = tf.convert_to_tensor(captions, tf.string)
        if captions.shape.rank == 0:
            return self._ids(captions[tf.newaxis])[0]
        return self._ids(captions)

    def _tokenize(self, captions):
        return self.packer(self.tokenizer(normalize_captions(captions)))


def normalize_captions(captions):
    """CLIP's text clean-up in TF ops, so eager and `tf.data` calls agree.

    keras-hub's `CLIPTokenizer` lower-cases and splits digits one by one when
    called eagerly but not inside a `tf.data` graph. Spacing out each digit
    changes nothing in CLIP's pre-tokenisation (every digit is a word of its
    own there) and makes the graph path split them too. ftfy's mojibake repair
    and HTML unescaping of the reference tokenizer are not reproduced.
    """
    captions = tf.strings.lower(captions, encoding="utf-8")
    captions = tf.strings.regex_replace(captions, r"(\pN)", r" \1 ")
    captions = tf.strings.regex_replace(captions, r"\s+", " ")
    return tf.strings.strip(captions)


def train_bpe(
    captions: list[str], vocabulary_size: int = 8192
) -> tuple[dict[str, int], list[str]]:
    """Trains a CLIP-style byte-level BPE vocabulary on `captions`.

    The result has CLIP's layout (the 256 byte symbols, each also with the
    end-of-word suffix `</w>`, then the merged symbols) and DeCLIP's special
    tokens at the three largest ids, so `CaptionTokenizer(vocabulary=...,
    merges=...)` uses it as it uses CLIP's. Captions are normalised as at
    tokenization time.

    Args:
        captions: training text.
        vocabulary_size: total size, special tokens included.

    Returns:
        `(vocabulary, merges)`, merges as `"a b"` strings in rank order.
    """
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    byte_chars = list(_bytes_to_unicode().values())
    # The 256 byte symbols, each also with `</w>`, and the 3 special tokens.
    smallest = 2 * len(byte_chars) + 3 + 1
    if vocabulary_size < smallest:
        raise ValueError(
            f"vocabulary_size must be at least {smallest} (CLIP's byte symbols, "
            f"special tokens and one merge), got {vocabulary_size}."
        )
    tokenizer = tokenizers.Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                tokenizers.Regex(
                    r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    normalized = [c.decode("utf-8") for c in normalize_captions(captions).numpy()]

    def train(size: int) -> tuple[list[str], list[str]]:
        trainer = trainers.BpeTrainer(
            vocab_size=size,
            initial_alphabet=byte_chars,
            end_of_word_suffix="</w>",
            show_progress=False,
        )
        tokenizer.train_from_iterator(normalized, trainer)
        state = json.loads(tokenizer.to_str())["model"]
        merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
        tokens = byte_chars + [c + "</w>" for c in byte_chars]
        tokens += [a + b for a, b in (m.split(" ") for m in merges)]
        # A merge can rebuild a byte symbol; keep each token once.
        return list(dict.fromkeys(tokens)), merges

    # The trainer counts some `</w>` byte symbols and not others: size it
    # once, then again with the shortfall added.
    target = vocabulary_size - 3
    tokens, merges = train(target - 256)
    if len(tokens) < target:
        tokens, merges = train(target - 256 + target - len(tokens))
    tokens += [MASK_TOKEN, START_TOKEN, END_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def save_vocabulary(folder: str, vocabulary: dict[str, int], merges: list[str]) -> None:
    """Writes `vocab.json` and `merges.txt` (CLIP's file layouts) to `folder`."""
    tf.io.gfile.makedirs(folder)
    with tf.io.gfile.GFile(f"{folder}/vocab.json", "w") as handle:
        json.dump(vocabulary, handle, ensure_ascii=False)
    with tf.io.gfile.GFile(f"{folder}/merges.txt", "w") as handle:
        handle.write("#version: declip-keras\n" + "\n".join(merges) + "\n")


def check_vocabulary(folder: str) -> None:
    """Raises FileNotFoundError, naming what is missing, unless `folder`
    holds what `save_vocabulary` writes."""
    missing = [f"{folder}/{name}" for name in ("vocab.json", "merges.txt")
               if not tf.io.gfile.exists(f"{folder}/{name}")]  # fmt: skip
    if missing:
        raise FileNotFoundError(
            f"No tokenizer in {folder} (no {', '.join(missing)}): give a folder "
            "written by `declip-keras train-tokenizer`."
        )


def load_vocabulary(folder: str) -> tuple[dict[str, int], list[str]]:
    """Reads what `save_vocabulary` wrote."""
    check_vocabulary(folder)
    with tf.io.gfile.GFile(f"{folder}/vocab.json") as handle:
        vocabulary = json.load(handle)
    with tf.io.gfile.GFile(f"{folder}/merges.txt") as handle:
        merges = [line for line in handle.read().split("\n")[1:] if line]
    return vocabulary, merges


@functools.lru_cache(maxsize=4)
def clip_tokenizer(context_length: int = 77) -> CaptionTokenizer:
    """CLIP's tokenizer at `context_length`, one per process: building
    keras-hub's BPE and tracing it take seconds, and every pipeline,
    evaluation and export of a process can share it."""
    return CaptionTokenizer(context_length)


def load_tokenizer(context_length: int, folder: str | None = None) -> CaptionTokenizer:
    """CLIP's tokenizer, or the one `save_vocabulary` wrote to `folder`."""
    if folder is None:
        return clip_tokenizer(context_length)
    return CaptionTokenizer(context_length, *load_vocabulary(folder))

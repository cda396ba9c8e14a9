from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from declip_keras.cli import main
from declip_keras.data.builtin import DIGIT_NAMES, make_demo_data
from declip_keras.data.records import iterate_examples
from declip_keras.data.tokenizer import CaptionTokenizer, load_vocabulary

pytestmark = pytest.mark.backend_independent


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    return root, make_demo_data(root, emoji_views=1, num_shards=2, eval_digits=200)


def test_splits_and_counts(demo):
    root, manifest = demo
    train = [
        r
        for s in sorted((root / "train").glob("*.tfrecord"))
        for r in iterate_examples(str(s))
    ]
    digits = list(iterate_examples(str(root / "eval" / "digits.tfrecord")))
    emoji = list(iterate_examples(str(root / "eval" / "emoji.tfrecord")))
    assert len(train) == manifest["train_pairs"] == 4800 + manifest["eval_emoji"]
    assert len(digits) == 200 and manifest["eval_emoji"] > 1000
    # Held-out digits are never trained on.
    train_keys = {r["key"] for r in train}
    assert not train_keys & {r["key"] for r in digits}
    assert {r["label"] for r in digits} == set(range(10))
    for record in digits[:20]:
        assert DIGIT_NAMES[record["label"]] in record["txt"].decode()
    assert len({r["txt"] for r in emoji}) == len(emoji)  # one name per emoji
    image = Image.open(io.BytesIO(emoji[0]["png"]))
    assert image.size == (64, 64) and np.asarray(image).std() > 10
    assert (
        json.loads((root / "eval" / "digits_classnames.json").read_text())[7] == "seven"
    )


def test_train_tokenizer_command(demo, tmp_path):
    root, _ = demo
    out = tmp_path / "vocab"
    pattern = str(root / "train" / "*.tfrecord")
    assert (
        main(["train-tokenizer", pattern, str(out), "--vocabulary-size", "1000"]) == 0
    )
    vocabulary, merges = load_vocabulary(str(out))
    assert abs(len(vocabulary) - 1000) <= 10
    assert vocabulary["<|endoftext|>"] == max(vocabulary.values())
    tokenizer = CaptionTokenizer(context_length=8, vocabulary=vocabulary, merges=merges)
    ids = np.asarray(tokenizer(["a handwritten digit seven"]))[0]
    inverse = {i: t for t, i in vocabulary.items()}
    # Frequent caption words become single tokens.
    assert [inverse[i] for i in ids[1:5]] == [
        "a</w>",
        "handwritten</w>",
        "digit</w>",
        "seven</w>",
    ]


def test_a_missing_demo_package_names_the_extra(tmp_path, monkeypatch, capsys):
    from declip_keras.data import builtin as demo_data

    packages = {**demo_data.DEMO_PACKAGES, "not_a_module_here": "mlxtend"}
    monkeypatch.setattr(demo_data, "DEMO_PACKAGES", packages)
    assert main(["make-demo-data", str(tmp_path / "demo")]) == 2
    error = capsys.readouterr().err
    assert "mlxtend" in error and "declip-keras[demo]" in error
    assert error.count("\n") == 1 and not (tmp_path / "demo").exists()


def test_named_digit_captions_name_the_digit_and_nothing_a_view_changes():
    from declip_keras.data.builtin import INK, PAPER, _digit_pair

    rng = np.random.default_rng(0)
    digit = (np.random.default_rng(1).random((28, 28)) * 255).astype(np.uint8)
    changed_by_views = {*INK, *PAPER, "small", "large", "left", "right", "centre"}
    inks = set()
    for _ in range(50):
        png, caption = _digit_pair(digit, 7, "named", rng)
        words = set(caption.lower().replace(",", " ").replace(".", " ").split())
        assert {"seven", "7", "(seven)"} & words, caption
        assert not changed_by_views & words, caption
        pixels = np.asarray(Image.open(io.BytesIO(png)))
        inks.add(tuple(pixels.reshape(-1, 3).max(axis=0)))
    # The pictures still vary in colour (drawn as the grounded ones are).
    assert len(inks) > 1


def test_emoji_benchmark_data_holds_out_unseen_emoji(tmp_path):
    from declip_keras.data.builtin import make_emoji_benchmark_data

    manifest = make_emoji_benchmark_data(tmp_path, held_out=50, renderings=1)
    train = list(iterate_examples(str(tmp_path / "train.tfrecord")))
    unseen = list(iterate_examples(str(tmp_path / "eval" / "emoji.tfrecord")))
    assert len(train) == manifest["train_pairs"] and len(unseen) == 50
    assert not {r["label"] for r in train} & {r["label"] for r in unseen}
    names = [r["txt"].decode() for r in unseen]
    assert len(set(names)) == 50
    # No caption that a mirror would make false.
    for caption in names + [r["txt"].decode().lower() for r in train]:
        assert not {"left", "right"} & set(caption.replace("-", " ").split())
    assert manifest["left_out_mirrored"] > 0

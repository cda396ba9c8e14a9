from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from declip_keras.cli import main
from declip_keras.demo_data import DIGIT_NAMES, make_demo_data
from declip_keras.records import iterate_examples
from declip_keras.tokenizer import CaptionTokenizer, load_vocabulary

pytestmark = pytest.mark.one_backend(
    "tensorflow", reason="backend-independent; run once"
)


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
    from declip_keras import demo_data

    packages = {**demo_data.DEMO_PACKAGES, "not_a_module_here": "mlxtend"}
    monkeypatch.setattr(demo_data, "DEMO_PACKAGES", packages)
    assert main(["make-demo-data", str(tmp_path / "demo")]) == 2
    error = capsys.readouterr().err
    assert "mlxtend" in error and "declip-keras[demo]" in error
    assert error.count("\n") == 1 and not (tmp_path / "demo").exists()

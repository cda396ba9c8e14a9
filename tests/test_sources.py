"""Evaluation inputs: ImageFolder, Karpathy JSON, image files, class names.

The end-to-end checks use a stand-in model whose embeddings are known (an
image's dominant colour; a caption's colour word), so zero-shot accuracy and
recalls through the real readers and pipelines must come out exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import COLOURS
from PIL import Image

from declip_keras.data.augment import eval_view
from declip_keras.data.checks import SkipCounter
from declip_keras.data.pipeline import image_files_dataset
from declip_keras.data.tokenizer import CaptionTokenizer
from declip_keras.evaluation import metrics as evaluation
from declip_keras.evaluation import sources as eval_sources

pytestmark = pytest.mark.backend_independent
CONTEXT = 8


class ColourModel:
    """Image -> one-hot of its brightest channel; caption -> its colour word."""

    image_encoder = SimpleNamespace(image_size=16)
    text_encoder = SimpleNamespace(context_length=CONTEXT)

    def __init__(self):
        ids = np.asarray(CaptionTokenizer(CONTEXT)(list(COLOURS)))[:, 1]
        self.word_ids = ids

    def encode_image(self, images):
        channel = np.asarray(images).mean(axis=(1, 2)).argmax(-1)
        return np.eye(3, dtype=np.float32)[channel]

    def encode_text(self, token_ids):
        hits = np.asarray(token_ids)[:, :, None] == self.word_ids[None, None, :]
        return hits.any(axis=1).astype(np.float32)


def _save(path: Path, colour: str, size=(30, 20)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, COLOURS[colour]).save(path)


@pytest.fixture
def image_folder(tmp_path) -> Path:
    root = tmp_path / "folder"
    for colour in COLOURS:
        for index in range(3):
            _save(root / colour / f"{index}.png", colour)
    (root / "red" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def karpathy(tmp_path) -> Path:
    images = []
    for index, colour in enumerate(["blue", "red", "green", "red", "blue"]):
        _save(tmp_path / "imgs" / "val" / f"{index}.jpg", colour)
        images.append(
            {
                "filepath": "val",
                "filename": f"{index}.jpg",
                "split": "test" if index < 3 else "train",
                "sentences": [{"raw": f"a {colour} square"}, {"raw": f"{colour}!"}],
            }
        )
    path = tmp_path / "dataset.json"
    path.write_text(json.dumps({"images": images, "dataset": "toy"}))
    return path


def test_read_image_folder(image_folder, tmp_path):
    paths, labels, folders = eval_sources.read_image_folder(image_folder)
    assert folders == ["blue", "green", "red"]
    assert labels == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(
        Path(p).parent.name == folders[y] for p, y in zip(paths, labels, strict=True)
    )
    with pytest.raises(FileNotFoundError, match="empty"):
        eval_sources.read_image_folder(tmp_path / "empty")


def test_read_karpathy_keeps_the_split_and_owners(karpathy, tmp_path):
    paths, captions, owners = eval_sources.read_karpathy(
        karpathy, tmp_path / "imgs", "test"
    )
    assert [Path(p).name for p in paths] == ["0.jpg", "1.jpg", "2.jpg"]
    assert captions[:2] == ["a blue square", "blue!"] and owners == [0, 0, 1, 1, 2, 2]
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"images": [{"split": "test", "sentences": []}]}))
    with pytest.raises(ValueError, match=r"images\[0\] lacks field 'filename'"):
        eval_sources.read_karpathy(broken)


def test_image_files_dataset_matches_eval_view_and_skips_bad_files(tmp_path):
    _save(tmp_path / "a.png", "red", size=(40, 25))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG not really")
    _save(tmp_path / "b.png", "blue")
    counter = SkipCounter()
    paths = [str(tmp_path / n) for n in ("a.png", "bad.png", "b.png")]
    batches = list(image_files_dataset(paths, 2, 16, [0, 1, 2], counter=counter))
    keys = [k.decode() for b in batches for k in b["key"].numpy()]
    assert keys == [paths[0], paths[2]]
    assert [int(y) for b in batches for y in b["label"].numpy()] == [0, 2]
    expected = eval_view(np.asarray(Image.open(paths[0])), 16).numpy()
    np.testing.assert_allclose(batches[0]["images"][0].numpy(), expected, atol=1e-6)
    assert counter.counts()["decode_error"] == 1


def test_shipped_classnames_and_templates():
    sizes = {
        "imagenet1k": 1000, "cifar10": 10, "cifar100": 100, "food101": 101,
        "pets": 37, "flowers": 102, "caltech101": 102, "sun397": 397,
        "cars": 196, "dtd": 47, "aircraft": 100,
    }  # fmt: skip
    assert {d: len(eval_sources.dataset_classnames(d)) for d in sizes} == sizes
    assert eval_sources.dataset_classnames("imagenet1k")[:2] == ["tench", "goldfish"]
    for dataset in sizes:
        templates = eval_sources.dataset_templates(dataset)
        assert templates and all("{}" in t for t in templates)
        assert templates[0].format("x") != templates[0]
    with pytest.raises(KeyError, match="known: imagenet1k"):
        eval_sources.dataset_classnames("imagenet-21k")


def test_resolve_templates():
    assert len(evaluation.resolve_templates("imagenet")) == 80
    assert evaluation.resolve_templates("a {}.|the {}") == ("a {}.", "the {}")
    with pytest.raises(ValueError, match="class name"):
        evaluation.resolve_templates("no placeholder")


def test_zero_shot_on_image_folder_is_exact_with_a_known_model(image_folder):
    results = evaluation.evaluate(
        ColourModel(), zero_shot=str(image_folder), templates=("a {} square",)
    )["zero_shot"]
    assert results["images"] == 9 and results["classes"] == 3
    assert results["top1"] == 1.0


def test_retrieval_on_karpathy_json_is_exact_with_a_known_model(karpathy, tmp_path):
    results = evaluation.evaluate(
        ColourModel(), retrieval=str(karpathy), image_root=str(tmp_path / "imgs")
    )["retrieval"]
    assert results["images"] == 3 and results["captions"] == 6
    # Each test image has a different colour: every first hit is right.
    assert results["image_to_text_R@1"] == results["text_to_image_R@1"] == 1.0


def test_eval_command_runs_probe_and_zero_shot_on_folders(image_folder, tmp_path):
    from helpers import small_model

    from declip_keras.cli import main

    small_model(vocabulary_size=49409).save(tmp_path / "m.keras")
    out = tmp_path / "results.json"
    argv = ["eval", str(tmp_path / "m.keras"), "--zero-shot", str(image_folder),
            "--templates", "cifar10", "--probe", str(image_folder), str(image_folder),
            "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    results = json.loads(out.read_text())
    assert results["zero_shot"]["classes"] == 3
    assert 0.0 <= results["linear_probe"]["test_accuracy"] <= 1.0

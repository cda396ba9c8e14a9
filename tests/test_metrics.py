from __future__ import annotations

import numpy as np
import pytest

from declip_keras.evaluation import metrics as evaluation


def unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_zero_shot_is_perfect_on_built_features_and_at_chance_when_shuffled():
    rng = np.random.default_rng(0)
    classes = unit(rng.standard_normal((10, 32)))
    labels = rng.integers(0, 10, 2000)
    images = unit(classes[labels] + 0.1 * rng.standard_normal((2000, 32)))
    result = evaluation.zero_shot_accuracy(images, classes, labels)
    assert result == {"top1": 1.0, "top5": 1.0, "mean_per_class_recall": 1.0}
    shuffled = evaluation.zero_shot_accuracy(images, classes, rng.permutation(labels))
    assert abs(shuffled["top1"] - 0.1) < 0.03 and abs(shuffled["top5"] - 0.5) < 0.05


def test_retrieval_recalls_are_exact_for_known_ranks():
    # Three images on axes; captions 0,1 describe image 0, caption 2 image 1,
    # caption 3 image 2 -- but caption 3 is placed closest to image 0.
    images = np.eye(3)
    texts = unit(np.array([[1, 0.1, 0], [1, 0, 0.2], [0, 1, 0], [0.9, 0, 0.5]]))
    owner = np.array([0, 0, 1, 2])
    result = evaluation.retrieval_recall(images, texts, owner, ks=(1, 2))
    # image->text: image 0 top1 caption 1 or 0 (hit); image 1 -> caption 2 (hit);
    # image 2 -> caption 3 (hit: highest z).
    assert result["image_to_text_R@1"] == 1.0
    # text->image: caption 3's nearest image is 0 (miss at 1, hit at 2).
    assert result["text_to_image_R@1"] == 0.75
    assert result["text_to_image_R@2"] == 1.0


def test_linear_probe_separates_separable_features():
    rng = np.random.default_rng(1)
    centres = rng.standard_normal((4, 16)) * 3

    def split(n):
        labels = rng.integers(0, 4, n)
        return centres[labels] + rng.standard_normal((n, 16)), labels

    result = evaluation.linear_probe(
        split(200), split(100), split(200), strengths=[1e-3, 1, 1e3]
    )
    assert result["test_accuracy"] > 0.97
    assert result["l2_strength"] in (1e-3, 1.0)
    noise = evaluation.linear_probe(
        (rng.standard_normal((200, 16)), rng.integers(0, 4, 200)),
        (rng.standard_normal((100, 16)), rng.integers(0, 4, 100)),
        (rng.standard_normal((400, 16)), rng.integers(0, 4, 400)),
        strengths=[1.0],
    )
    assert noise["test_accuracy"] < 0.4


def test_there_are_eighty_imagenet_templates():
    templates = evaluation.resolve_templates("imagenet1k")
    assert len(templates) == len(set(templates)) == 80
    assert all(t.count("{}") == 1 for t in templates)
    assert evaluation.resolve_templates("imagenet") == templates


@pytest.mark.parametrize("templates", [("{}",), ("a photo of a {}.", "{}")])
def test_class_embeddings_average_normalised_prompts(templates):
    from helpers import small_model, to_numpy

    from declip_keras.data.tokenizer import CaptionTokenizer

    model = small_model(vocabulary_size=49409)
    tokenizer = CaptionTokenizer(context_length=16)
    classes = evaluation.embed_classes(model, tokenizer, ["cat", "dog"], templates)
    prompts = [t.format(c) for c in ["cat", "dog"] for t in templates]
    each = to_numpy(model.encode_text(np.asarray(tokenizer(prompts))))
    expected = unit(each.reshape(2, len(templates), -1).mean(axis=1))
    np.testing.assert_allclose(classes, expected, rtol=1e-4, atol=1e-6)


def test_eval_command_writes_results(shape_shards, tmp_path, capsys):
    import json
    from pathlib import Path

    from helpers import small_model

    from declip_keras.cli import main

    model = small_model(vocabulary_size=49409)
    model.save(tmp_path / "m.keras")
    out = tmp_path / "results.json"
    assert (
        main(
            [
                "eval",
                str(tmp_path / "m.keras"),
                "--retrieval",
                shape_shards,
                "--output",
                str(out),
            ]
        )
        == 0
    )
    results = json.loads(out.read_text())["retrieval"]
    assert results["images"] == results["captions"] == 48
    assert 0.0 <= results["text_to_image_R@1"] <= results["text_to_image_R@10"] <= 1.0
    # The same figures in a CLIP_benchmark result file.
    template = str(tmp_path / "bench" / "{dataset}_{task}.json")
    args = ["eval", str(tmp_path / "m.keras"), "--retrieval", shape_shards]
    assert main([*args, "--clip-benchmark-output", template]) == 0
    (written,) = (tmp_path / "bench").iterdir()
    record = json.loads(written.read_text())
    dataset = Path(shape_shards).parent.name  # the shards' folder
    assert written.name == f"{dataset}_zeroshot_retrieval.json"
    assert record["task"] == "zeroshot_retrieval" and record["dataset"] == dataset
    assert record["model"] == str(tmp_path / "m.keras")
    metrics = record["metrics"]
    for k in (1, 5, 10):
        assert metrics[f"image_retrieval_recall@{k}"] == results[f"text_to_image_R@{k}"]
        assert metrics[f"text_retrieval_recall@{k}"] == results[f"image_to_text_R@{k}"]
    assert main([*args, "--clip-benchmark-output", "{datset}.json"]) == 2
    assert "the placeholders are" in capsys.readouterr().err
    unlabelled = ["eval", str(tmp_path / "m.keras"), "--zero-shot", shape_shards]
    assert main([*unlabelled, "--classnames", "red,green,blue"]) == 2
    assert "need an int64 `label`" in capsys.readouterr().err
    # `evaluate` itself, without the command's checks, wants a name per label.
    import io

    import tensorflow as tf
    from PIL import Image

    from declip_keras.data.records import encode_example

    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    labelled = str(tmp_path / "labelled.tfrecord")
    with tf.io.TFRecordWriter(labelled) as writer:
        for label in (0, 2):
            writer.write(encode_example(str(label), png.getvalue(), "png", "a",
                                        label=label))  # fmt: skip
    with pytest.raises(ValueError, match="need 3 class names, --classnames gives 2"):
        evaluation.evaluate(model, zero_shot=labelled, classnames="red,green")


def test_mean_per_class_recall_is_balanced_accuracy():
    from sklearn.metrics import balanced_accuracy_score

    rng = np.random.default_rng(3)
    classes = unit(rng.standard_normal((5, 16)))
    labels = rng.choice(5, 600, p=[0.5, 0.2, 0.1, 0.1, 0.1])
    images = unit(classes[labels] + 0.9 * rng.standard_normal((600, 16)))
    result = evaluation.zero_shot_accuracy(images, classes, labels)
    predicted = np.argmax(images @ classes.T, axis=1)
    expected = balanced_accuracy_score(labels, predicted)
    assert result["mean_per_class_recall"] == pytest.approx(expected)
    assert result["top1"] != pytest.approx(expected)  # imbalanced: they differ


def test_templates_default_to_the_named_datasets_own():
    from declip_keras.evaluation.sources import dataset_templates

    cifar = evaluation.resolve_templates(None, "cifar10")
    assert cifar == dataset_templates("cifar10") and len(cifar) > 3
    assert evaluation.resolve_templates(None, "cat,dog") == evaluation.SIMPLE_TEMPLATES
    assert evaluation.resolve_templates(None) == evaluation.SIMPLE_TEMPLATES


def test_clip_benchmark_records_use_its_keys():
    results = {
        "zero_shot": {"top1": 0.5, "top5": 0.9, "mean_per_class_recall": 0.4},
        "linear_probe": {"test_accuracy": 0.7, "l2_strength": 1.0},
    }
    names = {"zero_shot": "cifar10", "linear_probe": "cifar10"}
    zero_shot, probe = evaluation.clip_benchmark_records(results, "m.keras", names)
    assert zero_shot == {
        "dataset": "cifar10",
        "model": "m.keras",
        "pretrained": "m.keras",
        "task": "zeroshot_classification",
        "language": "en",
        "metrics": {"acc1": 0.5, "acc5": 0.9, "mean_per_class_recall": 0.4},
    }
    assert probe["task"] == "linear_probe" and probe["metrics"] == {"acc1": 0.7}

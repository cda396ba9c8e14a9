"""Evaluation: zero-shot classification, image-text retrieval, linear probe.

The metrics are plain numpy on L2-normalised embeddings, so they apply to any
model; `embed_images`, `embed_classes` and `embed_captions` produce those
embeddings from a `DeCLIP` model and an evaluation dataset.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from keras import ops
from tqdm import tqdm

from declip_keras.data.batch_format import TOKEN_IDS
from declip_keras.data.pipeline import eval_dataset, image_files_dataset, trim_captions
from declip_keras.data.records import list_shards, read_labels
from declip_keras.data.tokenizer import CaptionTokenizer, clip_tokenizer
from declip_keras.evaluation.metric_names import EVAL_METRICS, eval_metric_name
from declip_keras.evaluation.sources import (
    EvaluationTargets,
    dataset_classnames,
    dataset_names,
    dataset_templates,
    read_image_folder,
    read_karpathy,
)

SIMPLE_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "{}")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embed_images(model, dataset: Iterable[dict]) -> dict[str, np.ndarray]:
    """Unit image embeddings, labels, keys and (from TFRecords) captions.

    `dataset` is an `eval_dataset` or an `image_files_dataset`.
    """
    images, labels, keys, captions = [], [], [], []
    for batch in tqdm(dataset, desc="images", unit="batch"):
        embeddings = model.encode_image(batch["images"])
        images.append(ops.convert_to_numpy(embeddings).astype(np.float32))
        labels.append(np.asarray(batch["label"]))
        keys += [k.decode("utf-8") for k in np.asarray(batch["key"])]
        if "txt" in batch:
            captions += [c.decode("utf-8") for c in np.asarray(batch["txt"])]
    if not images:
        raise ValueError("No readable image to evaluate.")
    return {
        "embeddings": np.concatenate(images),
        "labels": np.concatenate(labels),
        "keys": np.asarray(keys, dtype=object),
        "captions": np.asarray(captions, dtype=object),
    }


def embed_captions(
    model, tokenizer: CaptionTokenizer, captions: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Unit text embeddings of `captions`, batched."""
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(list(captions[start : start + batch_size]))
        ids = trim_captions({TOKEN_IDS: ids}, tokenizer.context_length)[TOKEN_IDS]
        embeddings = model.encode_text(np.asarray(ids))
        out.append(ops.convert_to_numpy(embeddings).astype(np.float32))
    return np.concatenate(out)


def embed_classes(
    model,
    tokenizer: CaptionTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = SIMPLE_TEMPLATES,
) -> np.ndarray:
    """`[C, D]`: per class the mean of its unit prompt embeddings, renormalised."""
    prompts = [template.format(name) for name in classnames for template in templates]
    embeddings = embed_captions(model, tokenizer, prompts)
    per_class = embeddings.reshape(len(classnames), len(templates), -1).mean(axis=1)
    return _normalize(per_class)


def zero_shot_accuracy(
    image_embeddings: np.ndarray,
    class_embeddings: np.ndarray,
    labels: np.ndarray,
    topk: Sequence[int] = (1, 5),
) -> dict[str, float]:
    """Top-k accuracy of classifying each image by its most similar class."""
    labels = np.asarray(labels)
    scores = image_embeddings @ class_embeddings.T
    ranking = np.argsort(-scores, axis=1)
    hits = ranking == labels[:, None]
    results = {
        f"top{k}": float(hits[:, :k].any(axis=1).mean())
        for k in topk
        if k <= class_embeddings.shape[0]
    }
    # CLIP_benchmark's balanced accuracy: top-1 recall of each present class.
    correct = ranking[:, 0] == labels
    results["mean_per_class_recall"] = float(
        np.mean([correct[labels == c].mean() for c in np.unique(labels)])
    )
    return results


def retrieval_recall(
    image_embeddings: np.ndarray,
    text_embeddings: np.ndarray,
    caption_image: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@k both ways, with any number of captions per image.

    Args:
        image_embeddings: `[N, D]`.
        text_embeddings: `[M, D]`.
        caption_image: `[M]`, the image index each caption describes.

    Image->text counts a hit when any of the image's captions is in the top k;
    text->image when the caption's image is.
    """
    caption_image = np.asarray(caption_image)
    scores = image_embeddings @ text_embeddings.T
    results = {}
    text_rank = np.argsort(-scores, axis=1)
    owns = caption_image[text_rank] == np.arange(len(image_embeddings))[:, None]
    image_rank = np.argsort(-scores.T, axis=1)
    found = image_rank == caption_image[:, None]
    for k in ks:
        results[f"image_to_text_R@{k}"] = float(owns[:, :k].any(axis=1).mean())
        results[f"text_to_image_R@{k}"] = float(found[:, :k].any(axis=1).mean())
    return results


def linear_probe(
    train: tuple[np.ndarray, np.ndarray],
    validation: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    strengths: Sequence[float] | None = None,
    max_iter: int = 1000,
) -> dict[str, float]:
    """CLIP's linear probe: L2-regularised logistic regression on frozen features.

    The L2 strength is swept over `strengths` (CLIP: 96 log-spaced values in
    1e-6..1e6) on the validation split; the best is refitted on train +
    validation and scored on test.
    """
    from sklearn.linear_model import LogisticRegression

    strengths = np.logspace(-6, 6, 96) if strengths is None else strengths
    best, best_accuracy = None, -1.0
    for strength in strengths:
        classifier = LogisticRegression(C=1.0 / strength, max_iter=max_iter)
        classifier.fit(*train)
        accuracy = classifier.score(*validation)
        if accuracy > best_accuracy:
            best, best_accuracy = strength, accuracy
    classifier = LogisticRegression(C=1.0 / best, max_iter=max_iter)
    classifier.fit(
        np.concatenate([train[0], validation[0]]),
        np.concatenate([train[1], validation[1]]),
    )
    return {
        "l2_strength": float(best),
        "validation_accuracy": float(best_accuracy),
        "test_accuracy": float(classifier.score(*test)),
    }


def resolve_classnames(
    value: str | None, folder_names: Sequence[str] = ()
) -> list[str]:
    """Class names from a known dataset name (`imagenet1k`, `cifar10`, ...), a
    JSON file holding a list, or a comma-separated list; default: an
    ImageFolder's folder names, tidied."""
    if not value:
        if not folder_names:
            raise ValueError("zero-shot evaluation needs class names (--classnames).")
        return [name.replace("_", " ") for name in folder_names]
    if value in dataset_names():
        return dataset_classnames(value)
    if Path(value).is_file():
        try:
            loaded = json.loads(Path(value).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{value} is not JSON ({error}).") from None
        if not isinstance(loaded, list) or not loaded:
            raise ValueError(f"{value} must hold a JSON list of class names.")
        return [str(name) for name in loaded]
    if value.endswith(".json"):
        raise FileNotFoundError(f"No class-name file at {value}.")
    names = [name.strip() for name in value.split(",") if name.strip()]
    if len(names) < 2:  # a misspelt file name, most likely
        raise ValueError(
            f"--classnames {value!r} is no file, no dataset name and not a "
            "comma-separated list of two or more names."
        )
    return names


def _check_names_cover(source: str, classes: int, names: list[str]) -> None:
    """One class name per label of `source` (`classes`: its largest label + 1
    or its folders), or an image of a later label could never be right."""
    if classes > len(names):
        raise ValueError(
            f"{source}: its labels need {classes} class names, "
            f"--classnames gives {len(names)}."
        )


def resolve_templates(
    value: str | None, classnames: str | None = None
) -> tuple[str, ...]:
    """`simple`, a dataset name (`imagenet1k`: CLIP's 80; `imagenet` too), or
    `'a {}.|b {}.'`. Default (None): the dataset's own CLIP templates when
    `classnames` names a known dataset, else `simple`."""
    if value is None:
        value = classnames if classnames in dataset_names() else "simple"
    if value == "simple":
        return SIMPLE_TEMPLATES
    if value == "imagenet":
        value = "imagenet1k"
    if value in dataset_names():
        return dataset_templates(value)
    templates = tuple(t for t in value.split("|") if t)
    if not templates or not all("{}" in t for t in templates):
        raise ValueError(f"Templates need a {{}} for the class name: {value!r}")
    return templates


def target_arguments(targets: EvaluationTargets) -> dict:
    """`evaluate`'s arguments for `targets`, their templates resolved."""
    templates = resolve_templates(targets.templates, targets.classnames)
    return {**dataclasses.asdict(targets), "templates": templates}


def _labelled_images(
    model, source: str, batch_size: int, tokenizer: CaptionTokenizer
) -> tuple[dict, list[str]]:
    """Embeddings of an ImageFolder directory or labelled TFRecord shards."""
    size = model.image_encoder.image_size
    if Path(source).is_dir():
        paths, labels, folders = read_image_folder(source)
        data = image_files_dataset(paths, batch_size, size, labels)
    else:
        context = model.text_encoder.context_length
        data = eval_dataset(source, batch_size, size, context, tokenizer=tokenizer)
        folders = []
    images = embed_images(model, data)
    if np.any(images["labels"] < 0):
        raise _unlabelled(source)
    return images, folders


def _unlabelled(source: str) -> ValueError:
    return ValueError(f"{source}: records need an int64 `label` here.")


def _retrieval(
    model, tokenizer: CaptionTokenizer, source: str, batch_size: int, image_root, split
) -> dict:
    """Recalls on Karpathy JSON, or on TFRecords where records sharing a key
    are one image with several captions."""
    size = model.image_encoder.image_size
    if source.endswith(".json"):
        paths, captions, owners = read_karpathy(source, image_root, split)
        images = embed_images(model, image_files_dataset(paths, batch_size, size))
        # An unreadable image was skipped: drop its captions too.
        row_of = {key: row for row, key in enumerate(images["keys"])}
        kept = [j for j, owner in enumerate(owners) if paths[owner] in row_of]
        captions = [captions[j] for j in kept]
        owner = np.array([row_of[paths[owners[j]]] for j in kept])
        image_embeddings = images["embeddings"]
    else:
        context = model.text_encoder.context_length
        data = eval_dataset(source, batch_size, size, context, tokenizer=tokenizer)
        images = embed_images(model, data)
        keys, captions = list(images["keys"]), list(images["captions"])
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        image_rows = sorted(set(first.values()))
        index_of = {keys[row]: n for n, row in enumerate(image_rows)}
        image_embeddings = images["embeddings"][image_rows]
        owner = np.array([index_of[key] for key in keys])
    text_embeddings = embed_captions(model, tokenizer, captions)
    return {
        **retrieval_recall(image_embeddings, text_embeddings, owner),
        "images": len(image_embeddings),
        "captions": len(captions),
    }


def _split_validation(features, labels, fraction: float = 0.2, seed: int = 0):
    """A random `fraction` of the training split held out for the L2 sweep."""
    order = np.random.default_rng(seed).permutation(len(labels))
    cut = int(len(labels) * (1 - fraction))
    train, held = order[:cut], order[cut:]
    return (features[train], labels[train]), (features[held], labels[held])


def evaluate(
    model,
    zero_shot: str | None = None,
    classnames: str | None = None,
    templates: Sequence[str] | None = None,
    retrieval: str | None = None,
    batch_size: int = 128,
    image_root: str | None = None,
    split: str = "test",
    probe: tuple[str, str] | None = None,
    tokenizer: CaptionTokenizer | None = None,
) -> dict[str, dict[str, float]]:
    """Runs the requested evaluations of `model`; returns their metrics.

    Args:
        zero_shot: labelled TFRecord shards or an ImageFolder directory.
        classnames: see `resolve_classnames` (ImageFolder default: folders).
        templates: prompt templates, `{}` marking the class name; default:
            the dataset's own when `classnames` names one, else
            `SIMPLE_TEMPLATES` (see `resolve_templates`).
        retrieval: TFRecord shards (shared key = same image) or a Karpathy
            JSON (`image_root`, `split` locate its images).
        probe: (train, test) sources as for `zero_shot`, for the linear probe;
            20% of train is held out to choose the L2 strength.
        tokenizer: the model's tokenizer (default: CLIP's BPE).
    """
    results = {}
    # Built once: keras-hub's BPE tokenizer takes seconds to set up.
    tokenizer = tokenizer or clip_tokenizer(model.text_encoder.context_length)
    if zero_shot:
        images, folders = _labelled_images(model, zero_shot, batch_size, tokenizer)
        names = resolve_classnames(classnames, folders)
        _check_names_cover(zero_shot, int(images["labels"].max()) + 1, names)
        templates = templates or resolve_templates(None, classnames)
        classes = embed_classes(model, tokenizer, names, templates)
        results["zero_shot"] = {
            **zero_shot_accuracy(images["embeddings"], classes, images["labels"]),
            "images": len(images["labels"]),
            "classes": len(names),
            "chance_top1": 1 / len(names),
        }
    if retrieval:
        results["retrieval"] = _retrieval(
            model, tokenizer, retrieval, batch_size, image_root, split
        )
    if probe:
        train, _ = _labelled_images(model, probe[0], batch_size, tokenizer)
        test, _ = _labelled_images(model, probe[1], batch_size, tokenizer)
        results["linear_probe"] = linear_probe(
            *_split_validation(train["embeddings"], train["labels"]),
            (test["embeddings"], test["labels"]),
        )
    return results


def headline_metrics(results: dict[str, dict[str, float]]) -> dict[str, float]:
    """`evaluate`'s results as the flat figures logged during training.

    Example:
    >>> headline_metrics({"zero_shot": {"top1": 0.5, "images": 10}})
    {'zero_shot_top1': 0.5}
    """
    return {
        eval_metric_name(task, metric): float(results[task][metric])
        for task, metrics in EVAL_METRICS.items()
        if task in results
        for metric in metrics
        if metric in results[task]
    }


def _label_classes(source: str) -> tuple[int, list[str]]:
    """The classes labelled `source` needs (its largest label + 1, or its
    folders) and an ImageFolder's folder names; every record of shards must
    carry a label."""
    if Path(source).is_dir():
        folders = read_image_folder(source)[2]
        return len(folders), folders
    labels = read_labels(list_shards(source))
    if not labels.size:
        raise ValueError(f"{source} holds no readable records.")
    if np.any(labels < 0):
        raise _unlabelled(source)
    return int(labels.max()) + 1, []


def check_targets(
    targets: EvaluationTargets, image_root: str | None = None, split: str = "test"
) -> None:
    """Reads what the evaluations of `targets` need before any model work, so
    that a wrong file is one error naming it, before training and not at
    the first evaluation: every source must exist, every record of labelled
    shards must carry a label (the labels alone are read, not the images),
    the class names must resolve, one per label, and a Karpathy JSON must
    hold the split."""
    for source in targets.paths:
        if not Path(source).exists():
            list_shards(source)  # raises FileNotFoundError naming the pattern
    for source in targets.probe or ():
        _label_classes(source)
    if targets.zero_shot:
        classes, folders = _label_classes(targets.zero_shot)
        names = resolve_classnames(targets.classnames, folders)
        _check_names_cover(targets.zero_shot, classes, names)
    if targets.retrieval and targets.retrieval.endswith(".json"):
        read_karpathy(targets.retrieval, image_root, split)


# The keys of CLIP_benchmark's result files, from this module's.
_BENCHMARK_TASKS = {
    "zero_shot": ("zeroshot_classification", {
        "acc1": "top1", "acc5": "top5",
        "mean_per_class_recall": "mean_per_class_recall",
    }),
    "retrieval": ("zeroshot_retrieval", {
        # CLIP_benchmark's "image retrieval" ranks images for each caption.
        **{f"image_retrieval_recall@{k}": f"text_to_image_R@{k}" for k in (1, 5, 10)},
        **{f"text_retrieval_recall@{k}": f"image_to_text_R@{k}" for k in (1, 5, 10)},
    }),
    "linear_probe": ("linear_probe", {"acc1": "test_accuracy"}),
}  # fmt: skip


def clip_benchmark_records(
    results: dict[str, dict[str, float]], model: str, datasets: dict[str, str]
) -> list[dict]:
    """`evaluate`'s results as CLIP_benchmark result files' contents.

    Args:
        results: what `evaluate` returned.
        model: the model's name or path (CLIP_benchmark's `model` and
            `pretrained` fields).
        datasets: a dataset name per evaluation (`"zero_shot"`, `"retrieval"`,
            `"linear_probe"`).

    Returns:
        One dict per evaluation: `dataset`, `model`, `pretrained`, `task`,
        `language` and `metrics` in CLIP_benchmark's keys (`acc1`, `acc5`,
        `mean_per_class_recall`, `image_retrieval_recall@k`,
        `text_retrieval_recall@k`).
    """
    records = []
    for name, metrics in results.items():
        task, keys = _BENCHMARK_TASKS[name]
        theirs = {key: metrics[ours] for key, ours in keys.items() if ours in metrics}
        records.append(
            {
                "dataset": datasets[name],
                "model": model,
                "pretrained": model,
                "task": task,
                "language": "en",
                "metrics": theirs,
            }
        )
    return records

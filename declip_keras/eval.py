"""Evaluation: zero-shot classification, image-text retrieval, linear probe.

The metrics are plain numpy on L2-normalised embeddings, so they apply to any
model; `embed_images`, `class_embeddings` and `embed_captions` produce those
embeddings from a `DeCLIP` model and an evaluation dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
from keras import ops
from tqdm import tqdm

from declip_keras.tokenizer import CaptionTokenizer

# CLIP's 80 prompt templates for ImageNet zero-shot classification.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.",
    "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.",
    "a photo of a dirty {}.", "a dark photo of the {}.", "a drawing of a {}.",
    "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.",
    "a painting of the {}.", "a painting of a {}.", "a pixelated photo of the {}.",
    "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.",
    "a rendering of the {}.", "a {} in a video game.", "a photo of one {}.",
    "a doodle of a {}.", "a close-up photo of the {}.", "a photo of a {}.",
    "the origami {}.", "the {} in a video game.", "a sketch of a {}.",
    "a doodle of the {}.", "a origami {}.", "a low resolution photo of a {}.",
    "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.",
    "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.",
    "a photo of the small {}.", "a photo of the weird {}.", "the cartoon {}.",
    "art of the {}.", "a drawing of the {}.", "a photo of the large {}.",
    "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.",
    "a photo of a cool {}.", "a photo of a small {}.", "a tattoo of the {}.",
)  # fmt: skip
SIMPLE_TEMPLATES = ("a photo of a {}.", "a photo of the {}.", "{}")


def _normalize(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def embed_images(model, dataset: Iterable[dict]) -> dict[str, np.ndarray]:
    """Unit image embeddings, labels and captions of an `eval_dataset`."""
    images, labels, captions = [], [], []
    for batch in tqdm(dataset, desc="images", unit="batch"):
        embeddings = model.encode_image(batch["images"])
        images.append(ops.convert_to_numpy(embeddings).astype(np.float32))
        labels.append(np.asarray(batch["label"]))
        captions += [c.decode("utf-8") for c in np.asarray(batch["txt"])]
    return {
        "embeddings": np.concatenate(images),
        "labels": np.concatenate(labels),
        "captions": np.asarray(captions, dtype=object),
    }


def embed_captions(
    model, tokenizer: CaptionTokenizer, captions: Sequence[str], batch_size: int = 256
) -> np.ndarray:
    """Unit text embeddings of `captions`, batched."""
    out = []
    for start in range(0, len(captions), batch_size):
        ids = tokenizer(list(captions[start : start + batch_size]))
        embeddings = model.encode_text(np.asarray(ids))
        out.append(ops.convert_to_numpy(embeddings).astype(np.float32))
    return np.concatenate(out)


def class_embeddings(
    model,
    tokenizer: CaptionTokenizer,
    classnames: Sequence[str],
    templates: Sequence[str] = IMAGENET_TEMPLATES,
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
    scores = image_embeddings @ class_embeddings.T
    ranking = np.argsort(-scores, axis=1)
    hits = ranking == np.asarray(labels)[:, None]
    return {
        f"top{k}": float(hits[:, :k].any(axis=1).mean())
        for k in topk
        if k <= class_embeddings.shape[0]
    }


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


def _parse_names(value: str) -> list[str]:
    """Class names: a JSON file (a list, or a dict with `digit_classes`) or a
    comma-separated list."""
    import json
    from pathlib import Path

    if Path(value).is_file():
        loaded = json.loads(Path(value).read_text())
        return list(loaded["digit_classes"] if isinstance(loaded, dict) else loaded)
    return [name.strip() for name in value.split(",") if name.strip()]


def evaluate(
    model,
    zero_shot: str | None = None,
    classnames: str | None = None,
    templates: Sequence[str] = SIMPLE_TEMPLATES,
    retrieval: str | None = None,
    batch_size: int = 128,
) -> dict[str, dict[str, float]]:
    """Runs the requested evaluations of `model` on TFRecord shards."""
    from declip_keras.data import eval_dataset

    size = model.image_encoder.image_size
    context = model.text_encoder.context_length
    tokenizer = CaptionTokenizer(context)
    results = {}
    if zero_shot:
        if not classnames:
            raise ValueError("zero-shot evaluation needs class names.")
        names = _parse_names(classnames)
        images = embed_images(model, eval_dataset(zero_shot, batch_size, size, context))
        if np.any(images["labels"] < 0):
            raise ValueError(f"{zero_shot}: zero-shot records need an int64 `label`.")
        classes = class_embeddings(model, tokenizer, names, templates)
        results["zero_shot"] = {
            **zero_shot_accuracy(images["embeddings"], classes, images["labels"]),
            "images": len(images["labels"]),
            "classes": len(names),
            "chance_top1": 1 / len(names),
        }
    if retrieval:
        data = eval_dataset(retrieval, batch_size, size, context)
        keys, embeddings, captions = [], [], []
        for batch in tqdm(data, desc="retrieval", unit="batch"):
            keys += list(np.asarray(batch["key"]))
            embeddings.append(ops.convert_to_numpy(model.encode_image(batch["images"])))
            captions += [c.decode("utf-8") for c in np.asarray(batch["txt"])]
        # Records that share a key are one image with several captions.
        first = {key: i for i, key in reversed(list(enumerate(keys)))}
        image_rows = sorted(set(first.values()))
        index_of = {keys[row]: n for n, row in enumerate(image_rows)}
        image_embeddings = np.concatenate(embeddings)[image_rows]
        text_embeddings = embed_captions(model, tokenizer, captions)
        owner = np.array([index_of[key] for key in keys])
        results["retrieval"] = {
            **retrieval_recall(image_embeddings, text_embeddings, owner),
            "images": len(image_rows),
            "captions": len(captions),
        }
    return results

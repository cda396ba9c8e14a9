"""Does DeCLIP need fewer pairs than CLIP? A fixed, data-bound protocol.

The protocol was fixed before any result was seen; both methods get the same
model, tokenizer, batch, schedule and number of steps, with no per-method
tuning (each uses the released defaults of its method: DeCLIP's five-term
loss with MoCo-v2 views, CLIP's crop-only views), except where a choice is
semantic and then it is the same for both: digits are not mirror-invariant,
so neither method's views are flipped (DeCLIP gets `mocov2-noflip`; CLIP's
crops never flip).

- Data (`declip_keras.data.builtin.make_digit_benchmark_data`): 4,000 MNIST
  digits drawn in a colour, size, place and background. The default
  condition, "named", captions them with 7-11 tokens that name the digit and
  nothing an augmentation changes; "grounded" (`--styles grounded`) also
  names colour, size, side and background, which DeCLIP's colour jitter and
  crops alter in its views only; "short" draws white on black with 1-7-token
  captions. Held out: 1,000 unseen digits (zero-shot, and a linear probe
  trained on half of them and scored on the other half) and scikit-learn's
  1,797 8x8 digits upscaled (zero-shot, out of distribution).
- Emoji (`--styles emoji`, `make_emoji_benchmark_data`), the mirror-invariant
  condition closer to web captions: the OpenMoji emoji whose Unicode names a
  mirror does not falsify (47 with "left" or "right" are left out), 300 of
  them held out and never trained on, the other 1,096 drawn 3 times each at
  random sizes, offsets and backgrounds (3,288 pairs) and captioned with
  their name in one of 5 templates. Figures: retrieval among the 300 unseen
  emoji by name, R@1 and R@5 image -> text and R@5 text -> image (chance
  0.3% and 1.7%): names of unseen emoji are made of seen words ("face",
  "cat", "heart").
- Model: the `tiny` preset at 32 px, 8-px patches, width 128, 2 layers and
  4 heads per tower, 128-d embeddings, 24 tokens, a BPE vocabulary trained on
  the training captions (`train_bpe`, asked for 1,024 tokens), a 512-row
  neighbour queue and SimSiam heads of 256/64.
- Budget: 600 steps of 64 pairs for every subset (128 epochs of the
  smallest, 12.8 of the largest), every run evaluated every 150 steps; the
  report gives each run's last and best figure. Subsets of 300, 1,000 and
  3,000 pairs, nested, drawn per seed; 3 seeds; CLIP and DeCLIP.
  `--ablations` adds DeCLIP with one term removed (no MVS, no SimSiam, no
  MLM, no NNS) at the smallest size; removing a term keeps the other weights.
- Report (`results.json`, `data_efficiency.png`, `curves.png`, a table on
  stdout): per point mean +- std over seeds, the paired DeCLIP - CLIP
  difference per seed (same subset, same initial towers) with a one-sample
  t-test, the pairs-to-match ratio (the pairs CLIP needs, interpolated on a
  log axis, to match DeCLIP's mean at each size), and diagnostics: each loss
  term's share of the gradient norm in each tower over the first 100 steps,
  each term's mean over every 150 steps, the share of training captions whose
  nearest other caption has the same digit, and whether SimSiam collapses
  (the std over held-out images of the unit projector outputs, per channel
  and averaged: 0 is collapse, 1/sqrt(256) = 0.0625 a spread-out output).

    python scripts/benchmark_data_efficiency.py --output bench/
    python scripts/benchmark_data_efficiency.py --output bench-s100/ --seed 100
    python scripts/benchmark_data_efficiency.py --output bench/ --styles emoji

The last command adds the emoji condition to the same report (`grounded` and
`short` are the earlier digit conditions).
`scripts/released_referee.py` trains the released DeCLIP and CLIP code on the
same subsets and scores it the same way.

`--backend` picks the Keras backend (default torch, the fastest on CPU);
`--quick` runs the whole machinery on a few steps (a smoke test, not a
result). Finished runs are kept in `runs.json`, so an interrupted benchmark
resumes where it stopped; a `runs.json` of another protocol is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ARMS = {
    # name: (declip, weight overrides)
    "clip": (False, {}),
    "declip": (True, {}),
    "declip-no-mvs": (True, {"multi_view": False}),
    "declip-no-ss": (True, {"ss_weight": 0.0}),
    "declip-no-mlm": (True, {"mlm_weight": 0.0}),
    "declip-no-nns": (True, {"nn_weight": 0.0}),
}
MODEL = {
    "image_size": 32,
    "patch_size": 8,
    "vision_width": 128,
    "vision_layers": 2,
    "vision_heads": 4,
    "text_width": 128,
    "text_layers": 2,
    "text_heads": 4,
    "context_length": 24,
    "embed_dim": 128,
    "queue_size": 512,
    "simsiam_projection_dim": 256,
    "simsiam_prediction_dim": 64,
}
DIGIT_METRICS = ("zero_shot", "zero_shot_ood", "linear_probe")
EMOJI_METRICS = ("image_to_text_r1", "image_to_text_r5", "text_to_image_r5")
# Per data condition: DeCLIP's views and the held-out figures. Digits change
# class in a mirror, so no digit style flips them; the emoji whose names a
# mirror falsifies are left out of the data, so emoji keep the released views.
# CLIP's crop-only views never flip.
STYLES = {
    "named": ("mocov2-noflip", DIGIT_METRICS),
    "emoji": ("mocov2", EMOJI_METRICS),
    "grounded": ("mocov2-noflip", DIGIT_METRICS),
    "short": ("mocov2-noflip", DIGIT_METRICS),
}
BUDGETS = ("last", "best")
DIAGNOSTIC_STEPS = (0, 20, 50, 100)
VOCABULARY_SIZE = 1024
BATCH_SIZE = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench"))
    parser.add_argument("--seed", type=int, default=0, help="first of the seeds")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
    parser.add_argument("--backend", default="torch", help="jax, tensorflow, torch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 1000, 3000])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--eval-every", type=int, default=150)
    parser.add_argument(
        "--styles",
        nargs="+",
        default=["named"],
        choices=list(STYLES),
        help="data conditions (default: named; emoji, grounded, short)",
    )
    parser.add_argument(
        "--ablations",
        nargs="*",
        choices=list(STYLES),
        metavar="STYLE",
        help="also DeCLIP without each term, at the smallest size (of the "
        "styles named here; of every style when none is)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: both conditions, 2 small sizes, 1 seed, 4 steps, "
        "ablations on named digits",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds, args.steps, args.eval_every = [64, 128], 1, 4, 2
        args.styles, args.ablations = ["named", "emoji"], ["named"]
    if args.ablations == []:
        args.ablations = args.styles
    if args.eval_every < 1 or args.steps % args.eval_every:
        parser.error("--steps must be a multiple of --eval-every")
    return args


def protocol(args) -> dict:
    """What makes runs of every style comparable: a `runs.json` of another is
    refused. (What a style sets is kept in each run.)"""
    return {
        "steps": args.steps,
        "eval_every": args.eval_every,
        "batch_size": BATCH_SIZE,
        "model": MODEL,
        "backend": args.backend,
    }


# --- data ------------------------------------------------------------------------


def prepare_style(root: Path, style: str, sizes: list[int], seeds: list[int]) -> dict:
    """The style's data, tokenizer and nested subsets per seed."""
    from declip_keras.data.builtin import (
        make_digit_benchmark_data,
        make_emoji_benchmark_data,
    )
    from declip_keras.data.records import iterate_examples
    from declip_keras.data.tokenizer import save_vocabulary, train_bpe

    folder = root / f"data-{style}"
    if not (folder / "manifest.json").exists():
        if style == "emoji":
            make_emoji_benchmark_data(folder)
        else:
            make_digit_benchmark_data(folder, style)
    records = list(iterate_examples(str(folder / "train.tfrecord")))
    if not (folder / "vocab" / "vocab.json").exists():
        captions = [r["txt"].decode("utf-8") for r in records]
        save_vocabulary(str(folder / "vocab"), *train_bpe(captions, VOCABULARY_SIZE))
    if max(sizes) > len(records):
        raise SystemExit(f"--sizes go up to {len(records)} pairs for this dataset.")
    subsets = {}
    for seed in seeds:
        order = np.random.default_rng(seed).permutation(len(records))
        for size in sizes:
            path = folder / "subsets" / f"seed{seed}" / f"pairs-{size}.tfrecord"
            if not path.exists():
                _write_records(path, [records[i] for i in order[:size]])
            subsets[seed, size] = str(path)
    return {
        "folder": folder,
        "vocab": str(folder / "vocab"),
        "subsets": subsets,
        "images": load_eval_images(folder, style),
    }


def _write_records(path: Path, records: list[dict]) -> None:
    import tensorflow as tf

    from declip_keras.data.records import encode_example

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with tf.io.TFRecordWriter(str(partial)) as writer:
        for r in records:
            writer.write(
                encode_example(
                    r["key"].decode("utf-8"), r["png"], "png", r["txt"], int(r["label"])
                )
            )
    os.replace(partial, path)


# --- diagnostics -------------------------------------------------------------------


def gradient_share_callback(batch: dict, steps: tuple[int, ...], into: list):
    """A callback recording each term's share of the towers' gradient norms:
    the norm of each weighted term's gradient over a tower's weights divided
    by the sum of those norms, on one fixed batch, at `steps` of a fresh run."""
    import keras

    from declip_keras.backend import loss_term_gradient_norms, sync_model_state

    class GradientShares(keras.callbacks.Callback):
        # Counted here: JAX updates the optimizer's step variable only on sync.
        step = 0

        def on_train_batch_begin(self, batch_index, logs=None):
            step, self.step = self.step, self.step + 1
            if step not in steps:
                return
            sync_model_state(self.model)
            groups = {
                "image": self.model.image_encoder.trainable_variables,
                "text": self.model.text_encoder.trainable_variables,
            }
            norms = loss_term_gradient_norms(self.model, batch, groups)
            shares = {}
            for tower in groups:
                total = sum(n[tower] for n in norms.values()) or 1.0
                shares[tower] = {t: n[tower] / total for t, n in norms.items()}
            into.append({"step": int(step), "norms": norms, "shares": shares})

    return GradientShares()


def neighbour_agreement(model, tokenizer, subset: str) -> float:
    """Share of the subset's captions whose nearest other caption (by the
    model's text embeddings) shows the same digit: how often NNS pairs an
    image with a caption of its own class."""
    from declip_keras.data.records import iterate_examples
    from declip_keras.evaluation.metrics import embed_captions

    records = list(iterate_examples(subset))
    labels = np.array([int(r["label"]) for r in records])
    embeddings = embed_captions(
        model, tokenizer, [r["txt"].decode("utf-8") for r in records]
    )
    return caption_agreement(embeddings, labels)


def caption_agreement(embeddings: np.ndarray, labels: np.ndarray) -> float:
    """Share of unit caption embeddings whose nearest other one has the same
    label (any model's, so the released code is scored by the same lines)."""
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(labels[similarity.argmax(axis=1)] == labels))


# --- scoring -----------------------------------------------------------------------


def eval_sets(style: str) -> tuple[str, ...]:
    """The held-out sets of a data condition (files under its `eval/`)."""
    return ("emoji",) if style == "emoji" else ("digits", "sklearn_digits")


def load_eval_images(folder: Path, style: str) -> dict:
    """Preprocessed held-out images, labels and captions per set, decoded once
    per benchmark: `{name: (pixels, labels, captions)}`."""
    from declip_keras.data.pipeline import eval_dataset
    from declip_keras.data.records import iterate_examples

    sets = {}
    for name in eval_sets(style):
        pattern = str(folder / "eval" / f"{name}.tfrecord")
        batches = list(eval_dataset(pattern, 512, MODEL["image_size"], 8))
        captions = [r["txt"].decode("utf-8") for r in iterate_examples(pattern)]
        sets[name] = (
            np.concatenate([b["images"].numpy() for b in batches]),
            np.concatenate([b["label"].numpy() for b in batches]),
            captions,
        )
    return sets


def score_embeddings(embeddings: dict, images: dict, style: str) -> dict[str, float]:
    """The held-out figures from unit embeddings (any model's, so the released
    code is scored by the same lines). Digits: `digits` and `sklearn_digits`
    image embeddings and `classes` of the digit prompts `[10, D]`; emoji:
    `emoji` image and `emoji_texts` caption embeddings, row i of each the
    same unseen emoji."""
    from declip_keras.evaluation.metrics import (
        linear_probe,
        retrieval_recall,
        zero_shot_accuracy,
    )

    if style == "emoji":
        recall = retrieval_recall(
            embeddings["emoji"],
            embeddings["emoji_texts"],
            np.arange(len(embeddings["emoji"])),
            (1, 5),
        )
        return {
            "image_to_text_r1": recall["image_to_text_R@1"],
            "image_to_text_r5": recall["image_to_text_R@5"],
            "text_to_image_r5": recall["text_to_image_R@5"],
        }
    features, labels = embeddings["digits"], images["digits"][1]
    classes = embeddings["classes"]
    # The first half (20% of it for the L2 sweep) trains the probe, scored on
    # the second.
    half = len(labels) // 2
    cut = int(half * 0.8)
    return {
        "zero_shot": zero_shot_accuracy(features, classes, labels, (1,))["top1"],
        "zero_shot_ood": zero_shot_accuracy(
            embeddings["sklearn_digits"], classes, images["sklearn_digits"][1], (1,)
        )["top1"],
        "linear_probe": linear_probe(
            (features[:cut], labels[:cut]),
            (features[cut:half], labels[cut:half]),
            (features[half:], labels[half:]),
            strengths=np.logspace(-4, 4, 9),
            max_iter=300,
        )["test_accuracy"],
    }


def projection_spread(projections: np.ndarray) -> float:
    """SimSiam's collapse check: the std over samples of the unit projector
    outputs, per channel, averaged. 0 is a collapsed (constant) output;
    spread-out unit vectors give about 1/sqrt(channels)."""
    unit = projections / np.linalg.norm(projections, axis=1, keepdims=True)
    return float(unit.std(axis=0).mean())


def score(model, tokenizer, images: dict, style: str) -> dict[str, float]:
    from keras import ops

    from declip_keras.data.builtin import DIGIT_NAMES, DIGIT_PROMPTS
    from declip_keras.evaluation.metrics import embed_captions, embed_classes

    def embed(pixels: np.ndarray, head=None) -> np.ndarray:
        out = []
        for i in range(0, len(pixels), 500):
            if head is None:
                out.append(model.encode_image(pixels[i : i + 500]))
            else:
                features = model.image_encoder(pixels[i : i + 500], training=False)
                out.append(head(features, training=False))
        return np.concatenate([ops.convert_to_numpy(o) for o in out])

    embeddings = {name: embed(images[name][0]) for name in eval_sets(style)}
    if style == "emoji":
        captions = images["emoji"][2]
        embeddings["emoji_texts"] = embed_captions(model, tokenizer, captions)
    else:
        embeddings["classes"] = embed_classes(
            model, tokenizer, DIGIT_NAMES, DIGIT_PROMPTS.split("|")
        )
    result = score_embeddings(embeddings, images, style)
    if getattr(model, "ss_weight", 0):
        first = images[eval_sets(style)[0]][0]
        result["simsiam_spread"] = projection_spread(embed(first, model.projector))
    return result


def best_and_last(curve: list[dict], style: str) -> dict[str, float]:
    """Each metric's figure at the last evaluation and its best over the run."""
    out = {}
    for metric in STYLES[style][1]:
        out[f"{metric}_last"] = curve[-1][metric]
        out[f"{metric}_best"] = max(point[metric] for point in curve)
    return out


# --- one run -----------------------------------------------------------------------


def diagnostic_batch(
    prepared: dict, subset: str, seed: int, mlm: bool, augmentation: str, tokenizer
) -> dict:
    """One fixed batch of a run's own pipeline at another stream position
    (its seed + 10,000), built once per subset and pipeline: the arms that
    share them (the ablations at the smallest size) share the batch, and
    each tf.data build traces thousands of ops."""
    from declip_keras.data.pipeline import PipelineOptions, training_dataset

    key = (subset, seed, mlm, augmentation)
    cache = prepared.setdefault("diagnostic_batches", {})
    if key not in cache:
        options = PipelineOptions(
            BATCH_SIZE,
            MODEL["image_size"],
            MODEL["context_length"],
            seed=seed + 10_000,
            mlm=mlm,
            augmentation=augmentation,
        )
        dataset = training_dataset(subset, options, tokenizer=tokenizer)
        cache[key] = {k: v.numpy() for k, v in next(iter(dataset)).items()}
    return cache[key]


def run_one(args, style: str, prepared: dict, arm: str, size: int, seed: int) -> dict:
    import keras

    from declip_keras.data.tokenizer import load_tokenizer
    from declip_keras.training.config import TrainConfig
    from declip_keras.training.runs import checkpoints, load_trained_model
    from declip_keras.training.train import train

    declip, arm_overrides = ARMS[arm]
    augmentation = STYLES[style][0] if declip else "crop"
    subset = prepared["subsets"][seed, size]
    tokenizer = load_tokenizer(MODEL["context_length"], prepared["vocab"])
    run = args.output / "runs" / style / f"{arm}-{size}-seed{seed}"
    callbacks, shares = [], []
    if declip:
        mlm = arm_overrides.get("mlm_weight", 1.0) > 0
        batch = diagnostic_batch(prepared, subset, seed, mlm, augmentation, tokenizer)
        steps = tuple(s for s in DIAGNOSTIC_STEPS if s < args.steps)
        callbacks.append(gradient_share_callback(batch, steps, shares))
    keras.backend.clear_session()
    began = time.perf_counter()
    summary = train(
        TrainConfig(
            data=subset,
            output=str(run),
            overrides={**MODEL, **arm_overrides},
            batch_size=BATCH_SIZE,
            steps=args.steps,
            checkpoint_every=args.eval_every,
            keep_checkpoints=args.steps // args.eval_every,
            method="declip" if declip else "clip",
            augmentation=augmentation,
            vocabulary=prepared["vocab"],
            seed=seed,
        ),
        verbose=0,
        callbacks=callbacks,
    )
    trained = time.perf_counter() - began
    curve = []
    for path in checkpoints(run):
        model = load_trained_model(path)
        step = int(path.stem.split("-")[1])
        scores = score(model, tokenizer, prepared["images"], style)
        curve.append({"step": step, **scores})
    result = {"style": style, "arm": arm, "pairs": size, "seed": seed,
              "augmentation": augmentation}  # fmt: skip
    result.update(best_and_last(curve, style))
    result["curve"] = curve
    result["nn_agreement"] = neighbour_agreement(model, tokenizer, subset)
    # Each term's mean over every evaluation interval.
    result["terms"] = {
        name: [float(v) for v in values] for name, values in summary["history"].items()
    }
    result["gradient_shares"] = shares
    result["train_seconds"] = trained
    result["seconds"] = time.perf_counter() - began
    return result


# --- report ------------------------------------------------------------------------


def pairs_to_match(clip_curve: list[tuple[int, float]], target: float) -> dict:
    """Pairs CLIP needs to reach `target`, linear in log(pairs) between sizes.

    Returns `{"clip_pairs": p}`, or `{"below": n}` / `{"above": n}` when the target
    lies under CLIP's first point or over everything CLIP reached.
    """
    clip_curve = sorted(clip_curve)
    if target <= clip_curve[0][1]:
        return {"below": clip_curve[0][0]}
    for (n0, a0), (n1, a1) in zip(clip_curve, clip_curve[1:], strict=False):
        if a0 < target <= a1:
            fraction = (target - a0) / (a1 - a0)
            pairs = np.exp(np.log(n0) + fraction * np.log(n1 / n0))
            return {"clip_pairs": float(pairs)}
    return {"above": clip_curve[-1][0]}


def figure_names(style: str) -> list[str]:
    return [f"{m}_{b}" for b in BUDGETS for m in STYLES[style][1]]


def grouped(runs: list[dict]) -> dict[tuple, list[dict]]:
    """Runs per (style, arm, pairs), sorted by key."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["style"], r["arm"], r["pairs"]), []).append(r)
    return dict(sorted(groups.items()))


def table_rows(runs: list[dict]) -> list[dict]:
    """Mean and std over seeds of every figure, per (style, arm, pairs)."""
    table = []
    for (style, arm, size), group in grouped(runs).items():
        row = {"style": style, "arm": arm, "pairs": size, "seeds": len(group)}
        for name in [*figure_names(style), "nn_agreement"]:
            values = np.array([r[name] for r in group])
            row[name] = [float(values.mean()), float(values.std(ddof=0))]
        spreads = [r["curve"][-1]["simsiam_spread"] for r in group
                   if "simsiam_spread" in r["curve"][-1]]  # fmt: skip
        if spreads:
            row["simsiam_spread"] = [float(np.mean(spreads)), float(np.std(spreads))]
        table.append(row)
    return table


def paired_differences(runs: list[dict], arm: str, baseline: str) -> list[dict]:
    """Per (style, pairs, figure): `arm - baseline` per seed, with a one-sample
    t-test of the mean difference against zero."""
    from scipy import stats

    out = []
    for style, size in sorted({(r["style"], r["pairs"]) for r in runs}):
        for name in figure_names(style):
            by_seed = {
                (r["arm"], r["seed"]): r[name]
                for r in runs
                if (r["style"], r["pairs"]) == (style, size)
            }
            seeds = sorted(
                s for a, s in by_seed if a == baseline and (arm, s) in by_seed
            )
            diffs = [by_seed[arm, s] - by_seed[baseline, s] for s in seeds]
            if not diffs:
                continue
            p_value = (
                float(stats.ttest_1samp(diffs, 0.0).pvalue)
                if len(diffs) > 1 and np.std(diffs) > 0
                else None
            )
            out.append(
                {"style": style, "pairs": size, "metric": name, "arm": arm,
                 "baseline": baseline, "seeds": seeds, "differences": diffs,
                 "mean": float(np.mean(diffs)), "p_value": p_value,
                 "significant": p_value is not None and p_value < 0.05}
            )  # fmt: skip
    return out


def matching_pairs(table: list[dict], arm: str, baseline: str) -> list[dict]:
    """Per (style, pairs, figure): the pairs `baseline` needs to match `arm`."""
    out = []
    for style in sorted({r["style"] for r in table}):
        rows = [r for r in table if r["style"] == style]
        for name in figure_names(style):
            curve = [(r["pairs"], r[name][0]) for r in rows if r["arm"] == baseline]
            for r in rows:
                if r["arm"] != arm or len(curve) < 2:
                    continue
                match = pairs_to_match(curve, r[name][0])
                if "clip_pairs" in match:
                    match["ratio"] = match["clip_pairs"] / r["pairs"]
                out.append({"style": style, "pairs": r["pairs"], "metric": name,
                            **match})  # fmt: skip
    return out


def mean_curves(runs: list[dict]) -> list[dict]:
    """Each figure per evaluation step, mean and std over seeds."""
    out = []
    for (style, arm, size), group in grouped(runs).items():
        steps = [point["step"] for point in group[0]["curve"]]
        line = {"style": style, "arm": arm, "pairs": size, "steps": steps}
        for metric in STYLES[style][1]:
            values = np.array([[p[metric] for p in r["curve"]] for r in group])
            line[metric] = [values.mean(0).tolist(), values.std(0).tolist()]
        out.append(line)
    return out


def summarise(runs: list[dict]) -> dict:
    table = table_rows(runs)
    diagnostics = []
    for style, arm in sorted({(r["style"], r["arm"]) for r in runs}):
        records = [
            s
            for r in runs
            if r["style"] == style and r["arm"] == arm
            for s in r["gradient_shares"]
        ]
        if not records:
            continue
        mean = {}
        for tower in ("image", "text"):
            terms = records[0]["shares"][tower]
            mean[tower] = {
                t: float(np.mean([s["shares"][tower][t] for s in records]))
                for t in terms
            }
        diagnostics.append({"style": style, "arm": arm, "mean_shares": mean})
    return {
        "table": table,
        "curves": mean_curves(runs),
        "paired": paired_differences(runs, "declip", "clip"),
        "pairs_to_match": matching_pairs(table, "declip", "clip"),
        "gradient_shares": diagnostics,
    }


ARM_COLOURS = {
    "clip": "tab:blue",
    "declip": "tab:red",
    "released-clip": "tab:cyan",
    "released-declip": "tab:orange",
}


def plot(report: dict, path: Path) -> None:
    """Each figure (last evaluation) against pairs, one row per style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = sorted({r["style"] for r in report["table"]})
    figure, axes = plt.subplots(
        len(styles), 3, figsize=(15, 4 * len(styles)), squeeze=False
    )
    markers = dict(
        zip([a for a in ARMS if a.startswith("declip-")], "sv^D", strict=True)
    )
    for row, style in enumerate(styles):
        for column, metric in enumerate(STYLES[style][1]):
            axis = axes[row][column]
            rows = [r for r in report["table"] if r["style"] == style]
            for arm, colour in ARM_COLOURS.items():
                line = sorted(
                    (r for r in rows if r["arm"] == arm), key=lambda r: r["pairs"]
                )
                if not line:
                    continue
                pairs = [r["pairs"] for r in line]
                mean = np.array([r[f"{metric}_last"][0] for r in line])
                std = np.array([r[f"{metric}_last"][1] for r in line])
                axis.plot(pairs, mean, "o-", color=colour, label=arm)
                axis.fill_between(
                    pairs, mean - std, mean + std, color=colour, alpha=0.2
                )
            for arm, marker in markers.items():
                for r in rows:
                    if r["arm"] == arm:
                        mean, std = r[f"{metric}_last"]
                        axis.errorbar(r["pairs"], mean, std, fmt=marker, color="gray",
                                      label=arm, capsize=3)  # fmt: skip
            if STYLES[style][1] == DIGIT_METRICS:
                axis.axhline(0.1, color="gray", linestyle=":", label="chance")
            axis.set_xscale("log")
            sizes = sorted({r["pairs"] for r in rows})
            axis.set_xticks(sizes, [f"{n:,}" for n in sizes])
            axis.minorticks_off()
            axis.set_xlabel("training pairs")
            axis.set_title(f"{metric}, last ({style})")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def plot_curves(report: dict, path: Path) -> None:
    """The first and last figure of each condition (digits: zero-shot and
    probe accuracy) against steps, per arm and size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines = [c for c in report["curves"] if c["arm"] in ARM_COLOURS]
    styles = sorted({c["style"] for c in lines})
    figure, axes = plt.subplots(
        len(styles), 2, figsize=(12, 4 * len(styles)), squeeze=False
    )
    sizes = sorted({c["pairs"] for c in lines})
    styles_of_size = dict(zip(sizes, [":", "--", "-", "-."] * len(sizes), strict=False))
    for row, style in enumerate(styles):
        metrics = STYLES[style][1]
        for column, metric in enumerate((metrics[0], metrics[-1])):
            axis = axes[row][column]
            for c in (c for c in lines if c["style"] == style):
                mean, std = (np.array(v) for v in c[metric])
                axis.plot(c["steps"], mean, styles_of_size[c["pairs"]],
                          color=ARM_COLOURS[c["arm"]],
                          label=f"{c['arm']} {c['pairs']:,}")  # fmt: skip
                axis.fill_between(c["steps"], mean - std, mean + std,
                                  color=ARM_COLOURS[c["arm"]], alpha=0.1)  # fmt: skip
            axis.set_xlabel("step")
            axis.set_title(f"{metric} ({style}), mean +- std over seeds")
            axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def print_table(table: list[dict]) -> None:
    for style in sorted({r["style"] for r in table}):
        metrics = STYLES[style][1]
        header = "".join(f"{m:>22}" for m in metrics)
        print(f"\n{'style':9}{'arm':16}{'pairs':>6}{header}   last ± std (best)")
        for r in (r for r in table if r["style"] == style):
            cells = "".join(
                f"{100 * r[f'{m}_last'][0]:>9.1f} ±{100 * r[f'{m}_last'][1]:4.1f}"
                f" ({100 * r[f'{m}_best'][0]:4.1f})"
                for m in metrics
            )
            print(f"{r['style']:9}{r['arm']:16}{r['pairs']:>6}{cells}")


def print_paired(paired: list[dict]) -> None:
    for p in paired:
        diffs = ", ".join(f"{100 * d:+.1f}" for d in p["differences"])
        p_text = "n/a" if p["p_value"] is None else f"{p['p_value']:.3f}"
        flag = " *" if p["significant"] else ""
        print(f"  {p['style']:9}{p['pairs']:>6} {p['metric']:20} {diffs}"
              f"  mean {100 * p['mean']:+.1f}  p={p_text}{flag}")  # fmt: skip


def print_report(report: dict) -> None:
    print_table(report["table"])
    print("\npaired DeCLIP - CLIP (points), per seed; p of a one-sample t-test")
    print_paired(report["paired"])
    print("\npairs CLIP needs to match DeCLIP (ratio = those pairs / DeCLIP's pairs)")
    for r in report["pairs_to_match"]:
        if "ratio" in r:
            text = f"{r['clip_pairs']:.0f} pairs, ratio {r['ratio']:.2f}"
        elif "below" in r:
            text = f"fewer than {r['below']} (DeCLIP below CLIP's first point)"
        else:
            text = f"more than {r['above']} (DeCLIP above all of CLIP)"
        print(f"  {r['style']:9}{r['pairs']:>6} {r['metric']:20} {text}")
    spreads = [r for r in report["table"] if "simsiam_spread" in r]
    if spreads:
        print("\nSimSiam projector spread at the end (0 = collapsed, 0.0625 = spread)")
        for r in spreads:
            mean, std = r["simsiam_spread"]
            print(
                f"  {r['style']:9}{r['arm']:16}{r['pairs']:>6}  {mean:.4f} ± {std:.4f}"
            )


def load_runs(path: Path, expected: dict) -> list[dict]:
    """Finished runs of `path` if it records the same protocol; exits with one
    line if it records another (its figures would not be comparable)."""
    if not path.exists():
        return []
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict) or saved.get("protocol") != expected:
        raise SystemExit(
            f"{path} holds runs of another protocol (steps, model, augmentations "
            "or backend); give a new --output."
        )
    return saved["runs"]


def save_runs(path: Path, expected: dict, runs: list[dict]) -> None:
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"protocol": expected, "runs": runs}, indent=1))
    os.replace(partial, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    args.output.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    runs_file = args.output / "runs.json"
    fixed = protocol(args)
    runs = load_runs(runs_file, fixed)
    done = {(r["style"], r["arm"], r["pairs"], r["seed"]) for r in runs}
    started = time.perf_counter()
    for style in args.styles:
        prepared = prepare_style(args.output, style, args.sizes, seeds)
        plan = [(arm, size) for size in args.sizes for arm in ("clip", "declip")]
        if style in (args.ablations or ()):
            plan += [
                (arm, min(args.sizes)) for arm in ARMS if arm.startswith("declip-")
            ]
        for seed in seeds:
            for arm, size in plan:
                if (style, arm, size, seed) in done:
                    continue  # finished by an earlier, interrupted invocation
                result = run_one(args, style, prepared, arm, size, seed)
                runs.append(result)
                save_runs(runs_file, fixed, runs)
                print(json.dumps({k: v for k, v in result.items()
                                  if k not in ("gradient_shares", "terms", "curve")}),
                      flush=True)  # fmt: skip
    report = {
        "protocol": {
            **fixed,
            "sizes": args.sizes,
            "seeds": seeds,
            "styles": args.styles,
            "quick": args.quick,
        },  # fmt: skip
        **summarise(runs),
        "runs": runs,
        "minutes_this_invocation": (time.perf_counter() - started) / 60,
    }
    partial = args.output / "results.partial"
    partial.write_text(json.dumps(report, indent=1))
    os.replace(partial, args.output / "results.json")
    plot(report, args.output / "data_efficiency.png")
    plot_curves(report, args.output / "curves.png")
    print_report(report)
    names = ("results.json", "data_efficiency.png", "curves.png")
    print("\n-> " + ", ".join(str(args.output / name) for name in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())

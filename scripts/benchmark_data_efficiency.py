"""Does DeCLIP need fewer pairs than CLIP? A small, fixed protocol on built-in digits.

The protocol was fixed before any result was seen; both methods get the same
model, tokenizer, batch, schedule and number of steps, with no per-method
tuning (each uses the released defaults of its method: DeCLIP's five-term
loss with MoCo-v2 views, CLIP's crop-only views).

- Data (`declip_keras.demo_data.make_digit_benchmark_data`): 4,000 MNIST
  digits drawn in a colour, size, place and background, with 10-20-token
  captions that name them ("grounded"), and the same digits white on black
  with 1-7-token captions ("short", the harder condition). Held out: 1,000
  unseen digits (zero-shot, and a linear probe trained on half of them and
  scored on the other half) and scikit-learn's 1,797 8x8 digits upscaled
  (zero-shot, out of distribution).
- Model: the `tiny` preset at 32 px, 8-px patches, width 128, 2 layers and
  4 heads per tower, 128-d embeddings, 24 tokens, a BPE vocabulary trained on
  the training captions (`train_bpe`, asked for 1,024 tokens), a 512-row
  neighbour queue and SimSiam heads of 256/64.
- Budget: the same number of steps (default 200 of 64 pairs: 25.6 epochs
  of the smallest subset, 3.2 of the largest) for every subset, evaluated
  at half and full budget (the probe at full budget only). Subsets of 500,
  1,500 and 4,000 pairs, nested, drawn per seed; 3 seeds; CLIP and DeCLIP
  on both caption styles, and DeCLIP with one term removed (no MVS, no
  SimSiam, no MLM, no NNS) at the smallest size on the grounded captions.
  Removing a term keeps the other weights.
- Report (`results.json`, `data_efficiency.png`, a table on stdout): per
  point mean ± std over seeds, the paired DeCLIP - CLIP difference per seed
  (same subset, same initial towers) with a one-sample t-test, the
  pairs-to-match ratio (the pairs CLIP needs, interpolated on a log axis, to
  match DeCLIP's mean at each size), and diagnostics: each loss term's share
  of the gradient norm in each tower over the first 100 steps, and the share
  of training captions whose nearest other caption has the same digit.

    python scripts/benchmark_data_efficiency.py --output bench/
    python scripts/benchmark_data_efficiency.py --output bench/ --styles short
    python scripts/benchmark_data_efficiency.py --output bench-s100/ --seed 100

The second command adds the short-caption condition to the same report (the
default is the grounded one with its ablations, which fits in 30 minutes on
two CPU cores).

`--backend` picks the Keras backend (default torch, the fastest on CPU);
`--quick` runs the whole machinery on a few steps (a smoke test, not a
result). Finished runs are kept in `runs.json`, so an interrupted benchmark
resumes where it stopped.
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
METRICS = ("zero_shot", "zero_shot_ood", "linear_probe")
PROMPTS = ("a photo of the number {}.", "a handwritten digit {}", "the number {}")
DIAGNOSTIC_STEPS = (0, 20, 50, 100)
VOCABULARY_SIZE = 1024
BATCH_SIZE = 64


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("bench"))
    parser.add_argument("--seed", type=int, default=0, help="first of the seeds")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds")
    parser.add_argument("--backend", default="torch", help="jax, tensorflow, torch")
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1500, 4000])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument(
        "--styles",
        nargs="+",
        default=["grounded"],
        choices=["grounded", "short"],
        help="caption styles (the short-caption condition: --styles short)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test: 2 small sizes, 1 seed, 4 steps",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.sizes, args.seeds, args.steps = [64, 128], 1, 4
        args.styles = ["grounded"]
    if args.steps < 2 or args.steps % 2:
        parser.error("--steps must be even (evaluated at half and full budget)")
    return args


# --- data ------------------------------------------------------------------------


def prepare_style(root: Path, style: str, sizes: list[int], seeds: list[int]) -> dict:
    """The style's data, tokenizer and nested subsets per seed."""
    from declip_keras.demo_data import make_digit_benchmark_data
    from declip_keras.records import iterate_examples
    from declip_keras.tokenizer import save_vocabulary, train_bpe

    folder = root / f"data-{style}"
    if not (folder / "manifest.json").exists():
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
        "images": load_eval_images(folder),
    }


def _write_records(path: Path, records: list[dict]) -> None:
    import tensorflow as tf

    from declip_keras.records import encode_example

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
    from declip_keras.evaluation import embed_captions
    from declip_keras.records import iterate_examples

    records = list(iterate_examples(subset))
    labels = np.array([int(r["label"]) for r in records])
    embeddings = embed_captions(
        model, tokenizer, [r["txt"].decode("utf-8") for r in records]
    )
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return float(np.mean(labels[similarity.argmax(axis=1)] == labels))


# --- scoring -----------------------------------------------------------------------


def load_eval_images(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Preprocessed held-out images and labels, decoded once per benchmark."""
    from declip_keras.data import eval_dataset

    sets = {}
    for name in ("digits", "sklearn_digits"):
        pattern = str(folder / "eval" / f"{name}.tfrecord")
        batches = list(eval_dataset(pattern, 512, MODEL["image_size"], 8))
        sets[name] = (
            np.concatenate([b["images"].numpy() for b in batches]),
            np.concatenate([b["label"].numpy() for b in batches]),
        )
    return sets


def score(model, tokenizer, images: dict, probe: bool) -> dict[str, float]:
    from keras import ops

    from declip_keras.demo_data import DIGIT_NAMES
    from declip_keras.evaluation import embed_classes, linear_probe, zero_shot_accuracy

    classes = embed_classes(model, tokenizer, DIGIT_NAMES, PROMPTS)

    def embed(pixels: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [
                ops.convert_to_numpy(model.encode_image(pixels[i : i + 500]))
                for i in range(0, len(pixels), 500)
            ]
        )

    features, labels = embed(images["digits"][0]), images["digits"][1]
    ood = embed(images["sklearn_digits"][0])
    result = {
        "zero_shot": zero_shot_accuracy(features, classes, labels, (1,))["top1"],
        "zero_shot_ood": zero_shot_accuracy(
            ood, classes, images["sklearn_digits"][1], (1,)
        )["top1"],
    }
    if probe:
        # The first half (20% of it for the L2 sweep), scored on the second.
        half = len(labels) // 2
        cut = int(half * 0.8)
        result["linear_probe"] = linear_probe(
            (features[:cut], labels[:cut]),
            (features[cut:half], labels[cut:half]),
            (features[half:], labels[half:]),
            strengths=np.logspace(-4, 4, 9),
            max_iter=300,
        )["test_accuracy"]
    return result


# --- one run -----------------------------------------------------------------------


def run_one(args, style: str, prepared: dict, arm: str, size: int, seed: int) -> dict:
    import keras

    from declip_keras.config import TrainConfig
    from declip_keras.data import training_dataset
    from declip_keras.runs import checkpoints, load_trained_model
    from declip_keras.tokenizer import load_tokenizer
    from declip_keras.train import train

    declip, arm_overrides = ARMS[arm]
    subset = prepared["subsets"][seed, size]
    tokenizer = load_tokenizer(MODEL["context_length"], prepared["vocab"])
    run = args.output / "runs" / style / f"{arm}-{size}-seed{seed}"
    callbacks, shares = [], []
    if declip:
        # One fixed batch of the run's own pipeline, another stream position.
        batch = next(
            iter(
                training_dataset(
                    subset,
                    BATCH_SIZE,
                    MODEL["image_size"],
                    MODEL["context_length"],
                    seed=seed + 10_000,
                    tokenizer=tokenizer,
                    mlm=arm_overrides.get("mlm_weight", 1.0) > 0,
                )
            )
        )
        batch = {k: v.numpy() for k, v in batch.items()}
        callbacks.append(gradient_share_callback(batch, DIAGNOSTIC_STEPS, shares))
    keras.backend.clear_session()
    began = time.perf_counter()
    summary = train(
        TrainConfig(
            data=subset,
            output=str(run),
            overrides={**MODEL, **arm_overrides},
            batch_size=BATCH_SIZE,
            steps=args.steps,
            checkpoint_every=args.steps // 2,
            keep_checkpoints=2,
            method="declip" if declip else "clip",
            vocabulary=prepared["vocab"],
            seed=seed,
        ),
        verbose=0,
        callbacks=callbacks,
    )
    trained = time.perf_counter() - began
    result = {"style": style, "arm": arm, "pairs": size, "seed": seed}
    for path in checkpoints(run):
        model = load_trained_model(path)
        step = int(path.stem.split("-")[1])
        label = "full" if step == args.steps else "half"
        scores = score(model, tokenizer, prepared["images"], probe=label == "full")
        for metric, value in scores.items():
            result[f"{metric}_{label}"] = value
    result["nn_agreement"] = neighbour_agreement(model, tokenizer, subset)
    result["final_terms"] = {
        name: float(values[-1]) for name, values in summary["history"].items()
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


def summarise(runs: list[dict], sizes: list[int]) -> dict:
    from scipy import stats

    table, paired, ratios, diagnostics = [], [], [], []
    keys = sorted({(r["style"], r["arm"], r["pairs"]) for r in runs})
    for style, arm, size in keys:
        group = [r for r in runs if r["style"] == style and r["arm"] == arm]
        group = [r for r in group if r["pairs"] == size]
        row = {"style": style, "arm": arm, "pairs": size, "seeds": len(group)}
        names = [f"{m}_{b}" for m in METRICS for b in ("half", "full")]
        for metric in [n for n in names if n in group[0]] + ["nn_agreement"]:
            values = np.array([r[metric] for r in group])
            row[metric] = [float(values.mean()), float(values.std(ddof=0))]
        table.append(row)
    for style in sorted({r["style"] for r in runs}):
        for size in sizes:
            for metric in METRICS:
                name = f"{metric}_full"
                by_seed = {
                    (r["arm"], r["seed"]): r[name]
                    for r in runs
                    if r["style"] == style and r["pairs"] == size
                }
                seeds = sorted(s for a, s in by_seed if a == "clip")
                diffs = [
                    by_seed["declip", s] - by_seed["clip", s]
                    for s in seeds
                    if ("declip", s) in by_seed
                ]
                if not diffs:
                    continue
                p_value = (
                    float(stats.ttest_1samp(diffs, 0.0).pvalue)
                    if len(diffs) > 1 and np.std(diffs) > 0
                    else None
                )
                paired.append(
                    {"style": style, "pairs": size, "metric": name,
                     "differences": diffs, "mean": float(np.mean(diffs)),
                     "p_value": p_value,
                     "significant": p_value is not None and p_value < 0.05}
                )  # fmt: skip
            for metric in METRICS:
                name = f"{metric}_full"
                rows = {
                    r["arm"]: r[name][0]
                    for r in table
                    if r["style"] == style and r["pairs"] == size
                }
                curve = [
                    (r["pairs"], r[name][0])
                    for r in table
                    if r["style"] == style and r["arm"] == "clip"
                ]
                if "declip" in rows and len(curve) > 1:
                    match = pairs_to_match(curve, rows["declip"])
                    if "clip_pairs" in match:
                        match["ratio"] = match["clip_pairs"] / size
                    ratios.append(
                        {"style": style, "pairs": size, "metric": name, **match}
                    )
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
        "paired": paired,
        "pairs_to_match": ratios,
        "gradient_shares": diagnostics,
    }


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = sorted({r["style"] for r in report["table"]})
    figure, axes = plt.subplots(
        len(styles), len(METRICS), figsize=(5 * len(METRICS), 4 * len(styles)),
        squeeze=False,
    )  # fmt: skip
    colours = {"clip": "tab:blue", "declip": "tab:red"}
    markers = dict(
        zip([a for a in ARMS if a.startswith("declip-")], "sv^D", strict=True)
    )
    for row, style in enumerate(styles):
        for column, metric in enumerate(METRICS):
            axis = axes[row][column]
            rows = [r for r in report["table"] if r["style"] == style]
            for arm, colour in colours.items():
                line = sorted(
                    (r for r in rows if r["arm"] == arm), key=lambda r: r["pairs"]
                )
                if not line:
                    continue
                pairs = [r["pairs"] for r in line]
                mean = np.array([r[f"{metric}_full"][0] for r in line])
                std = np.array([r[f"{metric}_full"][1] for r in line])
                axis.plot(pairs, mean, "o-", color=colour, label=arm.upper())
                axis.fill_between(
                    pairs, mean - std, mean + std, color=colour, alpha=0.2
                )
            for arm, marker in markers.items():
                for r in rows:
                    if r["arm"] == arm:
                        mean, std = r[f"{metric}_full"]
                        axis.errorbar(r["pairs"], mean, std, fmt=marker, color="gray",
                                      label=arm, capsize=3)  # fmt: skip
            axis.axhline(0.1, color="gray", linestyle=":", label="chance")
            axis.set_xscale("log")
            sizes = sorted({r["pairs"] for r in rows})
            axis.set_xticks(sizes, [f"{n:,}" for n in sizes])
            axis.minorticks_off()
            axis.set_xlabel("training pairs")
            axis.set_title(f"{metric} ({style} captions)")
            axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def print_report(report: dict) -> None:
    print(f"\n{'style':9}{'arm':15}{'pairs':>6}" + "".join(f"{m:>20}" for m in METRICS))
    for r in report["table"]:
        cells = "".join(
            f"{100 * r[f'{m}_full'][0]:>13.1f} ± {100 * r[f'{m}_full'][1]:4.1f}"
            for m in METRICS
        )
        print(f"{r['style']:9}{r['arm']:15}{r['pairs']:>6}{cells}")
    print("\npaired DeCLIP - CLIP (points), per seed; p of a one-sample t-test")
    for p in report["paired"]:
        diffs = ", ".join(f"{100 * d:+.1f}" for d in p["differences"])
        p_text = "n/a" if p["p_value"] is None else f"{p['p_value']:.3f}"
        print(f"  {p['style']:9}{p['pairs']:>6} {p['metric']:20} {diffs}  p={p_text}")
    print("\npairs CLIP needs to match DeCLIP (ratio = those pairs / DeCLIP's pairs)")
    for r in report["pairs_to_match"]:
        if "ratio" in r:
            text = f"{r['clip_pairs']:.0f} pairs, ratio {r['ratio']:.2f}"
        elif "below" in r:
            text = f"fewer than {r['below']} (DeCLIP below CLIP's first point)"
        else:
            text = f"more than {r['above']} (DeCLIP above all of CLIP)"
        print(f"  {r['style']:9}{r['pairs']:>6} {r['metric']:20} {text}")


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported
    args.output.mkdir(parents=True, exist_ok=True)
    seeds = [args.seed + i for i in range(args.seeds)]
    runs_file = args.output / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    done = {(r["style"], r["arm"], r["pairs"], r["seed"]) for r in runs}
    started = time.perf_counter()
    for style in args.styles:
        prepared = prepare_style(args.output, style, args.sizes, seeds)
        plan = [(arm, size) for size in args.sizes for arm in ("clip", "declip")]
        if style == "grounded":
            plan += [
                (arm, min(args.sizes)) for arm in ARMS if arm.startswith("declip-")
            ]
        for seed in seeds:
            for arm, size in plan:
                if (style, arm, size, seed) in done:
                    continue  # finished by an earlier, interrupted invocation
                result = run_one(args, style, prepared, arm, size, seed)
                runs.append(result)
                runs_file.write_text(json.dumps(runs, indent=1))
                print(json.dumps({k: v for k, v in result.items()
                                  if k not in ("gradient_shares", "final_terms")}),
                      flush=True)  # fmt: skip
    report = {
        "protocol": {
            "sizes": args.sizes,
            "seeds": seeds,
            "steps": args.steps,
            "batch_size": BATCH_SIZE,
            "styles": args.styles,
            "model": MODEL,
            "prompts": PROMPTS,
            "backend": args.backend,
            "quick": args.quick,
        },  # fmt: skip
        **summarise(runs, args.sizes),
        "runs": runs,
        "minutes_this_invocation": (time.perf_counter() - started) / 60,
    }
    (args.output / "results.json").write_text(json.dumps(report, indent=1))
    plot(report, args.output / "data_efficiency.png")
    print_report(report)
    print(f"\n-> {args.output / 'results.json'}, {args.output / 'data_efficiency.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

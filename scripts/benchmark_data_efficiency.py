"""DeCLIP's headline claim, small: CLIP vs DeCLIP on nested subsets of the pairs.

On the built-in dataset (`declip-keras make-demo-data`), plain CLIP and DeCLIP
are trained with the same encoders, batch size, schedule and number of steps
on nested random subsets of the training pairs (each fraction contains the
smaller ones), for several seeds. Each run is scored on the held-out splits:
zero-shot accuracy on 1,000 unseen digits and emoji retrieval over 1,443
unseen renderings. It writes `results.json` (every run and the mean/std per
point) and `data_efficiency.png` (metric against pairs, one line per method).

    python scripts/benchmark_data_efficiency.py --output bench/

The defaults (4 fractions x 2 methods x 2 seeds of 200 steps, a `tiny` model
shrunk to 32-px images, 8-px patches and 16-token captions) finish in well
under an hour on two CPU cores. Set the backend with KERAS_BACKEND (torch is
fastest on CPU). An interrupted benchmark resumes: finished runs are kept in
`runs.json` and skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from declip_keras.demo_data import CPU_OVERRIDES, DIGIT_PROMPTS, make_demo_data
from declip_keras.eval import evaluate, resolve_classnames, resolve_templates
from declip_keras.records import list_shards
from declip_keras.train import TrainConfig, load_trained_model, train

METRICS = ("digits_top1", "emoji_R@1", "emoji_R@10")


def write_subsets(data: Path, fractions: list[float], out: Path, seed: int) -> dict:
    """Nested subsets: the first n pairs of one fixed permutation, per fraction."""
    records = [raw.numpy() for raw in tf.data.TFRecordDataset(list_shards(str(data)))]
    order = np.random.default_rng(seed).permutation(len(records))
    subsets = {}
    for fraction in fractions:
        count = max(1, round(fraction * len(records)))
        folder = out / f"pairs-{count}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / "part-0.tfrecord"
        if not path.exists():
            with tf.io.TFRecordWriter(str(path)) as writer:
                for index in order[:count]:
                    writer.write(records[index])
        subsets[fraction] = (count, str(path))
    return subsets


def score(run: Path, data: Path) -> dict[str, float]:
    model = load_trained_model(run)
    results = evaluate(
        model,
        zero_shot=str(data / "eval" / "digits.tfrecord"),
        classnames=str(data / "manifest.json"),
        templates=resolve_templates(DIGIT_PROMPTS),
        retrieval=str(data / "eval" / "emoji.tfrecord"),
        batch_size=256,
    )
    retrieval = results["retrieval"]
    return {
        "digits_top1": results["zero_shot"]["top1"],
        # Both directions averaged: each caption names one emoji.
        "emoji_R@1": 0.5
        * (retrieval["image_to_text_R@1"] + retrieval["text_to_image_R@1"]),
        "emoji_R@10": 0.5
        * (retrieval["image_to_text_R@10"] + retrieval["text_to_image_R@10"]),
    }


def plot(table: list[dict], path: Path, chance: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for axis, metric in zip(axes, METRICS, strict=True):
        for method, colour in (("clip", "tab:blue"), ("declip", "tab:red")):
            rows = sorted(
                (r for r in table if r["method"] == method), key=lambda r: r["pairs"]
            )
            pairs = [r["pairs"] for r in rows]
            mean = np.array([r[f"{metric}_mean"] for r in rows])
            std = np.array([r[f"{metric}_std"] for r in rows])
            axis.plot(pairs, mean, "o-", color=colour, label=method.upper())
            axis.fill_between(pairs, mean - std, mean + std, color=colour, alpha=0.2)
        axis.axhline(chance[metric], color="gray", linestyle=":", label="chance")
        axis.set_xscale("log", base=2)
        axis.set_xlabel("training pairs")
        axis.set_title(metric)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="bench", type=Path)
    parser.add_argument("--data", type=Path, help="demo data folder (built if absent)")
    parser.add_argument(
        "--fractions", type=float, nargs="+", default=[0.125, 0.25, 0.5, 1.0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument(
        "--set",
        nargs="*",
        default=list(CPU_OVERRIDES),
        metavar="FIELD=VALUE",
        help="overrides of the tiny preset, shared by both methods",
    )
    args = parser.parse_args()

    from declip_keras.cli import parse_overrides

    overrides = parse_overrides(args.set)
    args.output.mkdir(parents=True, exist_ok=True)
    data = args.data or args.output / "data"
    if not (data / "manifest.json").exists():
        make_demo_data(data)
    subsets = write_subsets(
        data / "train" / "part-*.tfrecord", args.fractions, args.output / "subsets", 0
    )
    runs_file = args.output / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
    done = {(r["method"], r["pairs"], r["seed"]) for r in runs}
    started = time.perf_counter()
    for fraction in args.fractions:
        count, pattern = subsets[fraction]
        for seed in args.seeds:
            for method in ("clip", "declip"):
                if (method, count, seed) in done:
                    continue  # finished by an earlier, interrupted invocation
                run = args.output / "runs" / f"{method}-{count}-seed{seed}"
                began = time.perf_counter()
                train(
                    TrainConfig(
                        data=pattern,
                        output=str(run),
                        overrides=overrides,
                        batch_size=args.batch_size,
                        steps=args.steps,
                        learning_rate=args.learning_rate,
                        declip=method == "declip",
                        checkpoint_every=args.steps,
                        seed=seed,
                    ),
                    verbose=0,
                )
                metrics = score(run, data)
                runs.append(
                    {"method": method, "pairs": count, "seed": seed, **metrics,
                     "seconds": time.perf_counter() - began}
                )  # fmt: skip
                runs_file.write_text(json.dumps(runs, indent=1))
                print(json.dumps(runs[-1]), flush=True)

    table = []
    for method in ("clip", "declip"):
        for count in sorted({r["pairs"] for r in runs}):
            group = [r for r in runs if r["method"] == method and r["pairs"] == count]
            row = {"method": method, "pairs": count, "seeds": len(group)}
            for metric in METRICS:
                values = np.array([r[metric] for r in group])
                row[f"{metric}_mean"] = float(values.mean())
                row[f"{metric}_std"] = float(values.std())
            table.append(row)
    digits = len(resolve_classnames(str(data / "manifest.json")))
    emoji = json.loads((data / "manifest.json").read_text())["eval_emoji"]
    chance = {
        "digits_top1": 1 / digits,
        "emoji_R@1": 1 / emoji,
        "emoji_R@10": 10 / emoji,
    }
    report = {
        "settings": {**vars(args), "output": str(args.output), "data": str(data),
                     "overrides": overrides},
        "chance": chance,
        "table": table,
        "runs": runs,
        "minutes": (time.perf_counter() - started) / 60,
    }  # fmt: skip
    (args.output / "results.json").write_text(json.dumps(report, indent=1, default=str))
    plot(table, args.output / "data_efficiency.png", chance)
    print(f"\n{'method':8}{'pairs':>7}" + "".join(f"{m:>22}" for m in METRICS))
    for row in table:
        cells = "".join(
            f"{row[f'{m}_mean']:>14.3f} ± {row[f'{m}_std']:.3f}" for m in METRICS
        )
        print(f"{row['method']:8}{row['pairs']:>7}{cells}")
    print(f"-> {args.output / 'results.json'}, {args.output / 'data_efficiency.png'}")


if __name__ == "__main__":
    main()

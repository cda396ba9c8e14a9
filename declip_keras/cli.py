"""The `declip-keras` command line.

Each subcommand lives in one `_cmd_*` function. Like `import declip_keras`,
which registers the Keras classes, the command loads Keras before it parses
its arguments (seconds; README gives the times): registration on import
matters more than an instant `--help`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from declip_keras.data.builtin import make_demo_data
from declip_keras.data.pipeline import check_data
from declip_keras.data.records import iterate_examples, list_shards
from declip_keras.data.shards import read_pairs, write_shards
from declip_keras.data.tokenizer import save_vocabulary, train_bpe
from declip_keras.evaluation.metrics import (
    check_targets,
    clip_benchmark_records,
    evaluate,
    target_arguments,
)
from declip_keras.evaluation.sources import (
    EVAL_TARGETS,
    EvaluationTargets,
    dataset_names,
)
from declip_keras.interop.export import ExportError, export_trained
from declip_keras.interop.pretrained import import_checkpoint
from declip_keras.models.declip import DeCLIP
from declip_keras.models.loss_terms import LOSS_TERMS, LOSS_WEIGHTS
from declip_keras.models.presets import PRESETS, parse_overrides, preset_config
from declip_keras.training.config import TrainConfig, resumed_config
from declip_keras.training.files import DiskFullError, save_atomically, write_json
from declip_keras.training.runs import (
    checkpoints,
    load_trained_model,
    model_tokenizer,
    run_files,
)
from declip_keras.training.train import TrainingError, train


def _cmd_presets(args: argparse.Namespace) -> int:
    names = [args.preset] if args.preset else sorted(PRESETS)
    overrides = parse_overrides(args.set)
    for name in names:
        config = preset_config(name, **overrides)
        line = {"preset": name, **config}
        if args.count_parameters:
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
    try:
        counts = check_data(args.pattern)
    except FileNotFoundError as error:
        print(error, file=sys.stderr)
        return 2
    print(json.dumps(counts, indent=2))
    for shard, lost in counts["damaged_shards"].items():
        print(
            f"{shard}: {lost} record(s) unreadable past a damaged record "
            "(a failed checksum); rewrite the shard from its source.",
            file=sys.stderr,
        )
    if not counts["usable"]:
        print(f"No usable pair in {args.pattern!r}.", file=sys.stderr)
        return 1
    return 0


def _cmd_make_demo_data(args: argparse.Namespace) -> int:
    manifest = make_demo_data(args.output, seed=args.seed)
    print(json.dumps({k: v for k, v in manifest.items() if k != "sources"}, indent=2))
    return 0


def _cmd_train_tokenizer(args: argparse.Namespace) -> int:
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
    overrides = parse_overrides(args.set)
    weights = {name: getattr(args, name) for name in LOSS_WEIGHTS}
    overrides.update({k: v for k, v in weights.items() if v is not None})
    preset_config(args.preset, **overrides)  # every value checked before any work
    options = {f.name: getattr(args, f.name) for f in _config_options()}
    resume_from = args.resume if args.resume not in (None, "latest") else None
    config = TrainConfig(**options, overrides=overrides, resume_from=resume_from)
    output = Path(args.output)
    earlier = run_files(output)
    record = output / "config.json"
    if args.resume and not resume_from and record.is_file():
        # The run's own settings, with what this command line changes.
        given = _given_options(args, args.argv)
        if overrides:
            given["overrides"] = overrides
        config = resumed_config(json.loads(record.read_text()), given, str(record))
    if args.resume:
        if not checkpoints(output) and not resume_from:
            print(f"--resume: no checkpoint in {output}; starting a new run.")
    elif earlier and not args.overwrite:
        names = ", ".join(p.name for p in earlier[:4])
        raise FileExistsError(
            f"{output} holds an earlier run ({names}): pass --resume to continue "
            "it or --overwrite to replace it, or choose another --output."
        )
    replace = bool(earlier and args.overwrite and not args.resume)
    summary = train(config, overwrite=replace)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}, indent=2))
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    targets = EvaluationTargets(**{name: getattr(args, name) for name in EVAL_TARGETS})
    if not targets.sources:
        raise ValueError(
            "nothing to evaluate: give --zero-shot, --retrieval and/or --probe."
        )
    template = args.clip_benchmark_output
    if template:  # checked before the evaluation's minutes, not after
        try:
            template.format(dataset="d", task="t", model="m", pretrained="p")
        except (KeyError, IndexError, ValueError) as error:
            raise ValueError(
                f"--clip-benchmark-output {template!r}: the placeholders are "
                "{dataset}, {task}, {model} and {pretrained}."
            ) from error
    model = load_trained_model(args.model)
    # Before the tokenizer and the first embeddings, not after them.
    check_targets(targets, args.image_root, args.split)
    tokenizer = model_tokenizer(model, args.model, args.vocabulary)
    results = evaluate(
        model,
        **target_arguments(targets),
        batch_size=args.batch_size,
        image_root=args.image_root,
        split=args.split,
        tokenizer=tokenizer,
    )
    print(json.dumps(results, indent=2))
    if args.output:
        write_json(Path(args.output), results)
    if template:
        # A dataset's name: the named class-name set, else the folder of a
        # shard glob, or the file or folder name.
        datasets = {}
        for name, source in targets.sources.items():
            if name == "linear_probe":
                source = source[1]  # the probe's figures are on its test set
            path = Path(str(source).rstrip("/"))
            datasets[name] = path.parent.name if "*" in path.name else path.stem
        if targets.classnames in dataset_names():
            datasets["zero_shot"] = args.classnames
        for record in clip_benchmark_records(results, str(args.model), datasets):
            path = Path(template.format(**record))
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, record)
            print(f"CLIP_benchmark result: {path}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    info = export_trained(
        args.model, args.output, args.version, args.vocabulary, args.overwrite
    )
    print(json.dumps(info, indent=2))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if output.suffix != ".keras":
        raise ValueError(f"{output}: the output is a .keras file.")
    if output.exists() and not args.overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it.")
    model = import_checkpoint(args.checkpoint, args.preset, **parse_overrides(args.set))
    save_atomically(model, output)
    print(
        f"{args.checkpoint} -> {output}: {model.count_params():,} parameters, "
        f"image size {model.image_encoder.image_size}, context "
        f"{model.text_encoder.context_length}"
    )
    return 0


def _config_options(names: Sequence[str] | None = None) -> list[dataclasses.Field]:
    """The `TrainConfig` fields that are options of their own (all, or `names`)."""
    return [
        field
        for field in dataclasses.fields(TrainConfig)
        if field.metadata.get("cli", True) and (names is None or field.name in names)
    ]


def _flags(field: dataclasses.Field) -> list[str]:
    """A field's option strings, its aliases and (last) a switch's --no- form."""
    name = field.name.replace("_", "-")
    return [f"--{name}", *field.metadata.get("aliases", ()), f"--no-{name}"]


def _given_options(
    args: argparse.Namespace, argv: Sequence[str]
) -> dict[str, typing.Any]:
    """The `TrainConfig` fields this command line sets: those whose value is
    not the default, and those spelt out (a default given explicitly)."""
    spelt = {token.split("=")[0] for token in argv if token.startswith("--")}
    given = {}
    for field in _config_options():
        value = getattr(args, field.name)
        default = None if field.default is dataclasses.MISSING else field.default
        if value != default or spelt & set(_flags(field)):
            given[field.name] = value
    return given


def _add_config_options(
    parser: argparse.ArgumentParser, names: Sequence[str] | None = None
) -> None:
    """One option per `TrainConfig` field, with its type, default and help."""
    types = typing.get_type_hints(TrainConfig)
    for field in _config_options(names):
        hint = types[field.name]
        # `int | None` -> int: None means "not given" for an optional field.
        kind = next((t for t in typing.get_args(hint) if t is not type(None)), hint)
        names = _flags(field)[:-1]  # a switch's --no- form comes with its action
        required = field.default is dataclasses.MISSING
        # A switch reads as --name / --no-name, not --name True.
        if kind is bool:
            value = {"action": argparse.BooleanOptionalAction}
        elif "nargs" in field.metadata:
            value = {"nargs": field.metadata["nargs"], "type": str}
        else:
            value = {"type": kind, "choices": field.metadata.get("choices")}
        if "metavar" in field.metadata:
            value["metavar"] = field.metadata["metavar"]
        parser.add_argument(
            *names,
            dest=field.name,
            required=required,
            default=None if required else field.default,
            help=field.metadata["help"],
            **value,
        )


def _add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="change a preset field (see `declip-keras presets`); repeatable",
    )


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="declip-keras",
        description="DeCLIP pretraining and evaluation on Keras 3. "
        "Choose the backend with KERAS_BACKEND=jax|tensorflow|torch "
        "(Keras' default: tensorflow).",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--debug", action="store_true", help="show tracebacks of errors"
    )
    subparsers = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        return subparsers.add_parser(name, help=summary, formatter_class=_HelpFormatter)

    presets = command(
        "presets",
        "print model presets, architectures with random weights (one JSON object "
        "per line); pretrained weights come from `import`",
    )
    presets.add_argument("preset", nargs="?", help="one preset; all when omitted")
    _add_set_option(presets)
    presets.add_argument(
        "--count-parameters",
        action="store_true",
        help="build each model and count its parameters",
    )
    presets.set_defaults(func=_cmd_presets)

    convert = command(
        "make-tfrecords",
        "convert image-caption pairs (CSV/TSV, JSON lines, img2dataset) to shards",
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

    check = command(
        "check-data",
        "read every record as training does; count usable and skipped",
    )
    check.add_argument("pattern", help="shard glob, e.g. 'data/part-*.tfrecord'")
    check.set_defaults(func=_cmd_check_data)

    demo = command(
        "make-demo-data", "build the built-in emoji + MNIST dataset (offline)"
    )
    demo.add_argument("output", help="folder for train/, eval/ and manifest.json")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_cmd_make_demo_data)

    vocab = command(
        "train-tokenizer", "train a BPE vocabulary on the captions of shards"
    )
    vocab.add_argument("pattern", help="shard glob")
    vocab.add_argument("output", help="folder for vocab.json and merges.txt")
    vocab.add_argument("--vocabulary-size", type=int, default=8192)
    vocab.set_defaults(func=_cmd_train_tokenizer)

    fit = command("train", "pretrain DeCLIP (or the plain CLIP baseline) on shards")
    _add_config_options(fit)
    _add_set_option(fit)
    for term in LOSS_TERMS:
        fit.add_argument(
            f"--{term.weight.replace('_', '-')}",
            type=float,
            help=f"weight of {term.summary} (the preset's {term.weight}; a --set "
            "shortcut)",
        )
    fit.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="latest|PATH",
        help="continue the run in --output (latest, the default), or start "
        "from the checkpoint or run folder PATH",
    )
    fit.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an earlier run in --output instead of refusing",
    )
    fit.set_defaults(func=_cmd_train)

    evaluation = command("eval", "zero-shot classification, retrieval and linear probe")
    evaluation.add_argument("model", help="model.keras, a checkpoint or a run folder")
    _add_config_options(evaluation, EVAL_TARGETS)
    evaluation.add_argument("--image-root", help="images of the Karpathy JSON")
    evaluation.add_argument("--split", default="test", help="Karpathy split")
    evaluation.add_argument("--batch-size", type=int, default=128)
    evaluation.add_argument(
        "--vocabulary",
        help="tokenizer folder from train-tokenizer (default: the run's, else CLIP's)",
    )
    evaluation.add_argument("--output", help="write the results JSON here")
    evaluation.add_argument(
        "--clip-benchmark-output",
        metavar="TEMPLATE",
        help="also write one CLIP_benchmark result file per task, e.g. "
        "'results/{dataset}_{task}.json'",
    )
    evaluation.set_defaults(func=_cmd_eval)

    exporting = command(
        "export",
        "SavedModel with encode_image / encode_text (+ the towers as .keras)",
    )
    exporting.add_argument("model", help="model.keras, a checkpoint or a run folder")
    exporting.add_argument("output", help="export folder")
    exporting.add_argument(
        "--version", type=int, default=1, help="SavedModel folder under saved_model/"
    )
    exporting.add_argument(
        "--vocabulary",
        help="tokenizer folder from train-tokenizer (default: the run's, else CLIP's)",
    )
    exporting.add_argument(
        "--overwrite", action="store_true", help="replace an existing export"
    )
    exporting.set_defaults(func=_cmd_export)

    importing = command(
        "import",
        "a pretrained checkpoint (OpenAI/OpenCLIP ViT .pt, .bin, .safetensors; "
        "a released DeCLIP ViT checkpoint; a keras-hub CLIP preset folder) as "
        "a DeCLIP .keras file, for eval, export or train --init-from",
    )
    importing.add_argument("checkpoint", help="the CLIP checkpoint file")
    importing.add_argument("output", help="the .keras file to write")
    importing.add_argument(
        "--preset",
        default="vitb32",
        choices=sorted(PRESETS),
        help="fields the checkpoint does not fix (heads, queue, loss weights)",
    )
    _add_set_option(importing)
    importing.add_argument(
        "--overwrite", action="store_true", help="replace an existing file"
    )
    importing.set_defaults(func=_cmd_import)
    return parser


def _newest_checkpoint(args: argparse.Namespace) -> str:
    """For a stopped `train`: where `--resume` would continue from."""
    if args.command != "train":
        return ""
    found = checkpoints(Path(args.output))
    if not found:
        return "; no checkpoint was written"
    return f"; the newest checkpoint is {found[-1]} (--resume continues from it)"


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; a user's mistake is one line on stderr and exit 2, a
    run that could not succeed exit 1 (`--debug` shows the traceback)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # which options were spelt out, for --resume
    try:
        return args.func(args)
    except KeyboardInterrupt:
        # Every file is written atomically: what a Ctrl-C cut off is only the
        # steps since the newest checkpoint.
        where = _newest_checkpoint(args)
        print(f"declip-keras {args.command}: interrupted{where}.", file=sys.stderr)
        return 130
    except DiskFullError as error:
        where = _newest_checkpoint(args)
        print(f"declip-keras {args.command}: error: {error}{where}.", file=sys.stderr)
        return 1
    except Exception as error:
        failed_runs = (TrainingError, ExportError)
        # A missing optional package names the extra that installs it.
        user_errors = (ValueError, FileNotFoundError, FileExistsError, ImportError)
        if args.debug or not isinstance(error, (*user_errors, *failed_runs)):
            raise
        print(f"declip-keras {args.command}: error: {error}", file=sys.stderr)
        return 1 if isinstance(error, failed_runs) else 2


if __name__ == "__main__":
    sys.exit(main())

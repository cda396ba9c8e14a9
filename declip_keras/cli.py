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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="declip-keras",
        description="DeCLIP pretraining and evaluation on Keras 3. "
        "Choose the backend with KERAS_BACKEND=jax|tensorflow|torch.",
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

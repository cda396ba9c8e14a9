from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from declip_keras.cli import build_parser, main
from declip_keras.training.config import TrainConfig


def test_presets_command_prints_overridden_config_and_counts(capsys):
    assert (
        main(["presets", "tiny", "--set", "vocabulary_size=500", "--count-parameters"])
        == 0
    )
    line = json.loads(capsys.readouterr().out)
    assert line["preset"] == "tiny" and line["vocabulary_size"] == 500
    counts = line["parameters"]
    assert counts["total"] > counts["image_encoder"] + counts["text_encoder"] > 0


def test_presets_command_rejects_unknown_fields(capsys):
    assert main(["presets", "tiny", "--set", "depth=3"]) == 2
    assert "no field(s) ['depth']" in capsys.readouterr().err


BAD_ARGUMENTS = [
    (["--steps", "-5"], "steps must be positive"),
    (["--steps", "0"], "steps must be positive"),
    (["--keep-checkpoints", "-1"], "keep_checkpoints must be positive"),
    (["--checkpoint-every", "0"], "checkpoint_every must be positive"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--set", "embed_dim=abc"], "embed_dim takes a value like"),
    (["--set", "depth=3"], "no field"),
    (["--clip-weight", "-1"], "clip_weight takes a value like"),
    (["--accum-steps", "0"], "accum_steps must be positive"),
    (
        ["--batch-size", "8", "--accum-steps", "3"],
        "does not split over 1 device(s) x 3 micro-batch",
    ),
    (["--set", "accum_steps=2"], "with --accum-steps, not --set"),
    (["--beta2", "1"], "beta2 must be at least 0 and below 1, got 1.0"),
    (["--eps", "0"], "eps must be positive"),
    (["--eval-every", "-2", "--zero-shot", "z"], "eval_every (-2) must be a positive"),
    (["--set", "patch_size=7"], "image_size 64 is not a multiple of patch_size 7"),
    (["--vocabulary", "/nonexistent"], "No tokenizer in /nonexistent (no "),
]


@pytest.mark.backend_independent
@pytest.mark.parametrize("extra, message", BAD_ARGUMENTS)
def test_bad_train_arguments_fail_before_anything_is_written(
    extra, message, shape_shards, tmp_path, capsys
):
    output = tmp_path / "run"
    args = ["train", "--data", shape_shards, "--output", str(output), *extra]
    assert main(args) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") == 1
    assert not output.exists()


@pytest.mark.backend_independent
def test_presets_rejects_values_of_the_wrong_type(capsys):
    assert main(["presets", "tiny", "--set", "embed_dim=abc"]) == 2
    assert "embed_dim takes a value like 128" in capsys.readouterr().err


@pytest.mark.backend_independent
def test_the_console_command_answers_help_and_argument_errors():
    """The installed `declip-keras` script, as a user types it."""
    script = Path(sys.executable).with_name("declip-keras")
    helped = subprocess.run([script, "--help"], capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr[-3000:]
    assert helped.stdout.startswith("usage: declip-keras")
    assert all(command in helped.stdout for command in ("train", "eval", "export"))
    wrong = subprocess.run(
        [script, "train", "--steps", "x"], capture_output=True, text=True
    )
    assert wrong.returncode == 2
    assert "argument --steps: invalid int value: 'x'" in wrong.stderr
    assert "Traceback" not in wrong.stderr


@pytest.mark.backend_independent
def test_train_options_mirror_train_config_and_take_openclip_names():
    parser = build_parser()
    long_names = parser.parse_args(
        ["train", "--data", "d", "--output", "o", "--learning-rate", "0.01",
         "--weight-decay", "0", "--warmup-steps", "5", "--method", "clip"]
    )  # fmt: skip
    openclip = parser.parse_args(
        ["train", "--train-data", "d", "--output", "o", "--lr", "0.01", "--wd",
         "0", "--warmup", "5", "--method", "clip"]
    )  # fmt: skip
    assert vars(long_names) == vars(openclip)
    defaults = parser.parse_args(["train", "--data", "d", "--output", "o"])
    config = TrainConfig(data="d", output="o")
    names = ("batch_size", "learning_rate", "method", "precision", "seed")
    for name in (*names, "device_augmentation"):
        assert getattr(defaults, name) == getattr(config, name)
    # A switch is --name / --no-name.
    switched = ["train", "--data", "d", "--output", "o", "--device-augmentation"]
    assert parser.parse_args(switched).device_augmentation is True
    assert (
        parser.parse_args(["train", "--data", "d", "--output", "o", "--resume"]).resume
        == "latest"
    )
    train_help = parser._subparsers._group_actions[0].choices["train"].format_help()
    assert "(default: 64)" in train_help and "tiny32" in train_help


@pytest.mark.backend_independent
def test_ordinary_mistakes_are_one_line_without_traceback(tmp_path):
    """Through `python -m declip_keras`, as a user meets them."""
    cases = [
        ["train", "--data", str(tmp_path / "nothing-*.tfrecord"), "--output", "r"],
        ["eval", str(tmp_path / "missing.keras"), "--zero-shot", "x"],
        ["export", str(tmp_path / "missing"), str(tmp_path / "export")],
    ]
    for args in cases:
        done = subprocess.run(
            [sys.executable, "-m", "declip_keras", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"declip-keras {args[0]}: error:")
        assert ("nothing-" in last) or ("missing" in last)

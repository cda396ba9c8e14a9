from __future__ import annotations

import json
import subprocess
import sys

import keras
import pytest

from declip_keras.cli import main, parse_overrides

tf_only = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="backend-independent; run once"
)


def test_parse_overrides_reads_literals_and_strings():
    parsed = parse_overrides(
        ["embed_dim=256", "vision_layers=(1, 2)", "image_encoder=vit"]
    )
    assert parsed == {"embed_dim": 256, "vision_layers": (1, 2), "image_encoder": "vit"}
    with pytest.raises(SystemExit):
        parse_overrides(["embed_dim"])


def test_presets_command_prints_overridden_config_and_counts(capsys):
    assert (
        main(["presets", "tiny", "--set", "vocabulary_size=500", "--count-parameters"])
        == 0
    )
    line = json.loads(capsys.readouterr().out)
    assert line["preset"] == "tiny" and line["vocabulary_size"] == 500
    counts = line["parameters"]
    assert counts["total"] > counts["image_encoder"] + counts["text_encoder"] > 0


def test_presets_command_rejects_unknown_fields():
    with pytest.raises(SystemExit, match="no field"):
        main(["presets", "tiny", "--set", "depth=3"])


BAD_ARGUMENTS = [
    (["--steps", "-5"], "steps must be positive"),
    (["--steps", "0"], "steps must be positive"),
    (["--keep-checkpoints", "-1"], "keep_checkpoints must be positive"),
    (["--checkpoint-every", "0"], "checkpoint_every must be positive"),
    (["--batch-size", "0"], "batch_size must be positive"),
    (["--set", "embed_dim=abc"], "embed_dim takes a value like"),
    (["--set", "depth=3"], "no field"),
    (["--clip-weight", "-1"], "clip_weight takes a value like"),
]


@tf_only
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


@tf_only
def test_presets_rejects_values_of_the_wrong_type():
    with pytest.raises(SystemExit, match="embed_dim takes a value like 128"):
        main(["presets", "tiny", "--set", "embed_dim=abc"])


@tf_only
def test_ordinary_mistakes_are_one_line_without_traceback(tmp_path):
    """Through the installed entry point, as a user meets them."""
    cases = [
        ["train", "--data", str(tmp_path / "nothing-*.tfrecord"), "--output", "r"],
        ["eval", str(tmp_path / "missing.keras"), "--zero-shot", "x"],
        ["export", str(tmp_path / "missing"), str(tmp_path / "export")],
    ]
    for args in cases:
        done = subprocess.run(
            [sys.executable, "-m", "declip_keras.cli", *args],
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"declip-keras {args[0]}: error:")
        assert ("nothing-" in last) or ("missing" in last)

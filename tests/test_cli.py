from __future__ import annotations

import json

import pytest

from declip_keras.cli import main, parse_overrides


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

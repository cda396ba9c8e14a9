"""The data-efficiency benchmark's machinery (not its outcome), end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# It starts its own torch process; its pass is the lightest's, TensorFlow's.
@pytest.mark.one_backend("tensorflow", reason="one run, on torch, is enough")
@pytest.mark.slow
def test_data_efficiency_quick_run_writes_every_part_of_the_report(tmp_path):
    script = ROOT / "scripts" / "benchmark_data_efficiency.py"
    command = [sys.executable, str(script), "--quick", "--output", str(tmp_path)]
    command += ["--backend", "torch", "--seed", "7"]
    subprocess.run(command, check=True, capture_output=True, env=dict(os.environ))
    report = json.loads((tmp_path / "results.json").read_text())
    assert (tmp_path / "data_efficiency.png").stat().st_size > 10_000
    runs = report["runs"]
    arms = {r["arm"] for r in runs}
    assert arms == {
        "clip", "declip", "declip-no-mvs", "declip-no-ss", "declip-no-mlm",
        "declip-no-nns",
    }  # fmt: skip
    # Ablations on the named digits only, as --quick asks.
    assert {r["style"] for r in runs if r["arm"].startswith("declip-")} == {"named"}
    assert {r["seed"] for r in runs} == {7}
    assert {r["style"] for r in runs} == {"named", "emoji"}
    for run in runs:
        # Evaluated every 2 of the 4 steps; "best" is the curve's maximum.
        assert [point["step"] for point in run["curve"]] == [2, 4]
        if run["style"] == "emoji":
            metrics = ("image_to_text_r1", "image_to_text_r5", "text_to_image_r5")
        else:
            metrics = ("zero_shot", "zero_shot_ood", "linear_probe")
        for metric in metrics:
            values = [point[metric] for point in run["curve"]]
            assert all(0.0 <= v <= 1.0 for v in values)
            assert run[f"{metric}_last"] == values[-1]
            assert run[f"{metric}_best"] == max(values)
        assert 0.0 <= run["nn_agreement"] <= 1.0
        assert all(len(values) == 2 for values in run["terms"].values())
        # The SimSiam spread is measured where there is a projector.
        has_projector = run["arm"] not in ("clip", "declip-no-ss")
        assert ("simsiam_spread" in run["curve"][-1]) == has_projector
    # Gradient shares at step 0 of every DeCLIP arm: each tower's shares sum
    # to 1 and a removed term has none.
    for run in runs:
        if run["arm"] == "clip":
            assert run["gradient_shares"] == []
            continue
        first = run["gradient_shares"][0]
        assert first["step"] == 0
        for tower in ("image", "text"):
            assert sum(first["shares"][tower].values()) == pytest.approx(1.0)
        if run["arm"] == "declip-no-mlm":
            assert "mlm_loss" not in first["shares"]["text"]
    # 2 styles x 2 sizes x 3 metrics x (last, best).
    assert len(report["paired"]) == len(report["pairs_to_match"]) == 2 * 2 * 3 * 2
    assert {r["arm"] for r in report["table"]} == arms
    assert {(c["arm"], c["pairs"]) for c in report["curves"]} == {
        (r["arm"], r["pairs"]) for r in runs
    }
    assert (tmp_path / "curves.png").stat().st_size > 10_000
    # A runs.json of another protocol is refused in one line, before any work.
    command[command.index("torch")] = "tensorflow"
    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"{tmp_path / 'runs.json'} holds runs of another protocol (steps, model, "
        "augmentations or backend); give a new --output."
    ]


@pytest.mark.backend_independent
def test_pairs_to_match_interpolates_clips_curve_in_log_pairs():
    """Between two of CLIP's sizes, linear in log(pairs): halfway from 0.2 at
    100 pairs to 0.6 at 1000 pairs is sqrt(100 * 1000); outside, the end."""
    import importlib.util

    path = ROOT / "scripts" / "benchmark_data_efficiency.py"
    spec = importlib.util.spec_from_file_location("benchmark_data_efficiency", path)
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    curve = [(1000, 0.6), (100, 0.2)]
    match = benchmark.pairs_to_match(curve, 0.4)
    assert match["clip_pairs"] == pytest.approx((100 * 1000) ** 0.5)
    assert benchmark.pairs_to_match(curve, 0.1) == {"below": 100}
    assert benchmark.pairs_to_match(curve, 0.7) == {"above": 1000}


@pytest.mark.parametrize(
    ("mode", "extra"), [("clip", []), ("declip", ["--device-augmentation"])]
)
@pytest.mark.slow
def test_step_benchmark_reports_speed_memory_and_flops(mode, extra, tmp_path):
    """At tiny shapes on the active backend; the figures are only sanity-checked
    (timing targets live in the benchmark's output, not in tests). The DeCLIP
    run also writes the backend's per-op trace."""
    if extra:
        extra = [*extra, "--profile", str(tmp_path / "trace")]
    script = ROOT / "scripts" / "benchmark_step.py"
    command = [sys.executable, str(script), "--preset", "tiny32", "--mode", mode]
    command += ["--set", "vision_layers=1", "--set", "text_layers=1", "--json"]
    command += ["--batch-size", "8", "--steps", "1", "--repeats", "1"]
    command += ["--caption-tokens", "8", "--peak-tflops", "1", *extra]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    result = json.loads(next(line for line in lines if line.startswith("{")))
    assert result["text_length"] == 16  # the smallest bucket, capped at the context
    assert result["device_augmentation"] == bool(extra)
    assert result["pairs_per_second"] > 0 and result["ms_per_step"] > 0
    assert result["peak_memory_gib"] > 0
    assert 0 < result["mfu"] < 1 and result["model_tflops_per_step"] > 0
    if extra:
        assert [p for p in (tmp_path / "trace").rglob("*") if p.is_file()]


def test_transformer_flops_match_a_direct_count():
    """The benchmark's formula against the matmuls of one block written out."""
    sys.path.insert(0, str(ROOT / "scripts"))
    from benchmark_step import transformer_flops

    tokens, width = 10, 32
    projections = 4 * (2 * tokens * width * width)  # q, k, v, out
    mlp = 2 * (2 * tokens * width * 4 * width)
    attention = 2 * (2 * tokens * tokens * width)  # scores, then mixing
    assert transformer_flops(tokens, width, 3) == 3 * (projections + mlp + attention)


@pytest.mark.backend_independent
def test_referee_names_what_is_missing_in_one_line(tmp_path):
    """Checked before any work, without the released code installed."""
    script = ROOT / "scripts" / "released_referee.py"

    def refusal(*extra):
        command = [sys.executable, str(script), "--bench", str(tmp_path), *extra]
        done = subprocess.run(command, capture_output=True, text=True)
        assert done.returncode == 1
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1
        return lines[0]

    src = ["--src", str(tmp_path / "src"), "--python", sys.executable]
    assert refusal(*src) == (
        f"{tmp_path / 'runs.json'} does not exist: run "
        "scripts/benchmark_data_efficiency.py first."
    )
    (tmp_path / "runs.json").write_text('{"protocol": {}, "runs": []}')
    assert refusal(*src) == (
        f"{tmp_path / 'src'} is not the released DeCLIP tree (no "
        "prototype/model/declip.py)."
    )
    (tmp_path / "src" / "prototype" / "model").mkdir(parents=True)
    (tmp_path / "src" / "prototype" / "model" / "declip.py").write_text("")
    line = refusal(*src)
    # The project's own environment never has the released code's extras.
    assert line.startswith(f"{sys.executable} lacks ") and "textaugment" in line
    assert line.endswith("see requirements/referee.txt.")

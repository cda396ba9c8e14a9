from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from helpers import COLOURS, flip_byte_in_record, to_numpy

from declip_keras.backend import Replicas
from declip_keras.cli import main
from declip_keras.data import checks
from declip_keras.evaluation.metrics import headline_metrics
from declip_keras.training import callbacks, runs
from declip_keras.training import train as training
from declip_keras.training.config import TrainConfig

SMALL = [
    "image_size=32",
    "context_length=16",
    "queue_size=64",
    "vision_layers=1",
    "text_layers=1",
]


def _cli_train(data, output, *extra, checkpoint_every: str | None = "2") -> int:
    args = ["train", "--data", data, "--output", str(output), "--batch-size", "8"]
    if checkpoint_every:
        args += ["--checkpoint-every", checkpoint_every]
    args += extra
    for item in SMALL:
        args += ["--set", item]
    return main(args)


@pytest.mark.slow
def test_cli_train_end_to_end(shape_shards, tmp_path):
    output = tmp_path / "run"
    args = ("--steps", "4", "--keep-checkpoints", "1", "--accum-steps", "2")
    assert _cli_train(shape_shards, output, *args) == 0
    summary = json.loads((output / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["data"]["pairs_trained"] == 32
    assert summary["data"]["records_decoded"] >= 32
    assert sum(summary["data"]["skipped"].values()) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["total_steps"] == 4 and config["model"]["image_size"] == 32
    assert config["model"]["accum_steps"] == 2  # the towers ran in halves
    assert [p.name for p in runs.checkpoints(output)] == ["ckpt-00000004.keras"]
    assert list((output / "logs").rglob("events.out.tfevents*"))
    model = keras.models.load_model(output / "model.keras")
    assert int(to_numpy(model.queue.pointer)) == (4 * 16) % 64
    # A fresh process can load what training wrote, with the package's loader
    # or with Keras' once the model class is imported.
    path = str(output / "model.keras")
    for load in (
        "import declip_keras; declip_keras.load_trained_model(PATH)",
        "import keras; from declip_keras import DeCLIP; keras.models.load_model(PATH)",
    ):
        load = load.replace("PATH", repr(path))
        subprocess.run([sys.executable, "-c", load], check=True, capture_output=True)
    # A second run into the same folder must ask for --resume.
    assert _cli_train(shape_shards, output, *args) == 2


def test_cli_clip_baseline_with_a_trained_vocabulary(
    shape_shards, tmp_path, monkeypatch, capsys
):
    """`--clip` defaults to crop-only views; `--vocabulary` sizes the text tower
    and the run remembers it (from any directory) for `eval` and `export`,
    which refuse a tokenizer of another size; AdamW's moments are the
    options'."""
    vocab = tmp_path / "vocab"
    assert (
        main(["train-tokenizer", shape_shards, str(vocab), "--vocabulary-size", "600"])
        == 0
    )
    size = len(json.loads((vocab / "vocab.json").read_text()))
    output = tmp_path / "clip"
    monkeypatch.chdir(tmp_path)  # the vocabulary given relative to it
    args = ("--method", "clip", "--vocabulary", "vocab", "--steps", "2")
    args += ("--beta1", "0.8", "--beta2", "0.95", "--eps", "1e-6")
    assert _cli_train(shape_shards, output, *args) == 0
    config = json.loads((output / "config.json").read_text())
    assert config["augmentation"] == "crop" and config["vocabulary"] == str(vocab)
    assert config["model"]["vocabulary_size"] == size
    # config.json describes the model that was built: the baseline's weights.
    assert config["model"]["ss_weight"] == config["model"]["nn_weight"] == 0.0
    assert config["model"]["clip_weight"] == 1.0
    assert runs.run_vocabulary(output) == str(vocab)
    model = runs.load_trained_model(output)
    assert model.text_encoder.vocabulary_size == size
    assert model.ss_weight == model.mlm_weight == model.nn_weight == 0.0
    optimizer = keras.models.load_model(output / "model.keras").optimizer
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.epsilon) == (0.8, 0.95, 1e-6)
    # `eval` finds the run's tokenizer from a file of the run, from another
    # directory; a copy outside the run would be fed CLIP's BPE (49,409 ids):
    # refused in one line before any embedding or export.
    monkeypatch.chdir(output)
    retrieval = ["--retrieval", shape_shards]
    assert main(["eval", str(output / "model.keras"), *retrieval]) == 0
    alone = tmp_path / "alone.keras"
    shutil.copy(output / "model.keras", alone)
    capsys.readouterr()
    for command in (["eval", str(alone), *retrieval],
                    ["export", str(alone), str(tmp_path / "export")]):  # fmt: skip
        assert main(command) == 2
        assert capsys.readouterr().err.strip().splitlines() == [
            f"declip-keras {command[0]}: error: {alone}: the text tower takes "
            f"{size} token ids but the tokenizer (CLIP's BPE) has 49409; give the "
            "tokenizer folder the model was trained with (--vocabulary)."
        ]
    assert not (tmp_path / "export").exists()


def _config(data, output, steps=4):
    overrides = {
        "image_size": 32,
        "context_length": 16,
        "queue_size": 64,
        "vision_layers": 1,
        "text_layers": 1,
    }
    return TrainConfig(
        data=data,
        output=str(output),
        batch_size=8,
        steps=steps,
        checkpoint_every=2,
        overrides=overrides,
        seed=3,
    )


class Killed(Exception):
    pass


@pytest.mark.skipif(
    keras.backend.backend() == "tensorflow",
    reason="runs on jax (whose state sync checkpoints depend on) and torch",
)
@pytest.mark.slow
def test_resume_after_a_kill_matches_an_uninterrupted_run(
    shape_shards, tmp_path, monkeypatch
):
    # All five terms: masks are seeded per batch, so a resumed stream repeats them.
    full = training.train(_config(shape_shards, tmp_path / "full"), verbose=0)
    full_model = keras.models.load_model(tmp_path / "full" / "model.keras")

    save = runs.save_checkpoint

    def save_then_die(model, folder, step):
        save(model, folder, step)
        raise Killed(step)  # the process dies right after its first checkpoint

    monkeypatch.setattr(callbacks, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        training.train(_config(shape_shards, tmp_path / "resumed"), verbose=0)
    monkeypatch.setattr(callbacks, "save_checkpoint", save)
    assert [p.name for p in runs.checkpoints(tmp_path / "resumed")] == [
        "ckpt-00000002.keras"
    ]
    resumed = training.train(_config(shape_shards, tmp_path / "resumed"), verbose=0)
    resumed_model = keras.models.load_model(tmp_path / "resumed" / "model.keras")

    assert resumed["steps"] == full["steps"] == 4
    # The resumed run trained steps 3-4 only; its loss equals the full run's there.
    np.testing.assert_allclose(
        resumed["history"]["loss"], full["history"]["loss"][-1:], rtol=1e-4
    )
    for name in ("queue",):
        a, b = getattr(full_model, name), getattr(resumed_model, name)
        np.testing.assert_allclose(
            to_numpy(a.features), to_numpy(b.features), atol=1e-5
        )
        assert int(to_numpy(a.pointer)) == int(to_numpy(b.pointer))
    for a, b in zip(
        full_model.optimizer.variables, resumed_model.optimizer.variables, strict=True
    ):
        np.testing.assert_allclose(to_numpy(a), to_numpy(b), rtol=1e-4, atol=1e-6)


def test_divergence_stops_without_overwriting_the_good_checkpoint(
    shape_shards, tmp_path
):
    config = _config(shape_shards, tmp_path / "nan", steps=4)
    config.learning_rate = 1e9  # blows up after the first period
    with pytest.raises(RuntimeError, match="diverged"):
        training.train(config, verbose=0)
    names = [p.name for p in runs.checkpoints(tmp_path / "nan")]
    assert "ckpt-00000004.keras" not in names


def test_load_trained_model_finds_the_model_of_a_run_folder(tmp_path):
    from helpers import small_model

    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match="neither model.keras"):
        (run / "checkpoints").mkdir(parents=True)
        runs.load_trained_model(run)
    for step, queue_size in ((5, 32), (10, 48)):
        small_model(queue_size=queue_size).save(
            run / "checkpoints" / f"ckpt-{step:08d}.keras"
        )
    assert runs.load_trained_model(run).queue.size == 48  # the newest
    small_model(queue_size=16).save(run / "model.keras")
    assert runs.load_trained_model(run).queue.size == 16  # the final model
    with pytest.raises(FileNotFoundError, match="missing.keras"):
        runs.load_trained_model(tmp_path / "missing.keras")


# --- what a run guarantees: no silent success, no poisoned checkpoint ----------

writes_weights_mid_fit = pytest.mark.skipif(
    keras.backend.backend() == "jax",
    reason="a callback cannot write JAX's training state in the middle of fit",
)


class PoisonAfterStep(callbacks.TrainingMonitor):
    """Makes the update of chosen steps non-finite while their loss is finite:
    what a NaN gradient on the last step of a checkpoint period does."""

    steps: tuple[int, ...] = ()

    def on_train_batch_end(self, batch, logs=None):
        super().on_train_batch_end(batch, logs)
        if runs.completed_steps(self.model) in self.steps:
            variable = self.model.image_encoder.trainable_variables[-1]
            variable.assign(keras.ops.full(variable.shape, float("nan")))


def _checkpoints_are_finite(output) -> None:
    for path in runs.checkpoints(output):
        assert runs.all_finite(keras.models.load_model(path)), path


@writes_weights_mid_fit
def test_a_nan_update_is_never_checkpointed_and_stop_fails_the_run(
    shape_shards, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(PoisonAfterStep, "steps", (4,))
    monkeypatch.setattr(training, "TrainingMonitor", PoisonAfterStep)
    output = tmp_path / "stop"
    assert _cli_train(shape_shards, output, "--steps", "6") == 1
    error = capsys.readouterr().err
    assert "diverged at step 4" in error and "--on-divergence rollback" in error
    assert "ckpt-00000002.keras" in error  # the last good one
    assert [p.name for p in runs.checkpoints(output)] == ["ckpt-00000002.keras"]
    assert not (output / "model.keras").exists()
    _checkpoints_are_finite(output)


# The rollback is `train`'s own logic over Keras' saving and loading, which
# test_declip's save-and-load test covers per backend; TensorFlow's pass
# would add nothing.
rolls_back = pytest.mark.one_backend("torch", reason="train()'s rollback logic")


@rolls_back
@pytest.mark.slow
def test_rollback_goes_back_to_a_finite_checkpoint_and_finishes(
    shape_shards, tmp_path, monkeypatch
):
    config = _config(shape_shards, tmp_path / "rollback", steps=6)
    config.on_divergence = "rollback"
    poison = PoisonAfterStep(config.batch_size, checks.SkipCounter())
    poison.steps = (4,)
    done = []

    class Once(keras.callbacks.Callback):
        # Poison only the first pass over step 4: the rollback then succeeds.
        def on_train_batch_end(self, batch, logs=None):
            if not done and runs.completed_steps(self.model) == 4:
                done.append(True)
                poison.set_model(self.model)
                poison.on_train_batch_end(batch, {})

    summary = training.train(config, verbose=0, callbacks=[Once()])
    assert summary["rollbacks"] == 1 and summary["steps"] == 6
    model = keras.models.load_model(tmp_path / "rollback" / "model.keras")
    assert runs.all_finite(model)
    _checkpoints_are_finite(tmp_path / "rollback")


@rolls_back
@pytest.mark.slow
def test_rollbacks_are_capped(shape_shards, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(PoisonAfterStep, "steps", (4,))
    monkeypatch.setattr(training, "TrainingMonitor", PoisonAfterStep)
    output = tmp_path / "capped"
    args = ["--steps", "6", "--on-divergence", "rollback", "--max-rollbacks", "2"]
    assert _cli_train(shape_shards, output, *args) == 1
    captured = capsys.readouterr()
    assert captured.out.count("rollback ") == 2
    assert "after 2 rollbacks" in captured.err
    assert not (output / "model.keras").exists()
    _checkpoints_are_finite(output)


@pytest.mark.one_backend("torch", reason="CLI; one backend")
def test_no_usable_data_fails_and_names_check_data(tmp_path, capsys):
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"notes-{i}.txt").write_text("these are not TFRecords\n" * 20)
    assert _cli_train(str(junk / "*"), tmp_path / "run", "--steps", "2") == 1
    error = capsys.readouterr().err
    assert "fewer than one batch" in error and "check-data" in error
    assert not (tmp_path / "run").exists()


@pytest.mark.one_backend("torch", reason="CLI; one backend")
def test_bad_records_are_counted_once_however_many_passes(tmp_path, capsys):
    """20 steps of 8 over 19 usable pairs make several passes: the empty
    image is one skip, and the 21 records a damaged one hides are counted
    as unreadable, with a line saying where to look."""
    import io

    import tensorflow as tf
    from PIL import Image

    from declip_keras.data.records import encode_example

    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40, 3), COLOURS["red"], np.uint8)).save(buffer, "PNG")
    folder = tmp_path / "data"
    folder.mkdir()
    for name, count in (("part-0", 17), ("part-1", 24)):
        with tf.io.TFRecordWriter(str(folder / f"{name}.tfrecord")) as writer:
            for i in range(count):
                empty = name == "part-0" and i == 0
                image = b"" if empty else buffer.getvalue()
                caption = "a red square"
                writer.write(encode_example(f"{name}-{i}", image, "png", caption))
    flip_byte_in_record(folder / "part-1.tfrecord", 3)
    run = tmp_path / "run"
    assert _cli_train(str(folder / "*.tfrecord"), run, "--steps", "20",
                      checkpoint_every="10") == 0  # fmt: skip
    data = json.loads((run / "summary.json").read_text())["data"]
    assert data["pairs_trained"] == 160
    # Checked once each; decoded each time drawn, read-ahead included.
    assert data["records_checked"] == 20 and data["records_decoded"] >= 160
    assert data["skipped"]["empty_image"] == 1
    assert data["skipped"]["unreadable"] == 21
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"21 record(s) of {folder / '*.tfrecord'} were never read: a damaged "
        "record hides the rest of its shard; `declip-keras check-data` names "
        "the shards."
    )


@pytest.mark.one_backend("torch", reason="CLI; one backend")
def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays_whole(
    shape_shards, tmp_path, monkeypatch, capsys
):
    """The second checkpoint meets a full disk halfway (the file system's
    ENOSPC, raised by the writer): one line names the file and the newest
    whole checkpoint, the half-written file is gone, and once there is space
    `--resume` finishes from that checkpoint."""
    import errno
    from pathlib import Path

    saves, save = [], keras.Model.save

    def save_or_fill_the_disk(model, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save_or_fill_the_disk)
    run = tmp_path / "run"
    assert _cli_train(shape_shards, run, "--steps", "6") == 1
    first, second = run / "checkpoints" / "ckpt-00000002.keras", saves[1]
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "declip-keras train: error: could not write "
        f"{run / 'checkpoints' / 'ckpt-00000004.keras'} (No space left on "
        "device); the files written before it are whole; the newest checkpoint "
        f"is {first} (--resume continues from it)."
    )
    assert not Path(second).exists()
    assert runs.checkpoints(run) == [first]
    assert runs.completed_steps(keras.models.load_model(first)) == 2
    monkeypatch.setattr(keras.Model, "save", save)
    assert _cli_train(shape_shards, run, "--steps", "6", "--resume") == 0
    assert runs.completed_steps(keras.models.load_model(run / "model.keras")) == 6


@pytest.mark.one_backend("torch", reason="CLI; one backend")
def test_damaged_files_fall_back_and_finished_runs_are_protected(
    shape_shards, tmp_path, capsys
):
    output = tmp_path / "run"
    assert _cli_train(shape_shards, output, "--steps", "4") == 0
    # A finished run is not overwritten without --resume or --overwrite.
    before = (output / "model.keras").read_bytes()
    assert _cli_train(shape_shards, output, "--steps", "4") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "model.keras").read_bytes() == before
    # Resuming a finished run says so and keeps its summary.
    summary = json.loads((output / "summary.json").read_text())
    assert _cli_train(shape_shards, output, "--steps", "4", "--resume") == 0
    assert "nothing to train" in capsys.readouterr().out
    assert json.loads((output / "summary.json").read_text()) == summary

    # Damage: a truncated newest checkpoint and model.keras, a stale partial.
    newest = runs.checkpoints(output)[-1]
    newest.write_bytes(newest.read_bytes()[:2500])
    (output / "model.keras").write_bytes(before[:2500])
    stale = output / "checkpoints" / ".ckpt-00000006.partial.keras"
    stale.write_bytes(b"half")
    model = runs.load_trained_model(output)  # model.keras damaged: a ckpt
    assert model is not None
    err = capsys.readouterr().err
    assert "model.keras is damaged" in err and "ckpt-00000004.keras is damaged" in err
    assert _cli_train(shape_shards, output, "--steps", "6", "--resume") == 0
    captured = capsys.readouterr()
    assert "ckpt-00000004.keras is damaged" in captured.err
    assert "Continuing from" in captured.out and "ckpt-00000002" in captured.out
    assert not stale.exists()
    assert runs.all_finite(keras.models.load_model(output / "model.keras"))


@pytest.mark.one_backend("torch", reason="CLI; one backend")
def test_resume_on_an_empty_folder_says_it_starts_afresh(
    shape_shards, tmp_path, capsys
):
    assert _cli_train(shape_shards, tmp_path / "new", "--steps", "2", "--resume") == 0
    assert "starting a new run" in capsys.readouterr().out


@pytest.mark.one_backend("torch", reason="CLI; one backend")
def test_resume_from_a_path_starts_a_new_run_from_that_checkpoint(
    shape_shards, tmp_path, capsys
):
    first = tmp_path / "first"
    assert _cli_train(shape_shards, first, "--steps", "2") == 0
    checkpoint = runs.checkpoints(first)[-1]
    second = tmp_path / "second"
    assert (
        _cli_train(shape_shards, second, "--steps", "4", "--resume", str(checkpoint))
        == 0
    )
    assert f"Continuing from {checkpoint}" in capsys.readouterr().out
    summary = json.loads((second / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["steps_this_invocation"] == 2
    missing = tmp_path / "none.keras"
    assert _cli_train(shape_shards, tmp_path / "third", "--resume", str(missing)) == 2
    assert "No checkpoint at" in capsys.readouterr().err


@pytest.fixture(scope="module")
def shape_folder(tmp_path_factory):
    """An ImageFolder of coloured squares: one folder per colour."""
    from PIL import Image

    root = tmp_path_factory.mktemp("shape_folder")
    rng = np.random.default_rng(1)
    for name, colour in COLOURS.items():
        (root / name).mkdir()
        for index in range(4):
            pixels = np.full((40, 40, 3), 255, np.uint8)
            x, y = rng.integers(0, 20, 2)
            pixels[y : y + 20, x : x + 20] = colour
            Image.fromarray(pixels).save(root / name / f"{index}.png")
    return str(root)


@pytest.mark.one_backend("jax", reason="whose state sync the callback relies on")
@pytest.mark.slow
def test_evaluation_during_training_matches_eval_and_changes_nothing(
    shape_shards, shape_folder, tmp_path
):
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    assert _cli_train(shape_shards, plain, "--steps", "4") == 0
    evaluation = ["--zero-shot", shape_folder, "--retrieval", shape_shards]
    extra = [*evaluation, "--eval-every", "2", "--keep-best", "zero_shot_top1"]
    # --eval-every alone sets the checkpoint period (evaluations run at them).
    assert (
        _cli_train(shape_shards, watched, "--steps", "4", *extra, checkpoint_every=None)
        == 0
    )
    assert json.loads((watched / "config.json").read_text())["checkpoint_every"] == 2

    # The same training: step by step (so a difference names the first
    # period it shows in), then weights, queue and optimizer state.
    histories = [
        json.loads((run / "summary.json").read_text())["history"]
        for run in (plain, watched)
    ]
    for name, values in histories[0].items():
        if name != "pairs_per_second":  # the one timed figure
            assert histories[1][name] == values, name
    a = keras.models.load_model(plain / "model.keras")
    b = keras.models.load_model(watched / "model.keras")
    for x, y in zip(a.variables, b.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(x), to_numpy(y), err_msg=x.path)
    for x, y in zip(a.optimizer.variables, b.optimizer.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(x), to_numpy(y), err_msg=x.path)

    lines = (watched / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [2, 4]
    summary = json.loads((watched / "summary.json").read_text())
    assert summary["evaluation"] == records[-1]
    assert len(summary["history"]["zero_shot_top1"]) == 2  # in the epoch logs
    figures = headline_metrics(records[0])
    config = TrainConfig(data="d", output="o", zero_shot="z", retrieval="r")
    # Three classes: no top-5; every other logged name is one the config knows.
    assert set(figures) == set(config.eval_figures) - {"zero_shot_top5"}

    # The callback's figures are `declip-keras eval`'s on the same checkpoint.
    checkpoint = runs.checkpoint_path(watched, 2)
    report = tmp_path / "eval.json"
    assert main(["eval", str(checkpoint), *evaluation, "--output", str(report)]) == 0
    again = json.loads(report.read_text())
    for task in ("zero_shot", "retrieval"):
        assert again[task] == pytest.approx(records[0][task], abs=1e-6)

    best = json.loads((watched / "checkpoints" / "best.json").read_text())
    top1 = [r["zero_shot"]["top1"] for r in records]
    assert (
        best["value"] == max(top1)
        and best["step"] == records[top1.index(max(top1))]["step"]
    )
    kept = keras.models.load_model(watched / "checkpoints" / "best.keras")
    chosen = keras.models.load_model(runs.checkpoint_path(watched, best["step"]))
    for x, y in zip(kept.variables, chosen.variables, strict=True):
        np.testing.assert_array_equal(to_numpy(x), to_numpy(y))


@pytest.mark.one_backend("torch", reason="configuration checks; one backend")
def test_evaluation_options_are_checked_before_training(shape_shards, tmp_path, capsys):
    with pytest.raises(ValueError, match="multiple of checkpoint_every"):
        TrainConfig(
            data="d", output="o", zero_shot="z", eval_every=3, checkpoint_every=2
        )
    with pytest.raises(ValueError, match="needs zero_shot"):
        TrainConfig(data="d", output="o", eval_every=2, checkpoint_every=2)
    # Alone, --eval-every sets the checkpoint period; without either, 200.
    alone = TrainConfig(data="d", output="o", zero_shot="z", eval_every=3)
    assert alone.checkpoint_every == 3
    assert TrainConfig(data="d", output="o").checkpoint_every == 200
    with pytest.raises(ValueError, match="zero_shot_top1"):
        TrainConfig(data="d", output="o", retrieval="r", keep_best="zero_shot_top1")
    # A missing source, or class names that cannot be read or are too few
    # for the labels, is one line naming the file before any training.
    import io

    import tensorflow as tf
    from PIL import Image

    from declip_keras.data.records import encode_example

    labelled = str(tmp_path / "labelled.tfrecord")
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, "PNG")
    with tf.io.TFRecordWriter(labelled) as writer:
        for label in (0, 9):  # ten classes
            writer.write(encode_example(str(label), png.getvalue(), "png", "a digit",
                                        label=label))  # fmt: skip
    not_a_list = tmp_path / "names.json"
    not_a_list.write_text('{"0": "zero"}')
    not_json = tmp_path / "broken.json"
    not_json.write_text('["zero", "one"')
    refusals = {
        "nope": ["--zero-shot", str(tmp_path / "nope")],
        "records need an int64 `label`": ["--zero-shot", shape_shards],
        "needs class names": ["--zero-shot", labelled],
        "names.json must hold a JSON list": [
            "--zero-shot", labelled, "--classnames", str(not_a_list)
        ],
        "broken.json is not JSON": [
            "--zero-shot", labelled, "--classnames", str(not_json)
        ],
        "No class-name file at": [
            "--zero-shot", labelled, "--classnames", str(tmp_path / "no.json")
        ],
        "its labels need 10 class names, --classnames gives 3": [
            "--zero-shot", labelled, "--classnames", "zero,one,two"
        ],
        "is no file, no dataset name and not a comma-separated list": [
            "--zero-shot", labelled, "--classnames", str(tmp_path / "digit_names")
        ],
    }  # fmt: skip
    for expected, options in refusals.items():
        output = tmp_path / "run"
        assert _cli_train(shape_shards, output, *options) == 2, expected
        err = capsys.readouterr().err
        assert expected in err and len(err.strip().splitlines()) == 1, err
        assert not (output / "checkpoints").exists()


@pytest.mark.one_backend(
    "torch", reason="the option's wiring; test_model covers backends"
)
def test_float16_runs_count_every_step(shape_shards, tmp_path):
    from declip_keras.compat import CountingLossScaleOptimizer

    config = _config(shape_shards, tmp_path / "fp16")
    config.precision = "float16"
    try:
        summary = training.train(config, verbose=0)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")  # train() set it globally
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    model = keras.models.load_model(tmp_path / "fp16" / "model.keras")
    assert isinstance(model.optimizer, CountingLossScaleOptimizer)


@pytest.mark.one_backend("jax", reason="per-device queues are JAX's layout")
@pytest.mark.slow
def test_resuming_on_another_jax_device_count_is_one_line(
    shape_shards, tmp_path, monkeypatch, capsys
):
    """A checkpoint's per-device queues fit its device count; a resume on
    another count is refused with one line, not a shape error."""
    run = tmp_path / "run"
    assert _cli_train(shape_shards, run, "--steps", "2") == 0
    capsys.readouterr()
    two_devices = Replicas(2, global_view=True)
    monkeypatch.setattr(training, "configure_distribution", lambda: two_devices)
    assert _cli_train(shape_shards, run, "--steps", "4", "--resume") == 2
    error = capsys.readouterr().err
    assert "neighbour queues for 1 devices and this run has 2" in error
    assert "Traceback" not in error


@pytest.mark.one_backend("torch", reason="the command line's checks; one backend")
def test_resume_takes_the_run_s_settings_and_refuses_others(
    shape_shards, tmp_path, capsys
):
    """`--resume` continues with `config.json`'s settings: an option left out
    is the record's, not the default (--epochs 0.5 stays 4 steps, not one
    epoch's 6), and one that differs is one line naming the field and both
    values, with config.json untouched; a longer --steps may change."""
    run = tmp_path / "run"
    # 0.5 x 48 pairs / 8 = 3 steps, rounded up to whole checkpoint periods.
    assert _cli_train(shape_shards, run, "--epochs", "0.5") == 0
    record = run / "config.json"
    written = record.read_bytes()
    assert json.loads(written)["total_steps"] == 4
    assert _cli_train(shape_shards, run, "--resume") == 0
    assert "nothing to train" in capsys.readouterr().out
    assert json.loads(record.read_bytes())["total_steps"] == 4
    refusals = {
        ("--batch-size", "16"): f"batch_size is 8 in {record}, 16 here",
        ("--lr", "0.01"): f"learning_rate is 0.001 in {record}, 0.01 here",
        ("--preset", "tiny32"): f"preset is 'tiny' in {record}, 'tiny32' here",
        ("--set", "embed_dim=64"): f"the model's embed_dim is 128 in {record}, 64",
    }
    for options, expected in refusals.items():
        written = record.read_bytes()
        assert _cli_train(shape_shards, run, "--resume", *options) == 2, options
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and expected in err[0], (options, err)
        assert record.read_bytes() == written
    assert _cli_train(shape_shards, run, "--resume", "--steps", "6") == 0
    assert json.loads(record.read_bytes())["total_steps"] == 6
    assert runs.completed_steps(keras.models.load_model(run / "model.keras")) == 6


def _training_process(data: str, run) -> subprocess.Popen:
    """A `declip-keras train` of 2,000 steps in its own process, returned once
    its first checkpoint is on disk (stderr piped, as text)."""
    command = [sys.executable, "-m", "declip_keras", "train", "--data", data,
               "--output", str(run), "--batch-size", "8", "--steps", "2000",
               "--checkpoint-every", "2"]  # fmt: skip
    for item in SMALL:
        command += ["--set", item]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    while not runs.checkpoints(run):
        assert process.poll() is None, process.communicate()[1][-3000:]
        time.sleep(0.1)
    return process


@pytest.mark.one_backend("torch", reason="the command line's checks; one backend")
@pytest.mark.slow
def test_a_second_writer_is_refused_and_the_lock_goes_with_a_killed_run(
    shape_shards, tmp_path, capsys
):
    """While one `train` writes a run folder, a `--resume` of the same run or
    an `--overwrite` of it is one line naming the process, and nothing of
    the first is replaced or removed; once the first is killed, the run
    resumes at once."""
    run = tmp_path / "run"
    first = _training_process(shape_shards, run)
    try:
        written = (run / "config.json").read_bytes()
        for option in ("--resume", "--overwrite"):
            assert _cli_train(shape_shards, run, "--steps", "2000", option) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [
                f"declip-keras train: error: {run} is in use: process {first.pid} "
                f"is training there (it holds {run / '.lock'}); wait for it to "
                "end or choose another --output."
            ], option
            assert (run / "config.json").read_bytes() == written
            assert runs.checkpoints(run)
    finally:
        first.kill()
        first.communicate()
    assert first.returncode == -9
    step = runs.completed_steps(keras.models.load_model(runs.checkpoints(run)[-1]))
    assert _cli_train(shape_shards, run, "--steps", str(step + 2), "--resume") == 0
    resumed = keras.models.load_model(run / "model.keras")
    assert runs.completed_steps(resumed) == step + 2


@pytest.mark.one_backend("torch", reason="the command line's checks; one backend")
@pytest.mark.slow
def test_ctrl_c_is_one_line_naming_the_newest_checkpoint(shape_shards, tmp_path):
    run = tmp_path / "run"
    process = _training_process(shape_shards, run)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    newest = runs.checkpoints(run)[-1]
    assert stderr.strip().splitlines()[-1] == (
        f"declip-keras train: interrupted; the newest checkpoint is {newest} "
        "(--resume continues from it)."
    )
    assert runs.completed_steps(keras.models.load_model(newest)) > 0  # whole

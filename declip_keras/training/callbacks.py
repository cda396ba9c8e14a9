"""The callbacks of a pretraining run: checkpoints, divergence, monitoring,
evaluation."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import keras

from declip_keras.backend import sync_model_state, whole_state
from declip_keras.data.checks import SkipCounter
from declip_keras.data.tokenizer import CaptionTokenizer
from declip_keras.evaluation.metrics import evaluate, headline_metrics
from declip_keras.training.files import link_atomically, write_json, write_jsonl
from declip_keras.training.runs import (
    all_finite,
    checkpoint_path,
    checkpoints,
    completed_steps,
    save_checkpoint,
)


class Checkpointer(keras.callbacks.Callback):
    """Writes `ckpt-<step>.keras` at every epoch end; keeps the newest `keep`.

    With `writes=False` (torchrun's processes but the first) it only checks
    that the weights are finite.
    """

    def __init__(
        self, output: str | Path, keep: int, guard: DivergenceGuard, writes=True
    ):
        super().__init__()
        self.output = Path(output)
        self.keep = keep
        self.guard = guard
        self.writes = writes

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.diverged:
            return  # never overwrite a good checkpoint with a diverged model
        with whole_state(self.model):
            if not all_finite(self.model):
                # The loss was finite but the last update was not.
                self.guard.stop("the weights became non-finite")
                return
            if not self.writes:
                return
            save_checkpoint(self.model, self.output, completed_steps(self.model))
        for old in checkpoints(self.output)[: -self.keep]:
            old.unlink()


class DivergenceGuard(keras.callbacks.Callback):
    """Stops `fit` when the loss is not finite or jumps by more than `jump`.

    The released DeCLIP trainer treats both as divergence. The run's driver
    then stops with a message or rolls back, as the user chose.
    """

    def __init__(self, jump: float = 10.0):
        super().__init__()
        self.jump = jump
        self.diverged: str | None = None
        self.step: int | None = None
        self.last_good: float | None = None

    def on_train_batch_end(self, batch, logs=None):
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.stop(f"the loss became {loss}")

    def on_epoch_end(self, epoch, logs=None):
        if self.diverged:
            return
        loss = float((logs or {}).get("loss", 0.0))
        if not math.isfinite(loss):
            self.stop(f"the loss became {loss}")
        elif self.last_good is not None and loss > self.last_good + self.jump:
            self.stop(f"the loss jumped from {self.last_good:.3f} to {loss:.3f}")
        else:
            self.last_good = loss

    def stop(self, reason: str):
        """Marks the run diverged at the current step and ends `fit`."""
        if self.diverged is None:
            self.diverged = reason
            self.step = completed_steps(self.model)
        self.model.stop_training = True


class StallWatchdog(keras.callbacks.Callback):
    """Ends this process, exit status 1, when no step finishes for `timeout`
    seconds.

    With several processes, one that fails can leave the others waiting in
    a collective that never returns (JAX over gloo does; TensorFlow's
    coordination service ends them itself), so the job would never end. A
    thread watches for progress and exits the process, which no exception
    in the blocked main thread could do. It watches from the end
    of the fit's first step, whose compilation can take minutes. Place it
    last: its epoch end comes after the checkpoint and the evaluation, so
    `timeout` must cover the longest step, checkpoint or evaluation.
    """

    def __init__(self, timeout: float, poll: float = 1.0):
        super().__init__()
        self.timeout = timeout
        self.poll = poll
        self._beat = time.monotonic()
        self._done = threading.Event()
        self._watching = False

    def _watch(self):
        while not self._done.wait(self.poll):
            if time.monotonic() - self._beat > self.timeout:
                print(
                    f"declip-keras train: no step finished in {self.timeout:g} s "
                    "(--stall-timeout); another process of this job has probably "
                    "stopped. Exiting; --resume continues from the newest "
                    "checkpoint.",
                    file=sys.stderr,
                    flush=True,
                )
                sys.stdout.flush()
                os._exit(1)

    def on_train_begin(self, logs=None):
        self._done.clear()
        self._watching = False

    def on_train_batch_end(self, batch, logs=None):
        self._beat = time.monotonic()
        if not self._watching:
            self._watching = True
            threading.Thread(target=self._watch, daemon=True).start()

    def on_epoch_end(self, epoch, logs=None):
        self._beat = time.monotonic()

    def on_train_end(self, logs=None):
        self._done.set()


class TrainingMonitor(keras.callbacks.Callback):
    """Adds learning rate, pairs/s and skipped-record counts to the logs.

    Placed before TensorBoard in the callback list, so they are logged with
    every loss term and the temperature.
    """

    def __init__(self, batch_size: int, counter: SkipCounter):
        super().__init__()
        self.batch_size = batch_size
        self.counter = counter
        self._start = time.perf_counter()
        self._steps = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = time.perf_counter(), 0

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        self._fill(logs)

    def on_epoch_end(self, epoch, logs=None):
        self._fill(logs)

    def _fill(self, logs):
        if logs is None:
            return
        elapsed = max(time.perf_counter() - self._start, 1e-9)
        logs["learning_rate"] = float(
            keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)
        )
        logs["pairs_per_second"] = self._steps * self.batch_size / elapsed
        logs["skipped_records"] = float(self.counter.skipped())


class Evaluator(keras.callbacks.Callback):
    """Evaluates the model at checkpoints while it trains.

    Runs after `Checkpointer` at the end of every period whose step is a
    multiple of `every`, and at `last_step`, so each evaluation belongs to a
    checkpoint on disk. Its figures (`evaluation.headline_metrics`, e.g.
    `zero_shot_top1`) join the period's logs, so the progress line,
    TensorBoard and the history show them; `metrics.jsonl` in the run folder
    gets a line per evaluation (`{"step": ..., **evaluate(...)}`); with
    `keep_best`, the checkpoint with the highest such figure so far is also
    `checkpoints/best.keras`, described by `checkpoints/best.json`.

    Evaluation only reads the model, in inference mode: no queue write, no
    optimizer or random-stream use, so a run trains exactly as without it.

    Args:
        output: the run folder.
        every: steps between evaluations (a multiple of the checkpoint period).
        last_step: the run's final step, always evaluated.
        targets: `evaluate`'s sources (`zero_shot`, `classnames`, `templates`,
            `retrieval`, `probe`).
        tokenizer: the run's tokenizer.
        guard: the run's `DivergenceGuard`; a diverged period is not evaluated.
        keep_best: the figure that picks `best.keras`, or None.
    """

    def __init__(
        self,
        output: str | Path,
        every: int,
        last_step: int,
        targets: dict[str, Any],
        tokenizer: CaptionTokenizer,
        guard: DivergenceGuard,
        keep_best: str | None = None,
    ):
        super().__init__()
        self.output = Path(output)
        self.every = every
        self.last_step = last_step
        self.targets = targets
        self.tokenizer = tokenizer
        self.guard = guard
        self.keep_best = keep_best
        self.metrics_file = self.output / "metrics.jsonl"
        self.best_file = self.output / "checkpoints" / "best.json"
        self.records: list[dict] = []
        self.best: dict | None = None

    def on_train_begin(self, logs=None):
        # A resumed run keeps the evaluations of the steps it resumes from.
        start = completed_steps(self.model)
        if self.metrics_file.is_file():
            lines = self.metrics_file.read_text().splitlines()
            self.records = [json.loads(line) for line in lines if line.strip()]
            self.records = [r for r in self.records if r["step"] <= start]
        if self.keep_best and self.best_file.is_file():
            best = json.loads(self.best_file.read_text())
            if best["metric"] == self.keep_best and best["step"] <= start:
                self.best = best

    def on_epoch_end(self, epoch, logs=None):
        step = completed_steps(self.model)
        checkpoint = checkpoint_path(self.output, step)
        due = step % self.every == 0 or step == self.last_step
        if not due or self.guard.diverged or not checkpoint.is_file():
            return
        sync_model_state(self.model)
        results = evaluate(self.model, tokenizer=self.tokenizer, **self.targets)
        figures = headline_metrics(results)
        if logs is not None:
            logs.update(figures)
        self.records.append({"step": step, **results})
        write_jsonl(self.metrics_file, self.records)
        print(f"Evaluation at step {step}: {json.dumps(figures)}")
        if self.keep_best:
            value = figures.get(self.keep_best)
            if value is None:
                raise ValueError(
                    f"keep_best {self.keep_best}: this evaluation gives only "
                    f"{sorted(figures)} (top5 needs 5 classes or more)."
                )
            if self.best is None or value > self.best["value"]:
                best = checkpoint.with_name("best.keras")
                link_atomically(checkpoint, best)
                self.best = {
                    "metric": self.keep_best,
                    "value": value,
                    "step": step,
                    "checkpoint": str(best),
                }
                write_json(self.best_file, self.best)

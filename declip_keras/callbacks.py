"""The callbacks of a pretraining run: checkpoints, divergence, monitoring."""

from __future__ import annotations

import math
import time
from pathlib import Path

import keras

from declip_keras.backend import sync_model_state
from declip_keras.checks import SkipCounter
from declip_keras.runs import all_finite, checkpoints, completed_steps, save_checkpoint


class Checkpointer(keras.callbacks.Callback):
    """Writes `ckpt-<step>.keras` at every epoch end; keeps the newest `keep`."""

    def __init__(self, output: str | Path, keep: int, guard: DivergenceGuard):
        super().__init__()
        self.folder = Path(output) / "checkpoints"
        self.keep = keep
        self.guard = guard

    def on_epoch_end(self, epoch, logs=None):
        if self.guard.diverged:
            return  # never overwrite a good checkpoint with a diverged model
        sync_model_state(self.model)
        if not all_finite(self.model):
            # The loss was finite but the last update was not.
            self.guard.stop("the weights became non-finite")
            return
        save_checkpoint(self.model, self.folder, completed_steps(self.model))
        for old in checkpoints(self.folder.parent)[: -self.keep]:
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

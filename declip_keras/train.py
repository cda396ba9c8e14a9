"""Pretraining runs: configuration, checkpoints and resume, monitoring, divergence.

A run is a sequence of Keras "epochs" of `checkpoint_every` steps each, so a
checkpoint ends every epoch and `fit(initial_epoch=...)` resumes at the exact
step. Checkpoints are `.keras` files (model, temperature, neighbour queue and
optimizer state) written under a temporary name and renamed, so a run killed
at any moment leaves only whole checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from declip_keras.augment import AUGMENTATIONS
from declip_keras.backend import configure_distribution, sync_model_state
from declip_keras.data import SkipCounter, training_dataset
from declip_keras.files import remove_partial_files, save_atomically, write_json
from declip_keras.model import DeCLIP
from declip_keras.optim import WarmupCosine, make_optimizer
from declip_keras.presets import preset_config
from declip_keras.records import list_shards, scan_shard
from declip_keras.tokenizer import load_tokenizer

CHECKPOINT = re.compile(r"^ckpt-(\d{8})\.keras$")


class TrainingError(RuntimeError):
    """A run that cannot go on or cannot succeed: the message says why."""


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run; written to `OUTPUT/config.json`."""

    data: str
    output: str
    preset: str = "tiny"
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    batch_size: int = 64
    steps: int | None = None
    epochs: float = 1.0
    learning_rate: float = 1e-3
    warmup_steps: int | None = None
    weight_decay: float = 0.1
    declip: bool = True
    # Default: the released choice per method, "mocov2" (DeCLIP) or "crop" (CLIP).
    augmentation: str | None = None
    # A folder from `declip-keras train-tokenizer`; default: CLIP's BPE.
    vocabulary: str | None = None
    precision: str = "float32"
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    on_divergence: str = "stop"
    max_rollbacks: int = 3
    seed: int = 0

    def __post_init__(self):
        positive = {
            "batch_size": self.batch_size,
            "checkpoint_every": self.checkpoint_every,
            "keep_checkpoints": self.keep_checkpoints,
            "epochs": self.epochs,
            "learning_rate": self.learning_rate,
        }
        if self.steps is not None:
            positive["steps"] = self.steps
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value}.")
        for name in ("warmup_steps", "max_rollbacks", "weight_decay"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more, got {value}.")
        if self.augmentation is None:
            self.augmentation = "mocov2" if self.declip else "crop"
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(
                f"augmentation must be one of {AUGMENTATIONS}, got "
                f"{self.augmentation!r}"
            )
        if self.precision not in ("float32", "bfloat16"):
            raise ValueError(
                f"precision must be float32 or bfloat16, got {self.precision!r}"
            )
        if self.on_divergence not in ("stop", "rollback"):
            raise ValueError(
                f"on_divergence must be stop or rollback, got {self.on_divergence!r}"
            )


def checkpoints(output: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = Path(output) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT.match(p.name))


def completed_steps(model: keras.Model) -> int:
    """Optimizer steps taken (a mirrored variable under tf.distribute)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class DamagedFileError(ValueError):
    """A model or checkpoint file that exists but cannot be read."""


def _load(path: Path, **kwargs) -> keras.Model:
    """`keras.models.load_model`, with a damaged file named as such."""
    try:
        return keras.models.load_model(path, **kwargs)
    except Exception as error:  # Keras raises many kinds for a damaged zip
        raise DamagedFileError(
            f"{path} is damaged or not a Keras model file "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})."
        ) from error


def load_trained_model(path: str | Path) -> DeCLIP:
    """A `.keras` file, or a run folder: its `model.keras`, else the newest
    readable checkpoint. A damaged file in a run folder is named on stderr
    and the next one is tried."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"No model file at {path}.")
        return _load(path, compile=False)
    candidates = [path / "model.keras", *reversed(checkpoints(path))]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"{path} holds neither model.keras nor checkpoints/ckpt-*.keras."
        )
    for candidate in found:
        try:
            return _load(candidate, compile=False)
        except DamagedFileError as error:
            print(f"{error} Trying the next one.", file=sys.stderr)
    raise DamagedFileError(f"No readable model in {path}.")


def all_finite(model: keras.Model) -> bool:
    """Whether every floating-point variable of the model is finite."""
    return all(
        np.all(np.isfinite(keras.ops.convert_to_numpy(v)))
        for v in model.variables
        if "float" in str(v.dtype)
    )


def run_vocabulary(path: str | Path) -> str | None:
    """The tokenizer folder a run folder was trained with (None: CLIP's)."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return None
    return json.loads(config.read_text()).get("vocabulary")


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
        save(self.model, self.folder, completed_steps(self.model))
        for old in checkpoints(self.folder.parent)[: -self.keep]:
            old.unlink()


def save(model: keras.Model, folder: Path, step: int) -> Path:
    """Atomically writes `folder/ckpt-<step>.keras`."""
    return save_atomically(model, folder / f"ckpt-{step:08d}.keras")


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


def count_pairs(pattern: str) -> int:
    """Records in the shards (read from their framing, no decoding)."""
    return sum(scan_shard(f).records for f in list_shards(pattern))


def _build(config: TrainConfig, total_steps: int, scale: float) -> DeCLIP:
    dtype = "mixed_bfloat16" if config.precision == "bfloat16" else None
    overrides = dict(config.overrides)
    if not config.declip:
        overrides.update(clip_weight=1.0, ss_weight=0.0, mlm_weight=0.0, nn_weight=0.0)
    model = DeCLIP.from_preset(
        config.preset, dtype=dtype, seed=config.seed, **overrides
    )
    _compile(model, config, total_steps, scale)
    return model


def _compile(
    model: DeCLIP, config: TrainConfig, total_steps: int, scale: float
) -> None:
    warmup = config.warmup_steps
    if warmup is None:  # DeCLIP: 2,500 of 128k steps
        warmup = max(1, round(total_steps * 2500 / 128_000))
    schedule = WarmupCosine(config.learning_rate, warmup, total_steps, scale=scale)
    optimizer = make_optimizer(model, schedule, config.weight_decay)
    model.compile(optimizer=optimizer)
    optimizer.build(model.trainable_variables)


def _restore(path: Path, config: TrainConfig, total_steps: int, scale: float) -> DeCLIP:
    """The checkpoint's model with a rebuilt optimizer holding its state.

    The optimizer is rebuilt rather than deserialised because Keras does not
    save AdamW's weight-decay exclusions.
    """
    model = _load(path, compile=False)
    _compile(model, config, total_steps, scale)
    model.load_weights(path)
    return model


def _restore_newest(
    output: Path, config: TrainConfig, total_steps: int, scale: float
) -> DeCLIP | None:
    """The newest checkpoint that loads and holds finite weights, or None.

    A damaged or non-finite checkpoint is named on stderr and skipped.
    """
    for path in reversed(checkpoints(output)):
        try:
            model = _restore(path, config, total_steps, scale)
        except DamagedFileError as error:
            print(f"{error} Using an older checkpoint.", file=sys.stderr)
            continue
        if all_finite(model):
            print(f"Continuing from {path}.")
            return model
        print(f"{path} holds non-finite weights; skipping it.", file=sys.stderr)
    return None


def run_files(output: str | Path) -> list[Path]:
    """What a finished or started run left in `output`."""
    output = Path(output)
    names = ("model.keras", "summary.json", "config.json")
    return [output / n for n in names if (output / n).exists()] + checkpoints(output)


def train(
    config: TrainConfig,
    verbose: int | str = "auto",
    callbacks: Sequence[keras.callbacks.Callback] = (),
) -> dict[str, Any]:
    """Runs (or resumes) a pretraining run; returns (and writes) a summary.

    `callbacks` are added to the run's own (divergence guard, checkpoints,
    monitoring, TensorBoard), after them.

    Resumes from the newest readable, finite checkpoint in `config.output`
    when there is one. Writes `config.json` (the effective configuration),
    `checkpoints/`, `logs/` (TensorBoard), `model.keras` and `summary.json`,
    every file under a temporary name first.

    Raises:
        TrainingError: the data hold no usable batch, the run diverged (and
            `on_divergence="stop"`, or `max_rollbacks` rollbacks did not
            help), or the weights are not finite at the end.
    """
    output = Path(config.output)
    pairs = count_pairs(config.data)
    if pairs < config.batch_size:
        raise TrainingError(
            f"{config.data} holds {pairs} records, fewer than one batch of "
            f"{config.batch_size}; look at it with `declip-keras check-data`."
        )
    output.mkdir(parents=True, exist_ok=True)
    remove_partial_files(output, output / "checkpoints")
    keras.utils.set_random_seed(config.seed)
    replicas = configure_distribution()
    if config.batch_size % replicas.devices:
        raise ValueError(
            f"batch_size {config.batch_size} does not split over {replicas.devices} "
            "devices; choose a multiple."
        )
    if config.precision == "bfloat16":
        keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    overrides = dict(config.overrides)
    tokenizer = None
    if config.vocabulary:
        context = preset_config(config.preset, **overrides)["context_length"]
        tokenizer = load_tokenizer(context, config.vocabulary)
        size = overrides.setdefault("vocabulary_size", tokenizer.vocabulary_size)
        if size != tokenizer.vocabulary_size:
            raise ValueError(
                f"vocabulary_size={size} but {config.vocabulary} holds "
                f"{tokenizer.vocabulary_size} tokens."
            )
        config = dataclasses.replace(config, overrides=overrides)
    model_config = preset_config(config.preset, **config.overrides)
    steps = config.steps or max(1, math.ceil(config.epochs * pairs / config.batch_size))
    every = min(config.checkpoint_every, steps)
    steps = math.ceil(steps / every) * every  # whole checkpoint periods
    effective = {
        **dataclasses.asdict(config),
        "total_steps": steps,
        "pairs": pairs,
        "model": model_config,
        "backend": keras.backend.backend(),
        "devices": replicas.devices,
        "hosts": replicas.host_count,
    }
    write_json(output / "config.json", effective)
    print(json.dumps(effective, indent=2, default=list))

    scale, rollbacks, history = 1.0, 0, {}
    counter = SkipCounter()
    with replicas.scope():
        model = _restore_newest(output, config, steps, scale)
        if model is None:
            model = _build(config, steps, scale)
    start = completed_steps(model)
    if start >= steps and (output / "summary.json").is_file():
        print(f"{output} finished all {steps} steps already; nothing to train.")
        return json.loads((output / "summary.json").read_text())
    print(
        f"Training steps {start + 1}-{steps} in periods of {every} steps, each "
        "ending with a checkpoint (the progress bar calls a period an epoch)."
    )
    while True:
        step = completed_steps(model)
        if step >= steps:
            break
        dataset = training_dataset(
            config.data,
            config.batch_size // replicas.host_count,
            model_config["image_size"],
            model_config["context_length"],
            seed=config.seed,
            declip=config.declip,
            mlm=config.declip and model.mlm_weight > 0,
            augmentation=config.augmentation,
            tokenizer=tokenizer,
            counter=counter,
            start_step=step,
            host_index=replicas.host_index,
            host_count=replicas.host_count,
        )
        guard = DivergenceGuard()
        result = model.fit(
            dataset,
            epochs=steps // every,
            steps_per_epoch=every,
            initial_epoch=step // every,
            callbacks=[
                guard,
                Checkpointer(output, config.keep_checkpoints, guard),
                TrainingMonitor(config.batch_size, counter),
                keras.callbacks.TensorBoard(
                    str(output / "logs"), update_freq=max(1, every // 10)
                ),
                *callbacks,
            ],
            verbose=verbose,
        )
        for name, values in result.history.items():
            history.setdefault(name, []).extend(values)
        if not guard.diverged:
            if completed_steps(model) < steps:
                usable = counter.counts()["usable"]
                raise TrainingError(
                    f"{config.data} ran out after step {completed_steps(model)}: "
                    f"{usable} usable pairs were read, fewer than one batch of "
                    f"{config.batch_size}; see `declip-keras check-data`."
                )
            break
        good = checkpoints(output)
        where = f"The last good checkpoint is {good[-1]}" if good else "No checkpoint"
        if config.on_divergence == "stop" or not good:
            raise TrainingError(
                f"Training diverged at step {guard.step}: {guard.diverged}. {where}; "
                "resume with a lower --learning-rate, or pass --on-divergence "
                "rollback."
            )
        if rollbacks >= config.max_rollbacks:
            raise TrainingError(
                f"Training diverged at step {guard.step} ({guard.diverged}) after "
                f"{rollbacks} rollbacks at ever lower learning rates. {where}; "
                "check the data and the learning rate."
            )
        scale *= 0.5
        rollbacks += 1
        print(
            f"Diverged at step {guard.step} ({guard.diverged}); rollback "
            f"{rollbacks} of at most {config.max_rollbacks}: learning rate x{scale}."
        )
        with replicas.scope():
            model = _restore_newest(output, config, steps, scale)
        if model is None:
            raise TrainingError(f"No readable, finite checkpoint in {output}.")

    if not all_finite(model):
        raise TrainingError(
            "The weights are not finite at the end of training; model.keras was "
            "not written."
        )
    final = save_atomically(model, output / "model.keras")
    counts = counter.counts()
    trained = completed_steps(model) - start
    summary = {
        "steps": completed_steps(model),
        "steps_this_invocation": trained,
        "model": str(final),
        "rollbacks": rollbacks,
        # Named so they cannot be misread: records are checked ahead of use
        # (shuffle buffers), so checked - trained is not a count of bad data.
        "data": {
            "pairs_trained": trained * config.batch_size,
            "records_checked": counts.pop("read"),
            "records_decoded": counts.pop("usable"),
            "skipped": counts,
        },
        "final_loss": float(np.asarray(history["loss"][-1]))
        if history.get("loss")
        else None,
        "history": history,
    }
    write_json(output / "summary.json", summary)
    return summary

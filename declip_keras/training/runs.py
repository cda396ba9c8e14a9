"""A run folder: what training writes there and how to read it back.

    OUTPUT/
      config.json            the effective configuration, model section included
      checkpoints/ckpt-<step>.keras   the newest few, each written atomically
      logs/                  TensorBoard
      model.keras            the trained model, written at the end
      summary.json           steps, data counts, loss history

Evaluation and export read a run folder through `load_trained_model`, which
names a damaged file and falls back to the next readable one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

# Imported for its Keras registrations: `keras.models.load_model` finds
# DeCLIP's classes (model, towers, layers, schedule) only once they are.
import declip_keras.models.declip  # noqa: F401
from declip_keras.data.tokenizer import CaptionTokenizer, load_tokenizer
from declip_keras.training.files import save_atomically

CHECKPOINT = re.compile(r"^ckpt-(\d{8})\.keras$")


def checkpoints(output: str | Path) -> list[Path]:
    """The run's checkpoints, oldest first."""
    folder = Path(output) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if CHECKPOINT.match(p.name))


def completed_steps(model: keras.Model) -> int:
    """Optimizer steps taken (a mirrored variable under tf.distribute)."""
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def checkpoint_path(output: str | Path, step: int) -> Path:
    """Where a run writes its checkpoint after `step` steps."""
    return Path(output) / "checkpoints" / f"ckpt-{step:08d}.keras"


def save_checkpoint(model: keras.Model, output: str | Path, step: int) -> Path:
    """Atomically writes the run's checkpoint after `step` steps."""
    return save_atomically(model, checkpoint_path(output, step))


class DamagedFileError(ValueError):
    """A model or checkpoint file that exists but cannot be read."""


def load_file(path: Path, **kwargs) -> keras.Model:
    """`keras.models.load_model`, with a damaged file named as such."""
    try:
        return keras.models.load_model(path, **kwargs)
    except Exception as error:  # Keras raises many kinds for a damaged zip
        raise DamagedFileError(
            f"{path} is damaged or not a Keras model file "
            f"({type(error).__name__}: {str(error).splitlines()[0][:200]})."
        ) from error


def load_trained_model(path: str | Path) -> keras.Model:
    """A `.keras` file, or a run folder: its `model.keras`, else the newest
    readable checkpoint. A damaged file in a run folder is named on stderr
    and the next one is tried."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise FileNotFoundError(f"No model file at {path}.")
        return load_file(path, compile=False)
    candidates = [path / "model.keras", *reversed(checkpoints(path))]
    found = [p for p in candidates if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"{path} holds neither model.keras nor checkpoints/ckpt-*.keras."
        )
    for candidate in found:
        try:
            return load_file(candidate, compile=False)
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


def run_folder(path: str | Path) -> Path | None:
    """The run folder `path` is or belongs to (its `model.keras`, or a file in
    its `checkpoints/`); None for a model file outside any run."""
    path = Path(path)
    if path.is_dir():
        folder = path
    elif path.parent.name == "checkpoints":
        folder = path.parent.parent
    else:
        folder = path.parent
    return folder if (folder / "config.json").is_file() else None


def run_vocabulary(path: str | Path) -> str | None:
    """The tokenizer folder the run that `path` is or belongs to was trained
    with (None: CLIP's, or no run folder)."""
    folder = run_folder(path)
    if folder is None:
        return None
    vocabulary = json.loads((folder / "config.json").read_text()).get("vocabulary")
    if vocabulary is not None and not Path(vocabulary).is_dir():
        raise FileNotFoundError(
            f"{folder / 'config.json'} names the tokenizer folder {vocabulary}, "
            "which does not exist here; give the folder with --vocabulary."
        )
    return vocabulary


def model_tokenizer(
    model: keras.Model, path: str | Path, vocabulary: str | None = None
) -> CaptionTokenizer:
    """The tokenizer that feeds `model`, loaded from `path`: `vocabulary`,
    else its run's, else CLIP's BPE. One whose size is not the text tower's
    is refused: its ids would index past the token embedding (which JAX
    clamps without a word) or leave rows the model was trained on unused."""
    folder = vocabulary or run_vocabulary(path)
    tokenizer = load_tokenizer(model.text_encoder.context_length, folder)
    expected = model.text_encoder.vocabulary_size
    if tokenizer.vocabulary_size != expected:
        source = folder or "CLIP's BPE"
        raise ValueError(
            f"{path}: the text tower takes {expected} token ids but the "
            f"tokenizer ({source}) has "
            f"{tokenizer.vocabulary_size}; give the tokenizer folder the model "
            "was trained with (--vocabulary)."
        )
    return tokenizer


LOCK = ".lock"


class RunInUseError(FileExistsError):
    """Another process is training in the run folder."""


@contextlib.contextmanager
def hold_run(output: Path) -> Iterator[None]:
    """Holds `output`'s lock while a run writes there: a second writer, even
    a `--resume` of the same run, is refused in one line instead of
    replacing the first's files. The lock is the operating system's
    (`flock`), so it goes with the process that held it: a killed run can
    be resumed at once."""
    output.mkdir(parents=True, exist_ok=True)
    path = output / LOCK
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunInUseError(
                f"{output} is in use: {holder} is training there (it holds "
                f"{path}); wait for it to end or choose another --output."
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def remove_run(output: Path) -> None:
    """Removes what `run_files` lists and the TensorBoard logs; call it with
    the run's lock held (`hold_run`)."""
    for path in run_files(output):
        path.unlink()
    shutil.rmtree(output / "logs", ignore_errors=True)


def run_files(output: str | Path) -> list[Path]:
    """What a finished or started run left in `output`."""
    output = Path(output)
    names = (
        "model.keras",
        "summary.json",
        "config.json",
        "metrics.jsonl",
        "checkpoints/best.keras",
        "checkpoints/best.json",
    )
    return [output / n for n in names if (output / n).exists()] + checkpoints(output)

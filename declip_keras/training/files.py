"""Files written so that a kill at any moment leaves each one whole or absent.

Everything is written under a temporary name in the same folder and renamed
when complete (`os.replace` is atomic on one file system).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

PARTIAL_SUFFIX = ".partial.keras"
# What a full disk, a quota or a file-size limit raises.
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DiskFullError(OSError):
    """A file could not be written for want of space; the one it would have
    replaced, and every other, is as it was."""

    def __str__(self) -> str:
        return self.strerror  # the message names the file and the cause


@contextlib.contextmanager
def _writing(path: Path, partial: Path) -> Iterator[None]:
    """Removes the half-written `partial` (it holds space a user needs) and
    names `path` when the disk is full."""
    try:
        yield
    except OSError as error:
        if error.errno not in NO_SPACE:
            raise
        partial.unlink(missing_ok=True)
        raise DiskFullError(
            error.errno,
            f"could not write {path} ({os.strerror(error.errno)}); the files "
            "written before it are whole",
        ) from None


def save_atomically(model: keras.Model, path: Path) -> Path:
    """`model.save(path)` through a temporary name: `path` is whole or absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.stem}{PARTIAL_SUFFIX}")
    with _writing(path, partial):
        model.save(partial)
    os.replace(partial, path)
    return path


def write_json(path: Path, value: Any) -> None:
    """Writes `value` as indented JSON through a temporary name."""
    partial = path.with_name(f".{path.name}.partial")
    with _writing(path, partial):
        partial.write_text(json.dumps(value, indent=2, default=list))
    os.replace(partial, path)


def remove_partial_files(*folders: Path) -> None:
    """Deletes what a killed writer left half-written in `folders`."""
    for folder in folders:
        if folder.is_dir():
            for stale in folder.glob(".*.partial*"):
                if stale.is_file():
                    stale.unlink()


def write_jsonl(path: Path, records: list[Any]) -> None:
    """Writes one JSON line per record through a temporary name."""
    partial = path.with_name(f".{path.name}.partial")
    with _writing(path, partial):
        partial.write_text("".join(json.dumps(r, default=list) + "\n" for r in records))
    os.replace(partial, path)


def link_atomically(source: Path, path: Path) -> None:
    """Makes `path` a copy of `source` (a hard link where the file system
    allows one), whole or absent at any moment."""
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    try:
        os.link(source, partial)
    except OSError:
        with _writing(path, partial):
            shutil.copyfile(source, partial)
    os.replace(partial, path)

"""Conversion of image-caption collections into sharded TFRecords.

Inputs: a CSV/TSV of image path and caption (CC3M style), JSON lines of
`{"filename", "caption"}` (the released DeCLIP format), or an img2dataset
output folder in its `files` (`00000/000000012.jpg` + `.txt`) or `webdataset`
(`.tar` shards) layout. A pool of worker threads checks each image with
Pillow (and optionally shrinks its shorter side to at most N pixels), then the
pairs are written round-robin into shards of similar size. A `manifest.json` beside the
shards records the counts and every skipped input with its reason.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.pool import ThreadPool
from pathlib import Path

import tensorflow as tf
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from declip_keras.data.image_constants import IMAGE_SUFFIXES
from declip_keras.data.records import encode_example

_PIL_FIELDS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class Pair:
    """One input pair: the image as a path or as bytes already read."""

    key: str
    caption: str
    image_path: str | None = None
    image_bytes: bytes | None = None
    problem: str | None = None  # why the input row itself is unusable


def read_table(
    path: str | Path,
    image_column: str | int | None = None,
    caption_column: str | int | None = None,
    image_root: str | Path | None = None,
) -> Iterator[Pair]:
    """Rows of a CSV (or TSV, by extension) with an image path and a caption.

    Columns are named by header (`image_column`, `caption_column`; by default
    the first of `filepath`, `image`, `filename`, `path` and of `caption`,
    `title`, `text`) or, in a file without a header, by index.
    Relative image paths are resolved against `image_root` (default: the
    table's folder). A header without the columns is an error raised here,
    before any row is read. A row that is not UTF-8, too short, or refused
    by the csv module (a quote left open, a field over its size limit)
    becomes a skipped pair naming its line, and reading goes on with the
    next line.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    with _open_table(path) as handle:
        rows = csv.reader(handle, delimiter=_delimiter(path), strict=True)
        try:
            first = next(rows, None)
        except csv.Error as error:
            raise ValueError(f"{path}:{rows.line_num}: {error}") from error
    if first is None:
        return iter(())
    has_header = not (isinstance(image_column, int) and isinstance(caption_column, int))
    if has_header:
        header = [name.strip().lower() for name in first]
        image_column = _column(
            header, image_column, ("filepath", "image", "filename", "path"), path
        )
        caption_column = _column(
            header, caption_column, ("caption", "title", "text"), path
        )
    return _table_rows(path, root, image_column, caption_column, has_header)


def _open_table(path: Path):
    # surrogateescape: a bad byte spoils its row, not the whole file.
    return open(path, newline="", encoding="utf-8", errors="surrogateescape")


def _delimiter(path: Path) -> str:
    return "\t" if path.suffix.lower() in (".tsv", ".tab") else ","


def _table_rows(
    path: Path, root: Path, image_index: int, caption_index: int, has_header: bool
) -> Iterator[Pair]:
    # A row the csv module refuses (a quote left open swallows every later
    # line into one field; a field over csv's size limit) is skipped with its
    # line, and a fresh reader resumes on the next line, so every other row
    # still comes through.
    start = 1 if has_header else 0  # physical lines before the reader's first
    while True:
        with _open_table(path) as handle:
            lines = itertools.islice(handle, start, None)
            rows = csv.reader(lines, delimiter=_delimiter(path), strict=True)
            while True:
                before = start + rows.line_num
                try:
                    row = next(rows)
                except StopIteration:
                    return
                except csv.Error as error:
                    hint = "; a quote left open?" if "end of data" in str(error) else ""
                    yield Pair(
                        f"{path.name}:{before + 1}", "",
                        problem=f"csv_error ({error}{hint})",
                    )  # fmt: skip
                    start = before + 1
                    break
                key = f"{path.name}:{start + rows.line_num}"
                if any("\udc80" <= ch <= "\udcff" for field in row for ch in field):
                    yield Pair(key, "", problem="not_utf8")
                elif len(row) <= max(image_index, caption_index):
                    yield Pair(key, "", problem="missing_columns")
                else:
                    image = Path(row[image_index])
                    yield Pair(
                        key=key,
                        caption=row[caption_index],
                        image_path=str(image if image.is_absolute() else root / image),
                    )


def _column(header: list[str], wanted, defaults: tuple[str, ...], path: Path) -> int:
    names = (str(wanted).lower(),) if wanted is not None else defaults
    for name in names:
        if name in header:
            return header.index(name)
    raise ValueError(f"{path}: no column {' or '.join(names)!r} in header {header}.")


def read_jsonl(
    path: str | Path, image_root: str | Path | None = None
) -> Iterator[Pair]:
    """JSON lines with `filename` and `caption` (DeCLIP's released format).

    A line that is not UTF-8 or not a JSON object with text `filename` and
    `caption` is a skipped pair naming its line; the others all come through.
    """
    path = Path(path)
    root = Path(image_root) if image_root else path.parent
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            key = f"{path.name}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Pair(key, "", problem="not_utf8")
                continue
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError:
                yield Pair(key, "", problem="malformed_row")
                continue
            fields = item if isinstance(item, dict) else {}
            filename, caption = fields.get("filename"), fields.get("caption")
            if not isinstance(filename, str) or not isinstance(caption, str):
                yield Pair(key, "", problem="malformed_row")
                continue
            image = Path(filename)
            yield Pair(
                key, caption, str(image if image.is_absolute() else root / image)
            )


def read_img2dataset(folder: str | Path) -> Iterator[Pair]:
    """An img2dataset output folder, `files` or `webdataset` layout."""
    folder = Path(folder)
    tars = sorted(folder.glob("*.tar"))
    if tars:
        for tar_path in tars:
            yield from _read_tar(tar_path)
        return
    for image in sorted(
        p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
    ):
        caption_file = image.with_suffix(".txt")
        caption = (
            caption_file.read_text(encoding="utf-8") if caption_file.exists() else ""
        )
        yield Pair(key=image.stem, caption=caption, image_path=str(image))


def _read_tar(tar_path: Path) -> Iterator[Pair]:
    members: dict[str, dict[str, bytes]] = {}
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            stem, _, extension = member.name.rpartition(".")
            handle = tar.extractfile(member)
            if handle is not None:
                members.setdefault(stem, {})[extension.lower()] = handle.read()
    for stem, files in sorted(members.items()):
        image = next((files[s[1:]] for s in IMAGE_SUFFIXES if s[1:] in files), b"")
        caption = files.get("txt", b"").decode("utf-8", errors="replace")
        yield Pair(key=Path(stem).name, caption=caption, image_bytes=image)


def load_pair(pair: Pair, resize_shorter: int | None = None):
    """Reads and checks one pair: `(key, image, format, caption)` or `(key, reason)`."""
    if pair.problem:
        return pair.key, pair.problem
    if pair.image_bytes is None and pair.image_path is None:
        return pair.key, "malformed_row"
    caption = pair.caption.strip()
    if not caption:
        return pair.key, "empty_caption"
    data = pair.image_bytes
    if data is None:
        try:
            data = Path(pair.image_path).read_bytes()
        except OSError:
            return pair.key, "missing_image_file"
    if not data:
        return pair.key, "empty_image"
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            field = _PIL_FIELDS.get(image.format or "")
            too_large = resize_shorter and min(image.size) > resize_shorter
            if field is None or too_large:
                image = image.convert("RGB")
                if too_large:
                    scale = resize_shorter / min(image.size)
                    size = (round(image.width * scale), round(image.height * scale))
                    image = image.resize(size, Image.Resampling.BICUBIC)
                buffer = io.BytesIO()
                image.save(buffer, "JPEG", quality=95)
                data, field = buffer.getvalue(), "jpg"
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return pair.key, "unreadable_image"
    return pair.key, data, field, caption


def _load(args):
    return load_pair(*args)


def write_shards(
    pairs: Iterable[Pair],
    output_dir: str | Path,
    num_shards: int,
    workers: int | None = None,
    resize_shorter: int | None = None,
    prefix: str = "part",
) -> dict:
    """Writes the usable pairs into `num_shards` shards; returns the manifest.

    Shards are written to temporary names and renamed when complete, so an
    interrupted conversion never leaves a shard that looks finished; a shard
    that would hold no pair is not written. Raises ValueError when no pair at
    all is usable (the manifest still lists why).
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    names = [
        f"{prefix}-{i:05d}-of-{num_shards:05d}.tfrecord" for i in range(num_shards)
    ]
    writers = [tf.io.TFRecordWriter(str(output_dir / f"{n}.tmp")) for n in names]
    counts = [0] * num_shards
    skipped: list[dict[str, str]] = []
    workers = workers or os.cpu_count() or 1
    tasks = ((pair, resize_shorter) for pair in pairs)
    try:
        # Threads: Pillow releases the GIL while it decodes and resizes, and
        # threads start without re-importing TensorFlow and Keras.
        with ThreadPool(workers) as pool:
            # Ordered results: the same inputs always give the same shards.
            for result in tqdm(
                pool.imap(_load, tasks, chunksize=16), desc="pairs", unit="pair"
            ):
                if len(result) == 2:
                    skipped.append({"key": result[0], "reason": result[1]})
                    continue
                key, data, field, caption = result
                shard = sum(counts) % num_shards
                writers[shard].write(encode_example(key, data, field, caption))
                counts[shard] += 1
    except BaseException:
        # Nothing half-written stays behind an interrupted conversion.
        for writer, name in zip(writers, names, strict=True):
            writer.close()
            (output_dir / f"{name}.tmp").unlink(missing_ok=True)
        raise
    for writer in writers:
        writer.close()
    for name, count in zip(names, counts, strict=True):
        if count:
            os.replace(output_dir / f"{name}.tmp", output_dir / name)
        else:
            (output_dir / f"{name}.tmp").unlink()
    manifest = {
        "pairs": sum(counts),
        "shards": {n: c for n, c in zip(names, counts, strict=True) if c},
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "skipped": skipped,
    }
    partial = output_dir / "manifest.json.partial"
    partial.write_text(json.dumps(manifest, indent=2))
    os.replace(partial, output_dir / "manifest.json")
    if not manifest["pairs"]:
        reasons = manifest["skipped_by_reason"] or "no input rows"
        raise ValueError(
            f"No usable pair to write ({reasons}); see {output_dir / 'manifest.json'}."
        )
    return manifest


def read_pairs(
    source: str | Path, kind: str | None = None, **options
) -> Iterator[Pair]:
    """The pairs of `source`; `kind` is guessed from the path when not given."""
    source = Path(source)
    if kind is None:
        if source.is_dir():
            kind = "img2dataset"
        elif source.suffix.lower() in (".jsonl", ".json"):
            kind = "jsonl"
        else:
            kind = "csv"
    if not source.exists():
        raise FileNotFoundError(f"No such input: {source}")
    if kind == "img2dataset":
        return read_img2dataset(source)
    if kind == "jsonl":
        return read_jsonl(source, options.get("image_root"))
    if kind in ("csv", "tsv"):
        return read_table(
            source,
            options.get("image_column"),
            options.get("caption_column"),
            options.get("image_root"),
        )
    raise ValueError(
        f"Unknown input kind {kind!r}; use csv, tsv, jsonl or img2dataset."
    )

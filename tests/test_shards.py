"""Every input form -> shards -> the same pairs back."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from PIL import Image

from declip_keras.cli import main
from declip_keras.data.records import iterate_examples, list_shards
from declip_keras.data.shards import read_pairs, write_shards

pytestmark = pytest.mark.backend_independent


def png(value: int, size=(20, 12)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


CAPTIONS = {f"img{i}": f"a square of gray level {10 * i}" for i in range(6)}


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, key in enumerate(CAPTIONS):
        (folder / f"{key}.png").write_bytes(png(10 * i))
    (folder / "broken.png").write_bytes(b"not a png")
    return folder


def read_back(output) -> dict[str, bytes]:
    pairs = {}
    for shard in sorted(output.glob("*.tfrecord")):
        for record in iterate_examples(str(shard)):
            pairs[record["txt"].decode()] = record["png"]
    return pairs


def check(manifest, output, expected_skips: dict[str, int]):
    pairs = read_back(output)
    assert sorted(pairs) == sorted(CAPTIONS.values())
    assert manifest["pairs"] == len(CAPTIONS)
    assert manifest["skipped_by_reason"] == expected_skips
    # Shards of similar size.
    sizes = list(manifest["shards"].values())
    assert max(sizes) - min(sizes) <= 1
    assert json.loads((output / "manifest.json").read_text())["pairs"] == len(CAPTIONS)


def test_csv_with_header(image_folder, tmp_path):
    table = tmp_path / "pairs.csv"
    rows = [f"images/{k}.png,{c}" for k, c in CAPTIONS.items()]
    rows += [
        "images/broken.png,broken",
        "images/missing.png,missing",
        "images/img0.png,",
    ]
    table.write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    manifest = write_shards(
        read_pairs(table), tmp_path / "out", num_shards=4, workers=2
    )
    check(
        manifest,
        tmp_path / "out",
        {"unreadable_image": 1, "missing_image_file": 1, "empty_caption": 1},
    )


def test_headerless_tsv_in_cc3m_order(image_folder, tmp_path):
    table = tmp_path / "cc3m.tsv"
    table.write_text(
        "".join(f"{c}\t{image_folder / k}.png\n" for k, c in CAPTIONS.items())
    )
    pairs = read_pairs(table, image_column=1, caption_column=0)
    manifest = write_shards(pairs, tmp_path / "out", num_shards=2, workers=1)
    check(manifest, tmp_path / "out", {})


def test_jsonl_released_declip_format(image_folder, tmp_path):
    lines = [
        json.dumps({"filename": f"{k}.png", "caption": c}) for k, c in CAPTIONS.items()
    ]
    (tmp_path / "train.jsonl").write_text("\n".join([*lines, "{not json"]) + "\n")
    pairs = read_pairs(tmp_path / "train.jsonl", image_root=image_folder)
    manifest = write_shards(pairs, tmp_path / "out", num_shards=3, workers=2)
    check(manifest, tmp_path / "out", {"malformed_row": 1})


def test_img2dataset_files_and_webdataset_layouts(tmp_path):
    files = tmp_path / "files" / "00000"
    files.mkdir(parents=True)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for i, caption in enumerate(CAPTIONS.values()):
            stem = f"{i:09d}"
            (files / f"{stem}.png").write_bytes(png(10 * i))
            (files / f"{stem}.txt").write_text(caption)
            for name, payload in (
                (f"{stem}.png", png(10 * i)),
                (f"{stem}.txt", caption.encode()),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    (tmp_path / "wds").mkdir()
    (tmp_path / "wds" / "00000.tar").write_bytes(buffer.getvalue())
    for layout in ("files", "wds"):
        output = tmp_path / f"out-{layout}"
        manifest = write_shards(
            read_pairs(tmp_path / layout), output, num_shards=2, workers=1
        )
        check(manifest, output, {})


def test_resize_shorter_side(image_folder, tmp_path):
    (tmp_path / "big").mkdir()
    big = io.BytesIO()
    Image.new("RGB", (300, 200), "red").save(big, "PNG")
    (tmp_path / "big" / "a.png").write_bytes(big.getvalue())
    (tmp_path / "big" / "a.txt").write_text("a red rectangle")
    write_shards(
        read_pairs(tmp_path / "big"), tmp_path / "out", 1, 1, resize_shorter=50
    )
    record = next(iterate_examples(str(next((tmp_path / "out").glob("*.tfrecord")))))
    assert Image.open(io.BytesIO(record["jpg"])).size == (75, 50)


def test_cli_make_tfrecords_then_check_data(image_folder, tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    table.write_text(
        "image,caption\n"
        + "".join(f"images/{k}.png,{c}\n" for k, c in CAPTIONS.items())
    )
    output = tmp_path / "shards"
    assert (
        main(
            [
                "make-tfrecords",
                str(table),
                str(output),
                "--num-shards",
                "2",
                "--workers",
                "1",
            ]
        )
        == 0
    )
    capsys.readouterr()
    assert main(["check-data", str(output / "*.tfrecord")]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["usable"] == len(CAPTIONS) and counts["read"] == len(CAPTIONS)
    assert main(["check-data", str(tmp_path / "nope-*.tfrecord")]) == 2


def make_tfrecords(*args: str) -> int:
    return main(["make-tfrecords", *args, "--num-shards", "4", "--workers", "1"])


def test_a_bad_byte_skips_its_row_and_the_conversion_goes_on(
    image_folder, tmp_path, capsys
):
    rows = [f"images/{k}.png,{c}".encode() for k, c in CAPTIONS.items()]
    rows.insert(2, b"images/img0.png,caf\xe9 latin-1")  # line 4 of the file
    table = tmp_path / "pairs.csv"
    table.write_bytes(b"filepath,caption\n" + b"\n".join(rows) + b"\n")
    assert make_tfrecords(str(table), str(tmp_path / "out")) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    check(manifest, tmp_path / "out", {"not_utf8": 1})
    assert manifest["skipped"] == [{"key": "pairs.csv:4", "reason": "not_utf8"}]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_rows_the_csv_module_refuses_are_skipped_with_their_lines(
    image_folder, tmp_path, capsys
):
    """A quote left open and a 200,000-character caption (over csv's field
    limit) each lose their own row only, through `make-tfrecords`."""
    rows = [f"images/{k}.png,{c}" for k, c in CAPTIONS.items()]
    rows.insert(2, "images/img0.png," + "long " * 40_000)  # line 4
    rows.append('images/img1.png,"a caption whose quote never closes')  # line 9
    rows += ["images/img2.png,after the quote", "images/img3.png,and on"]
    table = tmp_path / "pairs.csv"
    table.write_text("filepath,caption\n" + "\n".join(rows) + "\n")
    assert make_tfrecords(str(table), str(tmp_path / "out")) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["pairs"] == len(CAPTIONS) + 2
    long, quote = manifest["skipped"]
    assert long["key"] == "pairs.csv:4" and "field limit" in long["reason"]
    assert quote["key"] == "pairs.csv:9" and "quote left open" in quote["reason"]
    captions = {r["txt"] for s in list_shards(str(tmp_path / "out" / "*.tfrecord"))
                for r in iterate_examples(s)}  # fmt: skip
    assert {b"after the quote", b"and on"} <= captions


def test_bad_json_lines_are_skipped_with_their_lines(image_folder, tmp_path):
    """A non-UTF-8 byte, a caption that is not text and a line that is not an
    object each lose their own line; no temporary shard is left."""
    lines = [json.dumps({"filename": f"{k}.png", "caption": c}).encode()
             for k, c in CAPTIONS.items()]  # fmt: skip
    lines.insert(1, b'{"filename": "img0.png", "caption": "caf\xe9"}')
    lines.insert(3, json.dumps({"filename": "img0.png", "caption": 7}).encode())
    lines.append(b"[1, 2]")
    source = tmp_path / "train.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    manifest = write_shards(
        read_pairs(source, image_root=image_folder), tmp_path / "out", 2, workers=1
    )
    assert manifest["pairs"] == len(CAPTIONS)
    assert manifest["skipped"] == [
        {"key": "train.jsonl:2", "reason": "not_utf8"},
        {"key": "train.jsonl:4", "reason": "malformed_row"},
        {"key": f"train.jsonl:{len(lines)}", "reason": "malformed_row"},
    ]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_missing_columns_and_no_usable_pair_are_one_line_errors(
    image_folder, tmp_path, capsys
):
    table = tmp_path / "pairs.csv"
    table.write_text("picture,words\nimages/img0.png,a caption\n")
    assert make_tfrecords(str(table), str(tmp_path / "a")) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "pairs.csv" in error and "column" in error
    assert not (tmp_path / "a").exists()

    table.write_text("filepath,caption\nimages/gone.png,a caption\n")
    assert make_tfrecords(str(table), str(tmp_path / "b")) == 2
    error = capsys.readouterr().err
    assert "No usable pair" in error and "missing_image_file" in error
    # No shard under a final name, no temporary file left behind.
    assert not list((tmp_path / "b").glob("*.tfrecord*"))

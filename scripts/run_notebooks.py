"""Executes the tutorial notebooks top to bottom and saves their outputs.

    make notebooks                                  # every notebook, in place
    python scripts/run_notebooks.py notebooks/03_*.ipynb --output /tmp/out

Each notebook runs in a fresh Jupyter kernel (this interpreter's ipykernel)
in the folder it is written to, as Jupyter runs it; the notebooks keep their
scratch files in `work/` there, and notebook 5 serves the model notebook 3
trained when it is there. A cell that raises
stops that notebook, and the command exits non-zero after the others have run.
Every executed notebook is written atomically, so a failed run never leaves a
half-written file; a failed notebook is not written at all.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat.reader import NotJSONError


def execute(path: Path, workdir: Path, timeout: int) -> nbformat.NotebookNode:
    """The notebook at `path`, executed with `workdir` as its working folder."""
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()
    return notebook


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path)
    parser.add_argument(
        "--output",
        type=Path,
        help="folder to run in and write the executed notebooks to (default: in place)",
    )
    parser.add_argument(
        "--timeout", type=int, default=600, help="seconds one cell may take"
    )
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if not path.is_file():
            parser.error(f"no notebook at {path}")

    failed = []
    for path in args.notebooks:
        folder = args.output or path.parent
        folder.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        try:
            notebook = execute(path, folder, args.timeout)
        except CellExecutionError as error:
            # The error's text holds the cell and the traceback.
            print(f"FAILED {path}:\n{error}", file=sys.stderr)
            failed.append(path)
            continue
        except NotJSONError:
            print(f"FAILED {path}: not a notebook (no JSON)", file=sys.stderr)
            failed.append(path)
            continue
        target = folder / path.name
        partial = target.with_name(f".{target.name}.partial")
        nbformat.write(notebook, partial)
        os.replace(partial, target)
        print(
            f"{path.name}: {time.perf_counter() - start:.0f} s -> {target}", flush=True
        )
    if failed:
        failures = ", ".join(map(str, failed))
        print(f"{len(failed)} notebook(s) failed: {failures}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

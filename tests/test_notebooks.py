"""The tutorial notebooks run top to bottom, as `make notebooks` runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _outputs(notebook: dict) -> list[dict]:
    return [
        output
        for cell in notebook["cells"]
        if cell["cell_type"] == "code"
        for output in cell["outputs"]
    ]


def _text(notebook: dict) -> str:
    return "".join("".join(output.get("text", "")) for output in _outputs(notebook))


def test_the_committed_notebooks_carry_the_outputs_of_a_whole_run():
    assert len(NOTEBOOKS) == 5
    for path in NOTEBOOKS:
        notebook = json.loads(path.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        counts = [cell["execution_count"] for cell in code]
        # One kernel, every cell once, in order: nothing run by hand out of turn.
        assert counts == list(range(1, len(code) + 1)), path.name
        assert not [o for o in _outputs(notebook) if o["output_type"] == "error"]
        images = [o for o in _outputs(notebook) if "image/png" in o.get("data", {})]
        assert images, f"{path.name} shows no plot"


@pytest.mark.one_backend("torch", reason="the notebooks start their own kernels")
@pytest.mark.slow
def test_every_notebook_runs_top_to_bottom(tmp_path):
    command = [
        sys.executable,
        str(ROOT / "scripts" / "run_notebooks.py"),
        *map(str, NOTEBOOKS),
        "--output",
        str(tmp_path),
        # `make test` runs the backends' passes side by side: a cell may take
        # several times what it takes alone.
        "--timeout",
        "1800",
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    executed = {p.name: json.loads((tmp_path / p.name).read_text()) for p in NOTEBOOKS}
    # The claims the notebooks check themselves, as they print them.
    assert "over chance" in _text(executed["03_train_watch_evaluate.ipynb"])
    assert "devices: 2" in _text(executed["04_three_backends.ipynb"])


@pytest.mark.backend_independent
def test_a_failing_cell_fails_the_run_and_leaves_no_notebook(tmp_path):
    cells = [
        {"cell_type": "code", "metadata": {}, "source": "x = 1", "outputs": [],
         "execution_count": None},
        {"cell_type": "code", "metadata": {}, "source": "raise ValueError('boom')",
         "outputs": [], "execution_count": None},
    ]  # fmt: skip
    notebook = {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "broken.ipynb"
    source.write_text(json.dumps(notebook))
    command = [
        sys.executable,
        str(ROOT / "scripts" / "run_notebooks.py"),
        str(source),
        "--output",
        str(tmp_path / "out"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    assert done.returncode == 1
    assert "boom" in done.stderr
    assert not (tmp_path / "out" / "broken.ipynb").exists()

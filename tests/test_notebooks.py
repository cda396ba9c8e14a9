"""The first tutorial notebook runs top to bottom (its cells in one namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


def run_notebook(path: Path) -> dict:
    namespace: dict = {}
    for cell in json.loads(path.read_text())["cells"]:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), str(path), "exec"), namespace)
    return namespace


@pytest.mark.one_backend("torch", reason="backend-independent; run once")
def test_model_and_losses_notebook_runs():
    namespace = run_notebook(NOTEBOOKS / "01_model_and_losses.ipynb")
    losses = namespace["history"].history["loss"]
    assert losses[-1] < losses[0]

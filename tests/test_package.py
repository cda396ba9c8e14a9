"""The package's front door: its public names, and subpackages that import light."""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import pytest
from helpers import SMALL

import declip_keras
from declip_keras.models.declip import DeCLIP


@pytest.mark.backend_independent
def test_every_public_name_comes_from_its_subpackage_module():
    public = {
        name
        for name, value in vars(declip_keras).items()
        if not name.startswith("_") and not inspect.ismodule(value)
        and name != "annotations"  # from __future__
    }  # fmt: skip
    assert public == set(declip_keras.__all__)
    for name in declip_keras.__all__:
        value = getattr(declip_keras, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            # declip_keras.<subpackage>.<module>
            assert value.__module__.count(".") == 2, (name, value.__module__)
    assert declip_keras.PRESETS is sys.modules["declip_keras.models.presets"].PRESETS


@pytest.mark.backend_independent
def test_importing_the_package_registers_its_keras_classes(tmp_path):
    """In a fresh process, as in someone else's script: `import declip_keras`
    is all `keras.saving.load_model` needs to read a DeCLIP file."""
    path = tmp_path / "model.keras"
    model = DeCLIP.from_preset("tiny", **SMALL)
    schedule = declip_keras.WarmupCosine(peak=1e-3, warmup_steps=2, total_steps=10)
    model.compile(optimizer=declip_keras.make_optimizer(model, schedule))
    model.optimizer.build(model.trainable_variables)
    model.save(path)
    code = (
        "import sys\n"
        "import declip_keras, keras\n"
        "model = keras.saving.load_model(sys.argv[1])\n"
        "assert type(model) is declip_keras.DeCLIP, type(model)\n"
        "for cls in (declip_keras.WarmupCosine, declip_keras.FeatureQueue):\n"
        "    name = keras.saving.get_registered_name(cls)\n"
        "    assert keras.saving.get_registered_object(name) is cls, name\n"
        "print(model.count_params())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1] == str(keras.saving.load_model(path).count_params())


def _code_outside_the_package() -> dict[str, str]:
    """Python a user copies or runs: notebooks' code cells, scripts, docs' blocks."""
    root = Path(__file__).resolve().parents[1]
    sources = {
        str(p.relative_to(root)): p.read_text() for p in root.glob("scripts/*.py")
    }
    for notebook in root.glob("notebooks/*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        code = [
            "".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"
        ]
        # Notebook cells may hold IPython magics; those lines are not Python.
        lines = "\n".join(code).splitlines()
        kept = [line for line in lines if not line.lstrip().startswith(("%", "!"))]
        sources[str(notebook.relative_to(root))] = "\n".join(kept)
    for page in [root / "README.md", *root.glob("docs/*.md")]:
        blocks = re.findall(r"```python\n(.*?)```", page.read_text(), re.DOTALL)
        if blocks:
            sources[str(page.relative_to(root))] = "\n".join(blocks)
    return sources


def _unresolved(module: str, names: list[str]) -> list[str]:
    if importlib.util.find_spec(module) is None:
        return [module]
    found = importlib.import_module(module)
    return [
        f"{module}.{name}"
        for name in names
        if not hasattr(found, name)
        and importlib.util.find_spec(f"{module}.{name}") is None
    ]


@pytest.mark.backend_independent
def test_every_import_of_the_package_outside_it_resolves():
    """A rename inside the package must not leave a notebook or a page behind."""
    missing = []
    for where, code in _code_outside_the_package().items():
        for node in ast.walk(ast.parse(code, filename=where)):
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                wanted = [(node.module or "", [alias.name for alias in node.names])]
            elif isinstance(node, ast.Import):
                wanted = [(alias.name, []) for alias in node.names]
            else:
                continue
            missing += [
                f"{where}: {name}"
                for module, names in wanted
                if module.split(".")[0] == "declip_keras"
                for name in _unresolved(module, names)
            ]
    assert not missing, missing


def _module_imports() -> dict[str, set[str]]:
    """Each package module -> the package modules it imports at its top level
    (imports inside functions are deliberate deferrals, not dependencies)."""
    root = Path(declip_keras.__file__).parent
    graph = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        graph[name] = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level == 0:
                targets = [node.module or ""]
                targets += [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t.startswith("declip_keras.")}
    return {name: deps & set(graph) - {name} for name, deps in graph.items()}


@pytest.mark.backend_independent
def test_the_package_has_no_import_cycle():
    graph = _module_imports()
    assert "declip_keras.models.declip" in graph
    done, path = set(), []

    def visit(name: str) -> None:
        assert name not in path, " -> ".join([*path[path.index(name) :], name])
        if name in done:
            return
        path.append(name)
        for dependency in sorted(graph[name]):
            visit(dependency)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        visit(name)

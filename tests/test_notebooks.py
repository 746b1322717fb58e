"""The worked examples in notebooks/: saved without outputs, and each one executes end to end with nbclient, with
``EBM_NOTEBOOK_QUICK=1`` (every budget shrunk), from the repository root, in a kernel running this interpreter."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = ("01_dynamics.ipynb", "02_ep_training.ipynb", "03_distillation_and_robustness.ipynb",
             "04_hardware_mapping_and_latency.ipynb")
QUICK_SWITCH = 'QUICK = os.environ.get("EBM_NOTEBOOK_QUICK") == "1"'
KERNEL = "ebm-toolkit-tests"
CELL_TIMEOUT_S = 300


def read(name: str):
    return nbformat.read(NOTEBOOK_DIR / name, as_version=4)


def code_cells(notebook) -> list:
    return [cell for cell in notebook.cells if cell.cell_type == "code"]


def test_the_notebooks_are_the_four_worked_examples():
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(NOTEBOOKS)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_saved_without_outputs(name):
    notebook = read(name)
    nbformat.validate(notebook)
    for index, cell in enumerate(code_cells(notebook)):
        assert cell.outputs == [], f"{name}: code cell {index} was saved with outputs"
        assert cell.execution_count is None, f"{name}: code cell {index} was saved with an execution count"
        assert "execution" not in cell.metadata, f"{name}: code cell {index} was saved with execution timings"
    assert QUICK_SWITCH in code_cells(notebook)[0].source, f"{name}: the first code cell must read the QUICK switch"


@pytest.fixture(scope="module")
def jupyter_dirs(tmp_path_factory):
    """A kernel spec that runs this interpreter (the venv's python, with ipykernel), put first on JUPYTER_PATH so
    that a user's own "python3" spec, which may name another Python, is never picked; and private IPython and
    runtime folders."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "data" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "ebm-toolkit tests", "language": "python"}))
    return root


def outputs_of(cell, output_type: str) -> list:
    return [o for o in cell.get("outputs", []) if o.output_type == output_type]


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_runs_with_quick_settings(name, jupyter_dirs, tmp_path, monkeypatch):
    monkeypatch.setenv("EBM_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))               # the notebooks write into tempfile.mkdtemp()
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dirs / "data"))
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(jupyter_dirs / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(jupyter_dirs / "ipython"))
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", ""))
    monkeypatch.delenv("MPLBACKEND", raising=False)           # let the kernel draw figures inline
    before = sorted(p.name for p in NOTEBOOK_DIR.iterdir())
    notebook = read(name)
    client = NotebookClient(notebook, kernel_name=KERNEL, timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(ROOT)}})
    client.execute()   # raises CellExecutionError with the traceback of a failing cell

    cells = code_cells(notebook)
    for index, cell in enumerate(cells):
        assert not outputs_of(cell, "error"), f"{name}: code cell {index} failed"
        if "plt.show()" in cell.source or "display(" in cell.source:
            shown = [o for o in outputs_of(cell, "display_data") if {"image/png", "text/markdown"} & set(o.data)]
            assert shown, f"{name}: code cell {index} shows no figure (or table)"
    figures = sum("image/png" in o.data for cell in cells for o in outputs_of(cell, "display_data"))
    assert figures >= 3, f"{name}: only {figures} figures"
    last = "".join(o.text for o in outputs_of(cells[-1], "stream") if o.name == "stdout")
    assert "all checks passed" in last, f"{name}: its final checks did not report success: {last!r}"
    assert sorted(p.name for p in NOTEBOOK_DIR.iterdir()) == before, f"{name} wrote into notebooks/"
    prefix = f"ebm_notebook{name[:2]}_"
    assert any(p.name.startswith(prefix) for p in tmp_path.iterdir()), f"{name}: no output folder in TMPDIR"

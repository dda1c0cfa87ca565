"""Every notebook runs top to bottom on small data (``VIMS_NOTEBOOK_QUICK=1``), in a real kernel.

The notebooks are stored with their outputs (``make notebooks`` runs them on the full data and saves
them, so that they read without running); here a copy is run again and must give no error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.required import missing
from vims.paths import REPO_ROOT, datasets_dir

NOTEBOOKS = sorted((REPO_ROOT / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not datasets_dir().exists():
        missing(f"public data sets not found at {datasets_dir()} (set VIMS_DATASETS)")
    if "guest" in path.stem and shutil.which("qemu-system-x86_64") is None:
        missing("qemu-system-x86_64 not found (apt-get install qemu-system-x86)")
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:  # run afresh: the saved outputs are not what is checked
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    monkeypatch.setenv("VIMS_NOTEBOOK_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("VIMS_DATASETS", str(datasets_dir()))
    monkeypatch.chdir(tmp_path)
    client = NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": tmp_path}})
    client.execute()  # raises CellExecutionError, naming the cell, when a cell fails
    errors = [o for c in notebook.cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors

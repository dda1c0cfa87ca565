"""Run notebooks top to bottom and save them with their outputs (``make notebooks``).

``python notebooks/execute.py [NOTEBOOK ...]`` (default: 01 and 02, which need only the data sets;
03 and 04 boot a guest, so run them by name under the shared guest lock). Each is executed in a real kernel
from the notebooks folder on the full data sets (``VIMS_DATASETS``) and written back in place.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

HERE = Path(__file__).resolve().parent
DEFAULT = ["01_datasets.ipynb", "02_models.ipynb"]


def execute(path: Path) -> None:
    """Execute ``path`` and save it with its outputs; a failing cell raises, naming the cell."""
    notebook = nbformat.read(path, as_version=4)
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    NotebookClient(notebook, timeout=3600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    nbformat.write(notebook, path)
    print(f"{path.name}: executed and saved with its outputs")


if __name__ == "__main__":
    for name in sys.argv[1:] or DEFAULT:
        execute((HERE / name) if not Path(name).exists() else Path(name))

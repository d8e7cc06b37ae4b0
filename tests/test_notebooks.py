"""notebooks/ run top to bottom in a fresh kernel (their asserts state what they show), and are
committed without outputs."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).parents[1] / "notebooks"


@pytest.mark.parametrize("name", ["loss_math", "quickstart"])
def test_notebook_executes(name, tmp_path):
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        f"{name}.ipynb is committed with outputs"
    # Raises CellExecutionError, with the cell and its traceback, when a cell fails.
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

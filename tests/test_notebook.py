"""notebooks/quickstart.ipynb runs top to bottom (2 steps of the built-in model), so it cannot rot."""

from __future__ import annotations

import csv

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, monkeypatch):
    notebook = nbformat.read(ROOT / "notebooks" / "quickstart.ipynb", as_version=4)
    monkeypatch.setenv("SMOLFACTORY_NOTEBOOK_STEPS", "2")  # the kernel inherits the environment
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.outputs]
    assert not [output for output in outputs if output.output_type == "error"]
    assert any("image/png" in output.get("data", {}) for output in outputs)  # the loss plot was drawn
    answer = "".join(output.get("text", "") for output in notebook.cells[-1].outputs).strip()
    assert answer  # the chat cell printed an answer
    metrics = next((tmp_path / "outputs" / "notebook").rglob("metrics.csv"))
    losses = [row["train_loss"] for row in csv.DictReader(metrics.open()) if row.get("train_loss")]
    assert len(losses) == 2

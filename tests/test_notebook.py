"""``notebooks/reproduce.ipynb`` runs from top to bottom on the tiny default (nbclient)."""

from __future__ import annotations

import nbformat
import pytest
from nbclient import NotebookClient

from tests.conftest import ROOT, cache_dir

NOTEBOOK = ROOT / "notebooks" / "reproduce.ipynb"


def test_reproduce_notebook_executes(tmp_path, monkeypatch, pretrained):
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("MMKE_CACHE_DIR", str(cache_dir()))
    monkeypatch.setenv("MMKE_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.delenv("MMKE_NOTEBOOK_RUNS", raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    markdown = [o["data"]["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    assert any("| Method |" in m for m in markdown)
    assert any("image/png" in o.get("data", {}) for o in outputs)
    assert len(list((tmp_path / "runs").iterdir())) == 3
    assert (tmp_path / "figures" / "more.figure7.png").is_file()

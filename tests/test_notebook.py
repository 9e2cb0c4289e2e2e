"""Executes notebooks/quickstart.ipynb with nbclient on the venv's own Python and checks that every editor's
edit succeeded (ES 100 on the edited fact, which the unedited model gets wrong)."""
import json
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def _kernel_for_this_python(tmp_path, monkeypatch) -> str:
    """Registers (via $JUPYTER_PATH) a 'jaxedit-test' kernel that runs sys.executable, the venv's Python,
    so the notebook sees the same installed packages as the tests whatever kernels are installed."""
    folder = tmp_path / "jupyter" / "kernels" / "jaxedit-test"
    folder.mkdir(parents=True)
    (folder / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "jaxedit test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "jaxedit-test"


def test_quickstart_notebook_runs_and_edits(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name=_kernel_for_this_python(tmp_path, monkeypatch),
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    client.execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, errors
    text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream")
    line = next(l for l in text.splitlines() if l.startswith("EFFICACY "))
    es = json.loads(line[len("EFFICACY "):])
    for method in ("rome", "memit", "emmet"):
        assert es[method] == 100.0, (method, es)

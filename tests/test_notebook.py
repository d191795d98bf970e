"""notebooks/quickstart.ipynb executes from top to bottom in a fresh kernel and draws its figures."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_notebook_is_stored_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cell"
    assert all(not c.outputs and c.execution_count is None for c in code), "clear the outputs before committing"


def test_notebook_runs_and_plots(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from jupyter_client.kernelspec import KernelSpecManager
    from nbclient import NotebookClient

    spec = KernelSpecManager().get_kernel_spec("python3")
    # jupyter_client starts a kernel whose argv[0] is a bare "python" with this very interpreter
    bare = ("python", "python3", f"python{sys.version_info[0]}.{sys.version_info[1]}")
    assert spec.argv[0] in (*bare, sys.executable), spec.argv

    monkeypatch.setenv("WANDB_MODE", "offline")
    # one compute thread: on a small shared machine OpenMP's barriers stall badly when a core is taken
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # one extra cell (in memory only) tells which interpreter ran the notebook
    nb.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.prefix)"))
    client = NotebookClient(
        nb, kernel_name="python3", timeout=600, allow_errors=False, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, errors
    images = [out for out in outputs if out.output_type == "display_data" and "image/png" in out.get("data", {})]
    assert len(images) >= 2, "expected the digits figure and the learning curves as PNG outputs"
    prefix = "".join(out.get("text", "") for out in nb.cells[-1].outputs).strip()
    assert prefix == sys.prefix, f"the notebook ran in {prefix!r}, not in this environment {sys.prefix!r}"
    # the notebook worked in the temporary directory: logs, the teacher and the exported student are there
    out = tmp_path / "outputs" / "quickstart"
    assert (out / "teacher.pt").is_file() and (out / "student_kd.pt").is_file()
    for name in ("teacher", "student alone", "KD", "RKD", "AT"):
        assert (out / "runs" / name / "version_0" / "metrics.csv").is_file(), name

"""notebooks/eval_mmeb.ipynb end to end (nbclient, the `python3` kernel of this interpreter) on a tiny
checkpoint and the small synthetic benchmark, parameterised through its environment variables."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

from vlm2vec_jax.data.synthetic import EVAL_DATASETS, generate

pytestmark = pytest.mark.slow

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "eval_mmeb.ipynb"
MAX_ROWS = 6
FIGURES = ("meta_tasks", "neighbours", "pca")


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("notebook_bench") / "bench"
    generate(out, seed=0, scale="small")
    return out / "eval"


def run(notebook: nbformat.NotebookNode) -> None:
    """Execute in place, started where Jupyter would start it (the notebook's directory)."""
    client = NotebookClient(
        notebook, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()


def outputs(notebook: nbformat.NotebookNode, mime: str) -> list[str]:
    return [
        out["data"][mime]
        for cell in notebook.cells if cell.cell_type == "code"
        for out in cell.outputs if mime in out.get("data", {})
    ]


def test_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)
    assert "VLM2VEC_NOTEBOOK_MODEL" in code[0].source  # parameters first


def test_notebook_runs_end_to_end(tiny_ckpt, bench, tmp_path, monkeypatch):
    out = tmp_path / "out"
    # The kernel inherits the environment; monkeypatch restores it afterwards.
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_MODEL", str(tiny_ckpt))
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_DATA", str(bench))
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_MAX_ROWS", str(MAX_ROWS))
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel must be this interpreter (the venv), not whatever `python` a kernelspec names.
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print(sys.executable)"))
    run(notebook)  # raises CellExecutionError on the first failing cell

    printed = notebook.cells[-1].outputs[0]["text"].strip()
    assert Path(printed).resolve() == Path(sys.executable).resolve()

    # The summary table: B3 Table 1's columns, the dataset-count row, every dataset.
    (table,) = outputs(notebook, "text/markdown")
    assert "| Model | Ret. | Cla. | VQA | Gro. | ID | OOD | Avg. |" in table
    assert "| #Datasets | 4 | 2 | 2 | 2 | 6 | 4 | 10 |" in table
    assert all(f"| {name} |" in table for name in EVAL_DATASETS)
    # Three figures (meta-task bars, neighbours, PCA), shown and saved.
    assert len(outputs(notebook, "image/png")) == len(FIGURES)
    assert all((out / f"{name}.png").stat().st_size > 0 for name in FIGURES)
    summary = json.loads((out / "summary.json").read_text())
    assert {d["num_pred"] for d in summary["datasets"].values()} == {MAX_ROWS}
    assert summary["overall"]["num_datasets"] == len(EVAL_DATASETS)
    # The neighbours and the projection reuse the evaluation's cached vectors.
    stdout = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code" for out in cell.outputs)
    assert ", 0 re-encoded" in stdout
    source = "".join(cell.source for cell in notebook.cells)
    assert "Table 1" in source and "B3++ (Qwen2-7B)" in source


def test_notebook_says_to_run_the_demo_without_a_model(bench, tmp_path, monkeypatch):
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_MODEL", str(tmp_path / "no_such_run"))
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_DATA", str(bench))
    monkeypatch.setenv("VLM2VEC_NOTEBOOK_OUT", str(tmp_path / "out"))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    with pytest.raises(CellExecutionError) as failure:
        run(nbformat.read(NOTEBOOK, as_version=4))
    assert failure.value.ename == "FileNotFoundError"
    assert "run `make demo` first" in failure.value.evalue
    assert not (tmp_path / "out").exists()

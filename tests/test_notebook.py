"""notebooks/quickstart.ipynb and notebooks/explain.ipynb: committed with their outputs (they render where people
browse the code), and run end to end (synthetic data, `tiny` preset) in a fresh ``python3`` kernel: the quickstart
draws every figure and ends with a consistent open / closed / overall table; the explain notebook loads an export
and explains answers with both maps, then ranks test images for a caption with a retrieval model."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
EXPLAIN_NOTEBOOK = NOTEBOOK.with_name("explain.ipynb")
CELL_TIMEOUT_S = 300
# "open      29     0.000": question type, count, accuracy (nan when a type has no questions).
TABLE_ROW = re.compile(r"^(open|closed|overall)\s+(\d+)\s+(\d\.\d{3}|nan)\s*$", re.M)

INSTALL_HINT = "pip install 'umd_lightning[notebook]'"
# What the notebooks must not show a reader: Lightning's litlogger tip, the `_pytree` deprecation warning, the
# MiniLM pooler's load report, Lightning's note on an unset `weights_only`.
NOISE = ("litlogger", "LeafSpec", "LOAD REPORT", "`weights_only` was not set")
nbformat = pytest.importorskip("nbformat", reason=f"nbformat is not installed ({INSTALL_HINT})")


def require_kernel() -> None:
    """Skip unless nbclient and ipykernel (the ``python3`` kernel of this interpreter) are importable."""
    for module in ("nbclient", "ipykernel"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed ({INSTALL_HINT})")


def text_of(cell) -> str:
    """Everything a code cell printed (streams and plain-text results), joined."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif output["output_type"] in ("execute_result", "display_data"):
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "".join(parts)


@pytest.mark.parametrize("path", [NOTEBOOK, EXPLAIN_NOTEBOOK], ids=lambda p: p.name)
def test_notebook_is_committed_with_its_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    unrun = [i for i, cell in enumerate(code) if cell.execution_count is None]
    assert not unrun, f"code cells {unrun} were not run: execute the notebook before committing it"
    assert all(output["output_type"] != "error" for cell in code for output in cell.outputs)
    figures = [cell for cell in code if "plt.show()" in cell.source]
    assert figures and all(
        "image/png" in output.get("data", {}) for cell in figures for output in cell.outputs if "data" in output
    )
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in code[0].source, "the first cell must switch the hub off"
    noisy = [(i, word) for i, cell in enumerate(code) for word in NOISE if word in text_of(cell)]
    assert not noisy, f"console noise in the committed outputs (code cell, text): {noisy}"


@pytest.mark.slow
def _execute(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Run a copy of the notebook at ``path`` in a fresh kernel; the executed notebook."""
    require_kernel()
    from nbclient import NotebookClient

    # The kernel inherits this environment. Matplotlib's inline backend renders with Agg (no display) and puts
    # each figure in the outputs; plain "Agg" would make plt.show() a no-op and leave nothing to check. The
    # kernelspec's `python` argv is replaced by this interpreter (jupyter_client does so for the native
    # kernel), so the kernel imports umd_lightning from this environment.
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("TMPDIR", str(tmp_path))  # the notebook's working folder lands in tmp_path
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell
    return notebook


@pytest.mark.slow
def test_explain_notebook_runs_end_to_end(tmp_path, monkeypatch):
    notebook = _execute(EXPLAIN_NOTEBOOK, tmp_path, monkeypatch)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(output["output_type"] != "error" for cell in code for output in cell.outputs)
    assert list(tmp_path.glob("umd_explain_*/export/model.safetensors")), "no export in the notebook's TMPDIR"
    assert sorted(p.name for p in next(tmp_path.glob("umd_explain_*/maps")).iterdir()) == [
        "q0_gradcam.npy",
        "q0_gradcam.png",
        "q0_rollout.npy",
        "q0_rollout.png",
    ]
    printed = "".join(text_of(cell) for cell in code)
    assert not [word for word in NOISE if word in printed], printed
    assert len(re.findall(r"'.+': '.+' \(true: '.+'\); top-5: ", printed)) == 3
    for figure in (cell for cell in code if "plt.show()" in cell.source):
        assert any("image/png" in output.get("data", {}) for output in figure.outputs)
    # Retrieval: R@K in [0, 1] both ways, R@1 <= R@5 <= R@10, and the three best test images for a caption with
    # their scores in decreasing order.
    recalls = dict(re.findall(r"\b((?:i2t|t2i)_r\d+) (\d\.\d{3})", printed))
    assert set(recalls) == {f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)}, printed
    for d in ("i2t", "t2i"):
        assert 0.0 <= float(recalls[f"{d}_r1"]) <= float(recalls[f"{d}_r5"]) <= float(recalls[f"{d}_r10"]) <= 1.0
    scores = [float(v) for v in re.findall(r"^  score ([+-]\d\.\d{3}): ROCO_\d+\.jpg", printed, re.M)]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True), printed


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
    notebook = _execute(NOTEBOOK, tmp_path, monkeypatch)

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(output["output_type"] != "error" for cell in code for output in cell.outputs)
    assert list(tmp_path.glob("umd_quickstart_*/finetune.ckpt")), "no checkpoint in the notebook's TMPDIR"

    # Every figure was drawn.
    for cell in code:
        if "plt.show()" in cell.source:
            kinds = {kind for output in cell.outputs for kind in output.get("data", {})}
            assert "image/png" in kinds, f"no figure from the cell starting {cell.source.splitlines()[0]!r}"

    assert not [word for word in NOISE if word in "".join(text_of(cell) for cell in code)]

    # The last cell prints the test accuracy table; its rows must agree with each other.
    printed = text_of(code[-1])
    rows = {kind: (int(n), float(acc)) for kind, n, acc in TABLE_ROW.findall(printed)}
    assert set(rows) == {"open", "closed", "overall"}, f"no accuracy table in the last cell:\n{printed}"
    (n_open, acc_open), (n_closed, acc_closed) = rows["open"], rows["closed"]
    n_all, acc_all = rows["overall"]
    assert n_open > 0 and n_closed > 0 and n_all == n_open + n_closed
    assert 0.0 <= acc_all <= 1.0
    assert acc_all == pytest.approx((acc_open * n_open + acc_closed * n_closed) / n_all, abs=2e-3)
    assert re.search(r"answer to '.+': '.+' \(true: '.+'\)", printed)

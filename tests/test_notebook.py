"""notebooks/quickstart.ipynb: saved without outputs, and runs end to end (synthetic data, `tiny` preset) in a
fresh ``python3`` kernel, drawing every figure and ending with a consistent open / closed / overall table."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"
CELL_TIMEOUT_S = 300
# "open      29     0.000": question type, count, accuracy (nan when a type has no questions).
TABLE_ROW = re.compile(r"^(open|closed|overall)\s+(\d+)\s+(\d\.\d{3}|nan)\s*$", re.M)

INSTALL_HINT = "pip install 'umd_lightning[notebook]'"
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


def test_notebook_is_saved_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    unclean = [i for i, cell in enumerate(code) if cell.outputs or cell.execution_count is not None]
    assert not unclean, f"code cells {unclean} hold outputs: clear them before saving"
    assert notebook.metadata["kernelspec"]["name"] == "python3"
    assert 'os.environ["HF_HUB_OFFLINE"] = "1"' in code[0].source, "the first cell must switch the hub off"


@pytest.mark.slow
def test_notebook_runs_end_to_end(tmp_path, monkeypatch):
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
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT_S,
        kernel_name="python3",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback, on the first failing cell

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(output["output_type"] != "error" for cell in code for output in cell.outputs)
    assert list(tmp_path.glob("umd_quickstart_*/finetune.ckpt")), "no checkpoint in the notebook's TMPDIR"

    # Every figure was drawn.
    for cell in code:
        if "plt.show()" in cell.source:
            kinds = {kind for output in cell.outputs for kind in output.get("data", {})}
            assert "image/png" in kinds, f"no figure from the cell starting {cell.source.splitlines()[0]!r}"

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

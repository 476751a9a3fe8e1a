"""The notebooks run top to bottom on this machine (in CI: the CPU emulation), and every check they
make is an assert, so a kernel that goes wrong fails here. They are committed with their outputs,
show the kernels by reading kernels/*.cu rather than pasting them, and the README links each one."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import tool

# jupyter is in requirements.txt, so CI and the README's test command have these. A GPU machine's
# image may not (ours has no jupyter); there tools/run_notebook.py runs a notebook's code cells as one
# program (tested below), and these tests say they were skipped.
nbformat = pytest.importorskip("nbformat", reason="jupyter is not installed (pip install -r requirements.txt)")
NotebookClient = pytest.importorskip("nbclient", reason="jupyter is not installed").NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def images(nb):
    return [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
            if "image/png" in out.get("data", {})]


def test_the_notebooks_are_there():
    """Chapters 1 and 2 (01-05), chapter 3's tensor cores (06), the trained model (07), chapter 4's
    Hopper kernel (08), chapter 5's inference on a KV cache (09) and chapter 6's own attention, score_mod
    and mask_mod (10): 01-10."""
    assert [path.name[:3] for path in NOTEBOOKS] == ["01_", "02_", "03_", "04_", "05_", "06_", "07_", "08_", "09_",
                                                     "10_"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_top_to_bottom(path):
    nb = nbformat.read(path, as_version=4)
    # Raises CellExecutionError, with the cell and its traceback, if any cell fails.
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    assert images(nb), "each notebook draws at least one figure"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_committed_executed(path):
    """A reader on the web sees every output: each code cell ran, in order, without an error."""
    nb = nbformat.read(path, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert not [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert images(nb)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_shown_source_is_current(path):
    """A cell that only shows kernel source (show_source calls) is committed with what it prints from
    today's kernels/: the reader on the web sees the kernels as they are, line numbers and all, though
    the committed run is older than the kernel's last edit (`python tools/refresh_shown_source.py`
    rewrites them)."""
    refresh = tool("refresh_shown_source")  # picks the show_source cells, runs them
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type != "code" or not refresh.is_shown_source(cell.source):
            continue
        committed = "".join(out.get("text", "") for out in cell.outputs)
        assert committed == refresh.printed(cell.source), \
            f"{path.name}: a show_source cell's output is stale (tools/refresh_shown_source.py):\n{cell.source}"


def test_refresh_rewrites_stale_show_source_outputs_only(tmp_path):
    """A copy of notebook 8 with one show_source cell's output made stale, and a mixed cell's output
    changed too: the tool restores the first, leaves the second, and then has nothing left to do."""
    refresh = tool("refresh_shown_source")  # picks the show_source cells, runs them
    copy = tmp_path / "08.ipynb"
    copy.write_text((ROOT / "notebooks" / "08_hopper.ipynb").read_text(encoding="utf-8"), encoding="utf-8")
    nb = json.loads(copy.read_text(encoding="utf-8"))
    shown = next(c for c in nb["cells"] if c["cell_type"] == "code" and refresh.is_shown_source("".join(c["source"])))
    mixed = next(c for c in nb["cells"] if c["cell_type"] == "code" and c["outputs"]
                 and "show_source(" in "".join(c["source"]) and not refresh.is_shown_source("".join(c["source"])))
    good = shown["outputs"][0]["text"]
    shown["outputs"][0]["text"] = ["  1  an old line\n"]
    mixed_outputs = mixed["outputs"] = [{"name": "stdout", "output_type": "stream", "text": ["kept\n"]}]
    copy.write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    assert refresh.refresh(copy) is True
    after = json.loads(copy.read_text(encoding="utf-8"))
    assert next(c for c in after["cells"] if c["source"] == shown["source"])["outputs"][0]["text"] == good
    assert next(c for c in after["cells"] if c["source"] == mixed["source"])["outputs"] == mixed_outputs
    assert refresh.refresh(copy) is False


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_kernel_code_is_pasted(path):
    """Kernel code lives in kernels/*.cu only; a notebook displays it by reading the file."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not any(word in cell.source for word in ("__global__", "__syncthreads", "__shared__"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_needs_no_tests_and_no_working_directory(path):
    """A notebook imports nothing from tests/ (what it shares with a test lives in tools/, on the path
    that notebooks/common.py sets), finds the committed results through common.RESULTS, not relative
    to the directory it was started in, and names no lab build (lab/...) of a measurement, in its
    cells or its outputs."""
    nb = nbformat.read(path, as_version=4)
    code = "\n".join(cell.source for cell in nb.cells if cell.cell_type == "code")
    assert not re.search(r"""["'/]tests["'/]|\b(from|import)\s+(test_\w+|helpers|conftest)\b""", code)
    assert not re.search(r"""\b(Path|open|read_csv)\(\s*f?["']results""", code)
    outputs = [out.get("text", "") + str(out.get("data", {}).get("text/plain", ""))
               for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [text for text in [cell.source for cell in nb.cells] + outputs if "lab/" in text]


def test_readme_links_every_notebook():
    readme = (ROOT / "README.md").read_text()
    for path in NOTEBOOKS:
        assert f"](notebooks/{path.name})" in readme, path.name


def test_run_notebook_runs_the_code_cells_in_order_without_jupyter():
    """tools/run_notebook.py, for a GPU machine without jupyter: every code cell of notebook 1 runs, in
    order, from notebooks/ (its imports find common.py there), and the file is left as it was."""
    path = ROOT / "notebooks" / "01_attention_and_online_softmax.ipynb"
    before = path.read_bytes()
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "run_notebook.py"), str(path)],
                            capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    code = [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]
    ran = re.findall(r"^# --- 01_attention_and_online_softmax.ipynb, code cell (\d+) of (\d+)$", result.stdout, re.M)
    assert ran == [(str(i), str(len(code))) for i in range(1, len(code) + 1)]
    assert path.read_bytes() == before

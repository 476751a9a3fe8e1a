"""The README's Python example runs as written, on whatever device this machine has (in CI, the
CPU), from the repository root as the README says; and its tables of results are the committed
CSVs', as tools/summary.py writes them, not numbers typed by hand."""
import importlib.util
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_summary():
    """tools/summary.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("summary", ROOT / "tools" / "summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_python_example_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme[readme.index("## What is here"):], re.S).group(1)
    monkeypatch.chdir(ROOT)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    assert names["q"].grad is not None and names["out"].shape == (2, 100, 8, 64)
    assert names["O1"].shape == names["O"].shape and len(names["steps"]) > 0


def test_results_tables_are_generated_from_the_csvs():
    """README.md's summary table and notebooks/results/README.md's tables are what
    `python tools/summary.py` writes from the CSVs in notebooks/results/h200/."""
    out_of_date, _ = load_summary().stale()
    assert not out_of_date, f"run python tools/summary.py: these tables differ from the CSVs': {out_of_date}"


def test_summary_has_a_row_per_version():
    summary = load_summary()
    import minimal_flash as mf
    rows = [line for line in summary.summary().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert [int(row.split("|")[1]) for row in rows] == list(mf.VERSIONS)
    assert "not measured" not in "".join(rows)

"""The README's Python example runs as written, on whatever device this machine has (in CI, the
CPU), from the repository root as the README says."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(monkeypatch):
    readme = (ROOT / "README.md").read_text()
    example = re.search(r"```python\n(.*?)```", readme[readme.index("## What is here"):], re.S).group(1)
    monkeypatch.chdir(ROOT)
    names = {}
    exec(compile(example, "README.md", "exec"), names)
    assert names["q"].grad is not None and names["out"].shape == (2, 100, 8, 64)
    assert names["O1"].shape == names["O"].shape and len(names["steps"]) > 0

"""Runs a notebook's code cells in order, as one Python program, where jupyter is not installed (the
H200 machine): from notebooks/, with matplotlib drawing to no window. What the cells print goes to
stdout; the notebook file is not changed (what a notebook writes, e.g. notebook 7's results/h200/
CSVs on an H200, it writes as when run in Jupyter).

    python tools/run_notebook.py notebooks/07_training_a_gpt.ipynb
"""
import json
import os
import sys
from pathlib import Path


def main(path):
    path = Path(path).resolve()
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.chdir(path.parent)
    sys.path.insert(0, str(path.parent))
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    names = {"__name__": "__main__"}
    for number, cell in enumerate(cells, 1):
        print(f"# --- {path.name}, code cell {number} of {len(cells)}", flush=True)
        exec(compile("".join(cell["source"]), f"{path.name} cell {number}", "exec"), names)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])

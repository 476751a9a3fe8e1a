"""Runs a notebook's code cells in order, as one Python program, where jupyter is not installed (the
H200 machine): from notebooks/, with matplotlib drawing to no window. What the cells print goes to
stdout; the notebook file is not changed (what a notebook writes, e.g. notebook 7's results/h200/
CSVs on an H200, it writes as when run in Jupyter).

    python tools/run_notebook.py notebooks/07_training_a_gpt.ipynb
"""
import argparse
import json
import os
import sys
from pathlib import Path


def code_cells(path):
    """The notebook's code cells; a file that is not a notebook is a one-line error."""
    try:
        notebook = json.loads(path.read_text())
        return [c for c in notebook["cells"] if c["cell_type"] == "code"]
    except OSError as error:
        sys.exit(f"run_notebook.py: {path}: {error.strerror}")
    except (ValueError, KeyError, TypeError) as error:  # not JSON, or JSON but no notebook's cells
        sys.exit(f"run_notebook.py: {path} is not a notebook (.ipynb): {type(error).__name__}: {error}")


def main(path):
    path = Path(path).resolve()
    cells = code_cells(path)
    os.environ.setdefault("MPLBACKEND", "Agg")
    os.chdir(path.parent)
    sys.path.insert(0, str(path.parent))
    names = {"__name__": "__main__"}
    for number, cell in enumerate(cells, 1):
        print(f"# --- {path.name}, code cell {number} of {len(cells)}", flush=True)
        exec(compile("".join(cell["source"]), f"{path.name} cell {number}", "exec"), names)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("notebook", help="the .ipynb file whose code cells to run")
    main(parser.parse_args().notebook)

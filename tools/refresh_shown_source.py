"""The notebooks' show_source cells (code cells whose every line, comments aside, calls show_source)
are committed with what they print from today's kernels/ (tests/test_notebooks.py checks it). After an
edit that moves a kernel's lines, this rewrites those outputs in place, and nothing else:

    python tools/refresh_shown_source.py [NOTEBOOK ...]    (default: every notebook in notebooks/)

It prints the notebooks it rewrote. A cell that mixes show_source with other code is not one of these:
rerun it in Jupyter.
"""
import contextlib
import io
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def is_shown_source(source):
    """Does a code cell's source only call show_source (comments and blank lines aside)?"""
    calls = [line for line in source.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return bool(calls) and all(line.startswith("show_source(") for line in calls)


def printed(source):
    """What such a cell prints, run now."""
    sys.path.insert(0, str(ROOT / "notebooks"))
    try:
        from common import show_source
    finally:
        sys.path.pop(0)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(source, {"show_source": show_source})
    return out.getvalue()


def refresh(path):
    """Rewrites the notebook's stale show_source outputs; True if it changed any. The JSON keeps the
    layout of the committed notebooks (indent 1, UTF-8 as is, a final newline)."""
    nb = json.loads(Path(path).read_text(encoding="utf-8"))
    changed = False
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        if cell["cell_type"] != "code" or not is_shown_source(source):
            continue
        text = printed(source).splitlines(keepends=True)
        streams = [out for out in cell["outputs"] if out["output_type"] == "stream"]
        if [out["text"] for out in streams] != [text]:
            cell["outputs"] = [{"name": "stdout", "output_type": "stream", "text": text}]
            changed = True
    if changed:
        Path(path).write_text(json.dumps(nb, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return changed


def main(argv=None):
    paths = [Path(p) for p in (sys.argv[1:] if argv is None else argv)] or sorted((ROOT / "notebooks").glob("*.ipynb"))
    for path in paths:
        if refresh(path):
            print(f"rewrote {path}")


if __name__ == "__main__":
    main()

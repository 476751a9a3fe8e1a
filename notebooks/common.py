"""What every notebook does first: put the repository root (minimal_flash.py, bench.py, kernels/) and
tools/ on the import path, fix the seed, and pick the device the kernels run on. Also where the
committed measurements are, RESULTS, found from this file and not from the working directory, and
show_source, which prints kernel source read from the files (notebooks never paste it)."""
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the repository
for folder in (ROOT / "tools", ROOT):  # the root first
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import torch  # noqa: E402

import minimal_flash as mf  # noqa: E402

__all__ = ["device", "mf", "RESULTS", "ROOT", "show_source"]  # what a notebook imports from here

RESULTS = Path(__file__).resolve().parent / "results" / "h200"  # measurements made on an H200, committed

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__}; the kernels run on {device}"
      + ("" if device == "cuda" else ", in the CPU emulation of the same kernels/*.cu files"))


def show_source(file, pattern=None, *, context=0, definition=False, comment=False):
    """Print source with its line numbers: kernels/<file>, or <file> from the repository root when it
    names a folder ("tools/fragments.cu").

        show_source("flash.cu")                                  the whole file
        show_source("flash.cu", r"for \\(int j")                   each line matching the regular expression,
        show_source("flash.cu", r"for \\(int j", context=2)        with `context` lines either side
        show_source("flash2_mma.cu", r"void online_softmax\\(", definition=True)
                                                                 the definition that the first match begins:
                                                                 its comment and template line, to its last brace
        show_source("flash2_mma_backward.cu", comment=True)      the comment at the top of the file

    A pattern that matches nothing raises ValueError: a kernel changed, and the notebook must follow."""
    path = ROOT / file if "/" in str(file) else mf.KERNELS / file
    lines = path.read_text().splitlines()
    if comment:
        shown = list(range(next(i for i, line in enumerate(lines) if not line.startswith("//"))))
    elif pattern is None:
        shown = list(range(len(lines)))
    else:
        matches = [i for i, line in enumerate(lines) if re.search(pattern, line)]
        if not matches:
            raise ValueError(f"{path.relative_to(ROOT)}: no line matches {pattern!r}")
        if definition:
            first, depth, last = matches[0], 0, None
            while first > 0 and lines[first - 1].lstrip().startswith(("//", "template")):
                first -= 1
            for last in range(matches[0], len(lines)):  # to the brace that closes the first one opened
                depth += lines[last].count("{") - lines[last].count("}")
                if depth <= 0 and "{" in "".join(lines[matches[0]:last + 1]):
                    break
            shown = list(range(first, last + 1))
        else:
            shown = sorted({j for i in matches for j in range(max(0, i - context), min(len(lines), i + context + 1))})
    print(f"--- {path.relative_to(ROOT)}")
    for before, number in zip([None] + shown, shown):
        if before is not None and number != before + 1:
            print("     ...")
        print(f"{number + 1:4}  {lines[number]}")

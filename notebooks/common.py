"""What every notebook does first: put the repository root on the import path (minimal_flash.py,
bench.py, kernels/), fix the seed, and pick the device the kernels run on."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import minimal_flash as mf  # noqa: E402

__all__ = ["device", "mf"]  # what a notebook imports from here

torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
print(f"torch {torch.__version__}; the kernels run on {device}"
      + ("" if device == "cuda" else ", in the CPU emulation of the same kernels/*.cu files"))

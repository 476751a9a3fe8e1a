"""The fragment program, tools/fragments.cu: one warp's ldmatrix, mma.sync m16n8k16 and shuffles
(kernels/mma.cuh) on 16 x 16 tiles, built for the GPU (nvcc) or for the CPU emulation (g++ against
kernels/cpu_cuda.h, through tools/fragments_cpu.cpp), and run. Notebook 6 reads the lane layouts from
it; tests/test_fragments.py checks the emulation against torch and, on a GPU, against the hardware.

    library = build_fragments("cpu")                        # or "cuda"; compiled with torch's extension builder
    S, O, row_max, registers, accumulators = run_program(library, "cpu", torch.bfloat16, A, K, V)
"""
import ctypes
import sys
import tempfile
from pathlib import Path

import torch
import torch.utils.cpp_extension

TOOLS = Path(__file__).resolve().parent
if str(TOOLS.parent) not in sys.path:  # the repository root: minimal_flash.py
    sys.path.insert(0, str(TOOLS.parent))
import minimal_flash as mf  # noqa: E402


def build_fragments(device, folder=None):
    """The fragment program built for a device type ("cpu" or "cuda") in `folder`, as a ctypes
    library. Without a folder it builds in a temporary one, removed when the library is no longer
    referenced (the loaded library stays usable)."""
    source, flags = ((TOOLS / "fragments.cu", {"extra_cuda_cflags": ["-O3"]}) if device == "cuda" else
                     (TOOLS / "fragments_cpu.cpp", {"extra_cflags": ["-O2", "-fno-strict-aliasing"]}))
    temporary = tempfile.TemporaryDirectory(prefix=f"fragments_{device}_") if folder is None else None
    mf._use_this_pythons_ninja()  # the ninja beside this Python, as minimal_flash's builds use
    path = torch.utils.cpp_extension.load(
        name=f"fragments_{device}", sources=[str(source)], build_directory=str(folder or temporary.name),
        extra_include_paths=[str(mf.KERNELS), str(TOOLS)], is_python_module=False, **flags)
    library = ctypes.CDLL(path)
    library.run_fragments.restype = ctypes.c_char_p
    library.run_fragments.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 8
    library.round_to_half.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_long]
    library.folder = temporary  # kept as long as the library is
    return library


def run_program(library, device, dtype, A, K, V):
    """Runs the program on 16 x 16 tiles A, K, V, rounded to `dtype` (bf16 or fp16). Returns, on the
    CPU: S = A K^T, O = A V and each row's max of S (from the tiles the warp wrote), and what each
    lane held: its 12 registers after the ldmatrix calls (af, kf, vf; int32, two 16-bit values each)
    and its accumulators of S, [lane][n][i]. Outputs start as NaN, so an element left unwritten shows."""
    S, O, row_max, accumulators = (torch.full(shape, float("nan"), device=device)
                                   for shape in ((16, 16), (16, 16), (16,), (32, 2, 4)))
    registers = torch.zeros(32, 12, dtype=torch.int32, device=device)
    inputs = [t.to(device=device, dtype=dtype).contiguous() for t in (A, K, V)]
    outputs = (S, O, row_max, registers, accumulators)
    error = library.run_fragments(int(dtype == torch.bfloat16), *(t.data_ptr() for t in (*inputs, *outputs)))
    if error:
        raise RuntimeError(f"fragments: {error.decode()}")
    if device == "cuda":
        torch.cuda.synchronize()
    return [t.cpu() for t in outputs]

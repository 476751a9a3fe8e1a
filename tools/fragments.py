"""The fragment programs, built for the GPU (nvcc) or for the CPU emulation (g++ against
kernels/cpu_cuda.h, through tools/*_cpu.cpp), and run:
  tools/fragments.cu: one warp's ldmatrix, mma.sync m16n8k16 and shuffles (kernels/mma.cuh) on 16 x 16
    tiles, and mma.cuh's fast_tanh and fast_exp2 on a vector of values. Notebook 6 reads the
    lane layouts from it;
    tests/test_fragments.py checks the emulation against torch and, on a GPU, against the hardware.
  tools/hopper_fragments.cu: one warpgroup's TMA loads (128-byte swizzle), wgmma from shared memory (A
    and B K-major or MN-major) and from registers, blocks' bulk reduces into one buffer (kernels/hopper.cuh)
    and tickets of one int atomicAdd counter, built for sm_90a; tests/test_hopper_fragments.py checks it.

    library = build_fragments("cpu")                        # or "cuda"; compiled with torch's extension builder
    S, O, row_max, registers, accumulators = run_program(library, "cpu", torch.bfloat16, A, K, V)
    y = run_special(library, "cpu", "tanh", x)              # or "exp2": fast_exp2
    D = run_accumulate(library, "cpu", torch.bfloat16, A, V, C)
    hopper = build_fragments("cpu", program="hopper_fragments")
    boxes, ss128, ss64, rs64, rs128, mm128, mm64, mk128, km64, mm32, raw = run_hopper_program(
        hopper, "cpu", torch.bfloat16, X, P)
    sums = run_bulk_program(hopper, "cpu", blocks=8)
    taken, tickets = run_tickets_program(hopper, "cpu", blocks=8, takes=3)
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


# Per program: the flags nvcc takes (sm_90a for wgmma and setmaxnreg: torch's builder adds no arch
# flags of its own when one is given), and the C function's arguments.
PROGRAMS = {
    "fragments": (["-O3"], "run_fragments", [ctypes.c_int] + [ctypes.c_void_p] * 8),
    "hopper_fragments": (["-O3", "-gencode=arch=compute_90a,code=sm_90a"], "run_hopper_fragments",
                         [ctypes.c_int, ctypes.c_void_p, ctypes.c_int] + [ctypes.c_void_p] * 4),
}


def build_fragments(device, folder=None, program="fragments"):
    """A fragment program built for a device type ("cpu" or "cuda") in `folder`, as a ctypes
    library. Without a folder it builds in a temporary one, removed when the library is no longer
    referenced (the loaded library stays usable)."""
    cuda_flags, function, argtypes = PROGRAMS[program]
    source, flags = ((TOOLS / f"{program}.cu", {"extra_cuda_cflags": cuda_flags}) if device == "cuda" else
                     (TOOLS / f"{program}_cpu.cpp", {"extra_cflags": ["-O2", "-fno-strict-aliasing"]}))
    temporary = tempfile.TemporaryDirectory(prefix=f"{program}_{device}_") if folder is None else None
    mf._use_this_pythons_ninja()  # the ninja beside this Python, as minimal_flash's builds use
    path = torch.utils.cpp_extension.load(
        name=f"{program}_{device}", sources=[str(source)], build_directory=str(folder or temporary.name),
        extra_include_paths=[str(mf.KERNELS), str(TOOLS)], is_python_module=False, **flags)
    library = ctypes.CDLL(path)
    getattr(library, function).restype = ctypes.c_char_p
    getattr(library, function).argtypes = argtypes
    if program == "fragments":
        library.round_to_half.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 3 + [ctypes.c_long]
        library.run_special.restype = ctypes.c_char_p
        library.run_special.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        library.run_accumulate.restype = ctypes.c_char_p
        library.run_accumulate.argtypes = [ctypes.c_int] + [ctypes.c_void_p] * 4
    if program == "hopper_fragments":
        library.run_bulk_fragments.restype = ctypes.c_char_p
        library.run_bulk_fragments.argtypes = [ctypes.c_int, ctypes.c_void_p]
        library.run_bulk_load_fragments.restype = ctypes.c_char_p
        library.run_bulk_load_fragments.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        library.run_tma4_fragments.restype = ctypes.c_char_p
        library.run_tma4_fragments.argtypes = [ctypes.c_int, ctypes.c_void_p] + [ctypes.c_int] * 3 + [ctypes.c_void_p]
        library.run_tickets_fragments.restype = ctypes.c_char_p
        library.run_tickets_fragments.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    library.folder = temporary  # kept as long as the library is
    return library


def _finished(program, error, device):
    """After a program's C function ran: its error message (b"" on success) raised, and on a GPU its
    kernels waited for, so that what they wrote can be read."""
    if error:
        raise RuntimeError(f"{program}: {error.decode()}")
    if device == "cuda":
        torch.cuda.synchronize()


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
    _finished("fragments", error, device)
    return [t.cpu() for t in outputs]


def run_accumulate(library, device, dtype, A, V, C):
    """D = A V + C by mma.sync on one warp, A and V (16 x 16) rounded to `dtype` (bf16 or fp16), C (16 x 16)
    in fp32, the accumulator mma.sync adds to. D starts as NaN, so an element left unwritten shows."""
    a, v = (t.to(device=device, dtype=dtype).contiguous() for t in (A, V))
    c = C.to(device=device, dtype=torch.float32).contiguous()
    D = torch.full((16, 16), float("nan"), device=device)
    error = library.run_accumulate(int(dtype == torch.bfloat16), a.data_ptr(), v.data_ptr(), c.data_ptr(), D.data_ptr())
    _finished("fragments", error, device)
    return D.cpu()


SPECIAL = ("tanh", "exp2")  # tools/fragments.cu's special_values: fast_tanh, fast_exp2


def run_special(library, device, function, x):
    """kernels/mma.cuh's fast_tanh or fast_exp2 (function: "tanh" or "exp2") of each value
    of x (float32, 1-D), as the program computes it on that device type."""
    x = x.to(device=device, dtype=torch.float32).contiguous()
    y = torch.full_like(x, float("nan"))
    error = library.run_special(SPECIAL.index(function), x.data_ptr(), y.data_ptr(), len(x))
    _finished("fragments", error, device)
    return y.cpu()


# The products of tools/hopper_fragments.cu, in the order it writes them, and their columns (64 rows each).
HOPPER_PRODUCTS = {"ss128": 128, "ss64": 64, "rs64": 64, "rs128": 128, "mm128": 128, "mm64": 64, "mk128": 128,
                   "km64": 64, "mm32": 32}


def run_hopper_program(library, device, dtype, X, P):
    """Runs tools/hopper_fragments.cu on X (2, rows, 128) and P (64, 64), rounded to `dtype` (bf16 or
    fp16). Returns the 5 boxes as TMA left them in shared memory (5, 64, 64; int16 bits, swizzled),
    D = A B^T by wgmma_ss for N = 128 and 64, D = P V by wgmma_rs for N = 64 and 128, the four wgmma_ss
    with A and/or B MN-major (mm128, mm64, mk128, km64, mm32: see the .cu file), and each thread's
    accumulators of the nine, as one (128, 400) tensor: thread t's of ss128 in [t, 0:64], of ss64 in
    [t, 64:96], and so on in that order. Outputs start as NaN."""
    boxes = torch.zeros(5, 64, 64, dtype=torch.int16, device=device)
    products = torch.full((64 * sum(HOPPER_PRODUCTS.values()),), float("nan"), device=device)
    raw = torch.full((128 * sum(HOPPER_PRODUCTS.values()) // 2,), float("nan"), device=device)
    x, p = (t.to(device=device, dtype=dtype).contiguous() for t in (X, P))
    error = library.run_hopper_fragments(int(dtype == torch.bfloat16), x.data_ptr(), X.shape[1], p.data_ptr(),
                                         boxes.data_ptr(), products.data_ptr(), raw.data_ptr())
    _finished("hopper_fragments", error, device)
    columns = list(HOPPER_PRODUCTS.values())
    Ds = [D.view(64, n) for D, n in zip(products.cpu().split([64 * n for n in columns]), columns)]
    # The kernel writes each product's accumulators one after the other, thread by thread.
    raw = torch.cat([part.view(128, -1) for part in raw.cpu().split([128 * n // 2 for n in columns])], dim=1)
    return [boxes.cpu(), *Ds, raw]


def run_bulk_program(library, device, blocks):
    """Runs tools/hopper_fragments.cu's bulk reduce: `blocks` blocks add into the same 512 floats
    (zeros at first): block b adds i % 7 + b to element i < 256, and b + 1 to the others."""
    out = torch.zeros(512, device=device)
    error = library.run_bulk_fragments(blocks, out.data_ptr())
    _finished("hopper_fragments", error, device)
    return out.cpu()


def run_tma4_program(library, device, Y):
    """Runs tools/hopper_fragments.cu's 4-D TMA loads on Y (B, rows, 3, H, 64), bf16 or fp16, through
    a tensor map of K = Y[:, :, 1]. Returns the 3 boxes as TMA left them in shared memory (3, 64, 64;
    int16 bits, swizzled)."""
    boxes = torch.zeros(3, 64, 64, dtype=torch.int16, device=device)
    y = Y.to(device).contiguous()
    B, rows, _, H, _ = Y.shape
    error = library.run_tma4_fragments(int(Y.dtype == torch.bfloat16), y.data_ptr(), B, rows, H, boxes.data_ptr())
    _finished("hopper_fragments", error, device)
    return boxes.cpu()


def run_tickets_program(library, device, blocks, takes):
    """Runs tools/hopper_fragments.cu's tickets: `blocks` blocks of 384 threads each take `takes` tickets
    from one int counter (from 0) by atomicAdd. Returns (the counter after, the tickets: blocks x 384 x
    takes, each thread's in the order it took them)."""
    taken = torch.zeros(1, dtype=torch.int32, device=device)
    out = torch.full((blocks, 384, takes), -1, dtype=torch.int32, device=device)
    error = library.run_tickets_fragments(blocks, takes, taken.data_ptr(), out.data_ptr())
    _finished("hopper_fragments", error, device)
    return taken.item(), out.cpu()


def run_bulk_load_program(library, device, X, order, bytes):
    """Runs tools/hopper_fragments.cu's bulk copies: rows order[i] of X (rows of 256 bytes, uint8), the
    first `bytes` of each, into 16 shared-memory rows of 272 bytes (zeros first). Returns them (16, 272)."""
    out = torch.full((16, 272), 0xAB, dtype=torch.uint8, device=device)
    x, o = X.to(device).contiguous(), torch.tensor(order, dtype=torch.int32, device=device)
    error = library.run_bulk_load_fragments(x.data_ptr(), o.data_ptr(), bytes, out.data_ptr())
    _finished("hopper_fragments", error, device)
    return out.cpu()

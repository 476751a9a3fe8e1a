"""Minimal FlashAttention: the Python face of kernels/*.cu.

    flash_attention(q, k, v, causal=False, softmax_scale=None)   the kernels, on GPU or CPU, with autograd
                                                                  (version=2: the FlashAttention-2 kernels;
                                                                  bf16/fp16: version 3, tensor cores)
    flash_attn_func(q, k, v, ...), flash_attn_qkvpacked_func(qkv, ...)   the official flash-attn package's
                                                                  entry points, (B, N, H, d) layout
    manual_attention(q, k, v, causal=False, softmax_scale=None)  plain attention, the reference
    forward(q, k, v, ...), backward(dO, q, k, v, O, L, ...)       the kernels (version=1, 2 or 3), called directly
    mirror_forward(q, k, v, ...), mirror_backward(...)            Algorithms 1 and 4 tile by tile in PyTorch

Tensors are (B, H, N, d), the layout of torch.nn.functional.scaled_dot_product_attention.
CUDA tensors run the CUDA build of kernels/; CPU tensors run the very same source compiled as C++
against kernels/cpu_cuda.h, an emulation of the CUDA runtime (see the README).

Block sizes Br, Bc are compile-time constants of the kernels. Choose them per call
(flash_attention(..., Br=64, Bc=16)) or for the process with the environment variables
MINIMAL_FLASH_BR and MINIMAL_FLASH_BC. Each configuration is compiled once (a few seconds) and
cached; an edited kernel is noticed on the next call, recompiled and loaded.
"""

import ctypes
import hashlib
import math
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.cpp_extension

KERNELS = Path(__file__).resolve().parent / "kernels"

# The kernel versions, as in the table of kernels/bindings.cu: version -> (name, forward kernel file,
# backward kernel file, the dtypes it takes).
VERSIONS = {1: ("Algorithm 1", "flash.cu", "flash_backward.cu", (torch.float32,)),
            2: ("FlashAttention-2", "flash2.cu", "flash2_backward.cu", (torch.float32,)),
            3: ("FlashAttention-2 on tensor cores", "flash3.cu", "flash3_backward.cu", (torch.bfloat16, torch.float16))}
PASSES = ("forward", "backward")  # the order of kernels/bindings.cu's Pass
FP32_VERSIONS = [v for v, (*_, dtypes) in VERSIONS.items() if torch.float32 in dtypes]  # 1, 2
DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # the order of kernels/bindings.cu's DType


# ---------------------------------------------------------------------------------------------
# Attention


def flash_attention(q, k, v, causal=False, softmax_scale=None, *, is_causal=None, scale=None, Br=None,
                    Bc=None, version=None):
    """softmax(q k^T * softmax_scale [+ causal mask]) v, computed by the FlashAttention kernels,
    differentiable. softmax_scale defaults to 1/sqrt(d). is_causal and scale are the same options
    under torch.nn.functional.scaled_dot_product_attention's names. Br, Bc default to
    MINIMAL_FLASH_BR/_BC, else 32. version=1 runs the FlashAttention paper's loop order (forward
    kernels/flash.cu, backward kernels/flash_backward.cu), version=2 FlashAttention-2's
    (kernels/flash2.cu, kernels/flash2_backward.cu), both in float32; version=3 FlashAttention-2's
    on tensor cores in bfloat16 or float16 (kernels/flash3.cu, kernels/flash3_backward.cu). The default:
    version 2 for float32 inputs, version 3 for bfloat16 and float16 ones."""
    causal = _either("causal", causal, False, "is_causal", is_causal)
    softmax_scale = _either("softmax_scale", softmax_scale, None, "scale", scale)
    Br, Bc = block_sizes(Br, Bc)  # fixed now: the backward must use the forward's
    version = _check_version(version, q)
    q, k, v = _check_inputs(q, k, v, version)  # outside the Function: its .contiguous() passes gradients back
    if torch.compiler.is_compiling():  # torch.compile: one operator it can trace through, no graph break
        return torch.ops.minimal_flash.forward(q, k, v, bool(causal), _scale(q, softmax_scale), Br, Bc, version)[0]
    if not (torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)):
        return _forward(q, k, v, bool(causal), softmax_scale, Br, Bc, version)[0]  # no autograd bookkeeping
    if q.numel() > 0:  # fail now, not after the forward has run, if the backward will not fit
        _check_shared_memory(load_kernels(q.device.type, Br, Bc), q, "backward", version)
    return FlashAttention.apply(q, k, v, bool(causal), softmax_scale, Br, Bc, version)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **options):
    """The flash-attn package's flash_attn_func on our kernels: q, k, v are (B, N, H, d), batch,
    sequence, heads, head dim, and so is the result. `options` go to flash_attention (Br, Bc, version)."""
    _check_no_dropout(dropout_p)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # views: gradients reach the caller's tensors
    return flash_attention(q, k, v, causal, softmax_scale, **options).transpose(1, 2)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, **options):
    """The flash-attn package's flash_attn_qkvpacked_func: qkv is (B, N, 3, H, d); returns (B, N, H, d)."""
    return flash_attn_func(*qkv.unbind(dim=2), dropout_p, softmax_scale, causal, **options)


def manual_attention(q, k, v, causal=False, softmax_scale=None):
    """Plain attention: builds the whole N x N score matrix S. The reference for every check."""
    N = q.shape[-2]
    S = (q @ k.transpose(-2, -1)) * _scale(q, softmax_scale)
    if causal:
        S = S.masked_fill(_above_diagonal(N, N, 0, 0, q.device), float("-inf"))
    return torch.softmax(S, dim=-1) @ v


def relative_error(x, ref):
    """||x - ref|| / ||ref||, in float64, on x's device: the error measure of the notebooks and bench.py."""
    x, ref = x.detach().double(), ref.detach().double().to(x.device)
    return ((x - ref).norm() / ref.norm()).item()


def forward(q, k, v, causal=False, softmax_scale=None, *, Br=None, Bc=None, out=None, version=None):
    """Run kernels/flash.cu (version 1, Algorithm 1) or kernels/flash2.cu (version 2, the
    FlashAttention-2 loop order). Returns (O, L): the attention output and the row log-sum-exp
    L = m + log(l) that the backward pass needs. `out=(O, L)` writes into given tensors (the tests
    fill them with NaN first, so an element the kernel fails to write shows)."""
    version = _check_version(version, q)
    q, k, v = _check_inputs(q, k, v, version)
    if out is not None:
        out = _check_out("O", out[0], q), _check_out("L", out[1], q[..., 0].float())
    return _forward(q, k, v, causal, softmax_scale, Br, Bc, version, out)


def _forward(q, k, v, causal, softmax_scale, Br, Bc, version, out=None):
    """forward() on inputs already checked: what every call pays for, and no more."""
    O, L = out if out is not None else (torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32))
    if q.numel() > 0:  # B, H or N is 0: nothing to compute, and a grid of 0 blocks is an error
        kernels = load_kernels(q.device.type, Br, Bc)
        _check_shared_memory(kernels, q, "forward", version)
        q, k, v = (_aligned(t) for t in (q, k, v))
        _raise_if(kernels.run("forward", version, (q, k, v, O, L), bool(causal), _scale(q, softmax_scale)))
    return O, L


def backward(dO, q, k, v, O, L, causal=False, softmax_scale=None, *, Br=None, Bc=None, out=None, version=None):
    """Run kernels/flash_backward.cu (version 1, Algorithm 4), kernels/flash2_backward.cu (version 2,
    the FlashAttention-2 loop order) or kernels/flash3_backward.cu (version 3, the same on tensor
    cores, bfloat16 or float16): the gradients (dQ, dK, dV) of a loss whose gradient with respect to
    the output O = forward(q, k, v)[0] is dO. O and L are what forward() returned for these q, k, v,
    causal, scale and block sizes (versions 1 and 2 give the same O and L; L is float32 always).
    `out=(dQ, dK, dV)` writes into given tensors."""
    version = _check_version(version, q)
    q, k, v = _check_inputs(q, k, v, version)
    dO, O = (_check_like(name, t, q) for name, t in (("dO", dO), ("O", O)))
    L = _check_like("L", L, q[..., 0].float())
    if out is not None:
        out = tuple(_check_out(name, t, q) for name, t in zip(("dQ", "dK", "dV"), out))
    return _backward(dO, q, k, v, O, L, causal, softmax_scale, Br, Bc, version, out)


def _backward(dO, q, k, v, O, L, causal, softmax_scale, Br, Bc, version, out=None):
    """backward() on inputs already checked."""
    dQ, dK, dV = out if out is not None else (torch.empty_like(q) for _ in range(3))
    if q.numel() > 0:
        kernels = load_kernels(q.device.type, Br, Bc)
        _check_shared_memory(kernels, q, "backward", version)
        tensors = (*(_aligned(t) for t in (q, k, v, O, dO)), L, dQ, dK, dV)
        _raise_if(kernels.run("backward", version, tensors, bool(causal), _scale(q, softmax_scale)))
    return dQ, dK, dV


class FlashAttention(torch.autograd.Function):
    """flash_attention with gradients. The forward saves q, k, v, O and the row log-sum-exp L: O(N d)
    memory. The N x N matrix P is never stored; the backward kernel recomputes it tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, Br, Bc, version):  # flash_attention checked them
        O, L = _forward(q, k, v, causal, softmax_scale, Br, Bc, version)
        ctx.save_for_backward(q, k, v, O, L)
        ctx.options = causal, softmax_scale, Br, Bc, version
        return O

    @staticmethod
    def backward(ctx, dO):
        dQ, dK, dV = _backward(dO.contiguous(), *ctx.saved_tensors, *ctx.options)
        return dQ, dK, dV, None, None, None, None, None


# The same two passes as PyTorch custom operators, minimal_flash::forward and minimal_flash::backward,
# for torch.compile: it cannot look inside a ctypes call, but it can treat a registered operator as
# one opaque node, given the shapes of what it returns (register_fake) and its derivative
# (register_autograd). Eager calls keep FlashAttention above: an operator's dispatch costs more host
# time per call (measured: tens of microseconds on a CPU), as long as a small attention kernel runs.
@torch.library.custom_op("minimal_flash::forward", mutates_args=())
def _forward_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float, Br: int, Bc: int,
                version: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward(q, k, v, causal, scale, Br, Bc, version)


@_forward_op.register_fake
def _(q, k, v, causal, scale, Br, Bc, version):
    return torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("minimal_flash::backward", mutates_args=())
def _backward_op(dO: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, O: torch.Tensor,
                 L: torch.Tensor, causal: bool, scale: float, Br: int, Bc: int,
                 version: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _backward(dO.contiguous(), q, k, v, O, L, causal, scale, Br, Bc, version)


@_backward_op.register_fake
def _(dO, q, k, v, O, L, causal, scale, Br, Bc, version):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _forward_op_save(ctx, inputs, output):
    q, k, v, *ctx.options = inputs
    ctx.save_for_backward(q, k, v, *output)


def _forward_op_grad(ctx, dO, dL):  # L is a by-product: nothing flows back through it
    return *_backward_op(dO, *ctx.saved_tensors, *ctx.options), None, None, None, None, None


_forward_op.register_autograd(_forward_op_grad, setup_context=_forward_op_save)


def _scale(q, softmax_scale):
    """The factor on Q K^T: 1/sqrt(d) unless given."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def _above_diagonal(rows, cols, row0, col0, device):
    """Mask of the (query, key) pairs a causal model hides: key index > query index."""
    r = torch.arange(row0, row0 + rows, device=device)[:, None]
    c = torch.arange(col0, col0 + cols, device=device)[None, :]
    return c > r


# ---------------------------------------------------------------------------------------------
# Building and loading the kernels


def block_sizes(Br=None, Bc=None):
    """The (Br, Bc) to use: the arguments, else MINIMAL_FLASH_BR / _BC, else 32 and 32."""
    Br = int(Br if Br is not None else os.environ.get("MINIMAL_FLASH_BR", 32))
    Bc = int(Bc if Bc is not None else os.environ.get("MINIMAL_FLASH_BC", 32))
    # One thread per row of Q_i: Br threads per block, at most 1024 on any CUDA GPU.
    if not 1 <= Br <= 1024:
        raise ValueError(f"Br = {Br}: it is the number of threads per block, so 1 <= Br <= 1024")
    # A thread keeps its row of S_ij (Bc floats) in registers; far beyond 128 they spill.
    if not 1 <= Bc <= 256:
        raise ValueError(f"Bc = {Bc}: each thread holds Bc scores in registers, so 1 <= Bc <= 256")
    return Br, Bc


_loaded = {}  # (device type, Br, Bc) -> Kernels


def load_kernels(device_type="cuda", Br=None, Bc=None):
    """The kernels for 'cuda' or 'cpu' with block sizes Br, Bc: compiled the first time, and again
    whenever a file in kernels/ has changed since they were loaded (this process goes on with the
    new build). Every call of the kernels asks: the loaded build is found first, and the block sizes
    are resolved and checked only when it is not there."""
    key = (device_type, Br, Bc) if Br is not None and Bc is not None else (device_type, *block_sizes(Br, Bc))
    sources = _sources.current()
    kernels = _loaded.get(key)
    if kernels is None or kernels.sources != sources:
        Br, Bc = block_sizes(*key[1:])
        changed = _sources.changed_since(kernels.sources) if kernels else None
        kernels = _loaded[key] = Kernels(_build(device_type, Br, Bc, sources, changed), sources)
    return kernels


class _Sources:
    """What the build is made from: each file of kernels/ by its content. Every call asks
    (load_kernels runs on every call), so the files are looked at no more than once a second and
    re-read only when their modification times change."""

    def __init__(self):
        self.checked, self.mtimes, self.digests = -math.inf, None, None

    def current(self):
        """(the kernels/ folder, ((file name, content digest), ...))"""
        if time.monotonic() - self.checked > 1.0:
            files = sorted(p for p in KERNELS.iterdir() if p.is_file())
            mtimes = {p: p.stat().st_mtime_ns for p in files}
            if mtimes != self.mtimes:
                self.mtimes = mtimes
                self.digests = str(KERNELS), tuple((p.name, hashlib.sha1(p.read_bytes()).hexdigest()) for p in files)
            self.checked = time.monotonic()
        return self.digests

    def changed_since(self, old):
        return sorted({name for name, _ in set(self.digests[1]) ^ set(old[1])})


_sources = _Sources()


def build_directory(device_type, Br, Bc, sources=None):
    """Where a build lives: $TORCH_EXTENSIONS_DIR, else torch's default (~/.cache/torch_extensions),
    then minimal_flash/, then a folder named by everything the build is made from: device, block
    sizes, torch version, the kernel files' content and this checkout's path (the build files name
    the sources by path, so two checkouts must not share a folder)."""
    key = repr((sources or _sources.current(), torch.__version__, torch.version.cuda))
    digest = hashlib.sha1(key.encode()).hexdigest()[:12]
    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or torch.utils.cpp_extension.get_default_build_root())
    return root / "minimal_flash" / f"{device_type}_br{Br}_bc{Bc}_{digest}"


def _build(device_type, Br, Bc, sources, changed):
    """Compile (unless this exact build exists) and return the shared library's path."""
    folder = build_directory(device_type, Br, Bc, sources)
    name = folder.name
    defines = [f"-DBR={Br}", f"-DBC={Bc}"]
    if device_type == "cuda":
        source, flags = KERNELS / "bindings.cu", {"extra_cuda_cflags": ["-O3", "-lineinfo"] + defines}
    else:
        source, flags = KERNELS / "cpu.cpp", {"extra_cflags": ["-O3", "-fno-strict-aliasing",
                                                                    "-Wno-unknown-pragmas"] + defines}
    library = folder / f"{name}.so"
    if library.exists():
        return library
    why = f"{', '.join(changed)} changed" if changed else "no build of these sources yet"
    what = f"{source.relative_to(KERNELS.parent)} for {device_type} with Br={Br}, Bc={Bc}"
    _say(f"compiling {what} ({why}) in {str(folder).replace(str(Path.home()), '~', 1)}")
    start = time.monotonic()
    folder.mkdir(parents=True, exist_ok=True)
    _use_this_pythons_ninja()
    try:
        path = torch.utils.cpp_extension.load(name=name, sources=[str(source)], build_directory=str(folder),
                                              is_python_module=False, **flags)
    except RuntimeError as error:
        raise RuntimeError(_compile_error(what, str(error), folder / "build-error.log")) from None
    _say(f"compiled in {time.monotonic() - start:.1f} s")
    return Path(path)


def _compile_error(what, log, log_path):
    """The compiler's first error lines (file:line: message), not its whole output; that goes to a file."""
    log_path.write_text(log)
    errors = [line.replace(str(KERNELS.parent) + os.sep, "") for line in log.splitlines()
              if re.search(r"(:\d+:\d+: (fatal )?error|\(\d+\): error)", line)]
    shown = "\n".join(f"  {line}" for line in errors[:3]) or "  (no file:line error found: see the log)"
    return f"minimal_flash: compiling {what} failed:\n{shown}\nthe whole compiler output: {log_path}"


def _say(message):
    """Build messages go to stderr, at once (tests/conftest.py routes them past pytest's capture)."""
    print(f"minimal_flash: {message}", file=sys.stderr, flush=True)


def _use_this_pythons_ninja():
    """torch builds with the first `ninja` on PATH. Put the one that requirements.txt installed beside
    this Python first: a process started without activating the environment (a Jupyter kernel, say)
    would otherwise find another ninja, or none, and two ninja versions rebuild each other's builds."""
    interpreter_bin, path = str(Path(sys.executable).parent), os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != interpreter_bin:
        os.environ["PATH"] = interpreter_bin + os.pathsep + path


class Kernels:
    """One build of the kernels, for one device type and (Br, Bc): the C functions of
    kernels/bindings.cu, called with tensors. forward() and backward() return an error message,
    "" on success (_raise_if raises it)."""

    def __init__(self, library, sources):
        P, i, i64, f, b = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_bool
        c = self._c = ctypes.CDLL(str(library))
        for function, result, arguments in [
                (c.mf_versions, i, []), (c.mf_block_size, i, [i]), (c.mf_device_shared_bytes, i64, [i]),
                (c.mf_shared_bytes, i64, [i, i, i]), (c.mf_scratch_floats, i64, [i, i, i64, i]),
                (c.mf_forward, ctypes.c_char_p, [i] + [P] * 6 + [i64, i, i, f, b, i, i, P]),
                (c.mf_backward, ctypes.c_char_p, [i] + [P] * 10 + [i64, i, i, f, b, i, i, P])]:
            function.restype, function.argtypes = result, arguments
        self.library, self.sources = library, sources
        self.Br, self.Bc, self.versions = c.mf_block_size(0), c.mf_block_size(1), c.mf_versions()
        self._asked = {}  # answers that never change, kept: each ctypes call costs host time

    def _ask(self, function, *arguments):
        if (function, arguments) not in self._asked:
            self._asked[function, arguments] = getattr(self._c, function)(*arguments)
        return self._asked[function, arguments]

    def shared_bytes(self, pass_, version, d):
        """The least shared memory a block of this pass and version needs for head dim d (-1: no such
        kernel)."""
        return self._ask("mf_shared_bytes", PASSES.index(pass_), version, d)

    def device_shared_bytes(self, device):
        """The most shared memory a block may have on this device (on the CPU, the emulation's)."""
        return self._ask("mf_device_shared_bytes", torch.device(device).index or 0)

    def forward(self, q, k, v, O, L, causal, scale, version):
        """O, L = attention of q, k, v; returns an error message, "" on success."""
        return _bad_layout((q, k, v, O), L, q) or self.run("forward", version, (q, k, v, O, L), causal, scale)

    def backward(self, q, k, v, O, dO, L, dQ, dK, dV, causal, scale, version):
        """dQ, dK, dV from dO and the forward's O, L; returns an error message, "" on success."""
        tensors = (q, k, v, O, dO, L, dQ, dK, dV)
        return _bad_layout(tensors[:5] + tensors[6:], L, q) or self.run("backward", version, tensors, causal, scale)

    def run(self, pass_, version, tensors, causal, scale):
        """forward() or backward() on tensors already checked: (q, k, v, O, L) or (q, k, v, O, dO, L,
        dQ, dK, dV). The launch goes to the current stream of q's device, as torch's own do."""
        q, (B, H, N, d) = tensors[0], tensors[0].shape
        per_row = self._ask("mf_scratch_floats", PASSES.index(pass_), version, 1, d)
        # fp32 whatever q's dtype; held here until the launch is queued (none where the pass needs none)
        scratch = q.new_empty(B * H * N * per_row, dtype=torch.float32) if per_row > 0 else None
        addresses = [t.data_ptr() for t in tensors] + [scratch.data_ptr() if scratch is not None else None]
        device = q.device.index if q.is_cuda else 0
        stream = torch._C._cuda_getCurrentRawStream(device) if q.is_cuda else None  # as an address
        launch = self._c.mf_forward if pass_ == "forward" else self._c.mf_backward
        return launch(version, *addresses, B * H, N, d, scale, causal, DTYPES.index(q.dtype), device, stream).decode()


def _bad_layout(tensors, L, q):
    """The kernels index raw addresses, so a wrong layout would read out of bounds. The functions
    above have checked their inputs; this is the last line of defence, for any caller."""
    def bad(t, shape, dtype):
        return t.shape != shape or not t.is_contiguous() or t.dtype != dtype or t.device != q.device

    if q.dtype not in DTYPES or any(bad(t, q.shape, q.dtype) or t.data_ptr() % 16 for t in tensors):
        return ("internal error: the (B, H, N, d) tensors differ in shape, layout, dtype or device, or one "
                "is not 16-byte aligned")
    return "internal error: L has the wrong layout" if bad(L, q.shape[:-1], torch.float32) else ""


# ---------------------------------------------------------------------------------------------
# Input checks


def _check_inputs(q, k, v, version):
    """Raise a clear error for anything this version's kernels cannot take; return (q, k, v) contiguous."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, version)
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D (B, H, N, d), got shape {tuple(t.shape)}")
    if not q.shape == k.shape == v.shape:
        raise ValueError(f"q, k, v must have the same shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not q.device == k.device == v.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if q.device.type not in ("cuda", "cpu"):
        raise ValueError(f"q, k, v are on {q.device}; the kernels run on CUDA or on the CPU")
    if q.shape[-1] == 0:
        raise ValueError("head dim d is 0: there is nothing to attend with")
    # The kernels index rows with a fixed stride; a view (a transpose, a slice) is copied first.
    return q.contiguous(), k.contiguous(), v.contiguous()


def _aligned(t):
    """The kernels move (B, H, N, d) tensors 16 bytes at a time (float4 loads, cp.async, vector
    atomics), so each must start at a 16-byte-aligned address. A fresh tensor does; a contiguous view
    that starts inside another tensor's storage may not, and is copied. (At the launch, not with the
    input checks: torch.compile cannot trace an address, but the custom operators' bodies run eagerly.)"""
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _check_is_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def _check_tensor(name, t, version):
    _check_is_tensor(name, t)
    if t.dtype not in VERSIONS[version][3]:
        takes = "float32 only" if version < 3 else "bfloat16 and float16 only"
        other = ("bfloat16 and float16 run version 3 (tensor cores)" if t.dtype in VERSIONS[3][3] else
                 "float32 runs version 1 or 2" if t.dtype == torch.float32 else
                 "the kernels take float32 (versions 1, 2), bfloat16 and float16 (version 3)")
        raise TypeError(f"{name} has dtype {t.dtype}; version {version}'s kernels are {takes}: {other}")


def _check_out(name, t, like):
    """A tensor given with out=: like q (L: like q without d), and contiguous, because the kernel
    writes into it."""
    _check_like(name, t, like)
    if not t.is_contiguous():
        raise ValueError(f"{name} (out=) must be contiguous: the kernel writes into it")
    if t.dim() == 4 and t.data_ptr() % 16 != 0:
        raise ValueError(f"{name} (out=) must start at a 16-byte-aligned address: the kernels write it "
                         "16 bytes at a time")
    return t


def _check_like(name, t, like):
    """The backward's other inputs must match q in shape (L: q's without d), dtype and device."""
    _check_is_tensor(name, t)
    if t.dtype != like.dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be {like.dtype}, as q (L: float32)")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, q on {like.device}: they must be on one device")
    return t.contiguous()


def default_version(dtype):
    """The version flash_attention runs for inputs of this dtype when none is asked for: the fastest
    that takes it. In float32 that is version 2, faster than plain attention at every length measured
    (README, "Which version runs by default"); version 1 is chapter 1's kernel to read, and the
    notebooks that read it name it."""
    return 3 if dtype in VERSIONS[3][3] else 2


def _check_version(version, q):
    """The version to run: the one asked for, else default_version of q's dtype."""
    if version is None:
        return default_version(q.dtype if isinstance(q, torch.Tensor) else torch.float32)
    if version not in VERSIONS or isinstance(version, bool):
        choices = " or ".join(f"{n} ({name}: kernels/{fwd})" for n, (name, fwd, *_) in VERSIONS.items())
        raise ValueError(f"version = {version!r}: {choices}")
    return version


_fits = set()  # (kernels, device, pass, version, d) that passed the check below: asked on every call


def _check_shared_memory(kernels, q, pass_, version):
    if (kernels, q.device, pass_, version, q.shape[-1]) in _fits:
        return
    d, file = q.shape[-1], VERSIONS[version][1 + PASSES.index(pass_)]
    needed = kernels.shared_bytes(pass_, version, d)
    available = kernels.device_shared_bytes(q.device)
    if needed > available:
        where = ("this GPU allows" if q.is_cuda else
                 "the CPU emulation allows (it copies the limit of an H100 or H200, kernels/cpu_cuda.h)")
        largest = next((x for x in range(d - 1, 0, -1) if kernels.shared_bytes(pass_, version, x) <= available), 0)
        raise ValueError(f"head dim d = {d} needs {needed} bytes of shared memory per block in the {pass_} "
                         f"kernel of version {version} (kernels/{file}) with Br = {kernels.Br}, Bc = {kernels.Bc}, "
                         f"more than the {available} {where}: it takes d up to {largest} with these block "
                         "sizes (smaller block sizes leave room for more in the kernels whose tiles follow them)")
    _fits.add((kernels, q.device, pass_, version, d))


def _check_no_dropout(dropout_p):
    if dropout_p != 0:
        raise ValueError(f"dropout_p = {dropout_p}: these kernels have no dropout; use dropout_p=0.0")


def _either(name, value, default, alias, alias_value):
    """An option given under our name (flash-attn's) or under scaled_dot_product_attention's."""
    if alias_value is None:
        return value
    if value is not default and value != alias_value:
        raise ValueError(f"{name} = {value!r} and {alias} = {alias_value!r}: give one of them")
    return alias_value


def _raise_if(error):
    """The extension returns an error message instead of throwing (see kernels/bindings.cu)."""
    if error.endswith(" failed: interrupted"):  # Ctrl-C stopped a CPU launch (kernels/cpu_cuda.h)
        raise KeyboardInterrupt(f"minimal_flash: {error}")
    if error:
        raise RuntimeError(f"minimal_flash: {error}")


# ---------------------------------------------------------------------------------------------
# The mirrors: Algorithms 1 and 4 tile by tile in PyTorch


@dataclass
class Step:
    """What one (j, i) step of Algorithm 1 computed, for the notebooks to inspect."""
    j: int
    i: int
    rows: range  # the query rows of Q_i
    cols: range  # the key rows of K_j, V_j
    S_ij: torch.Tensor
    P_ij: torch.Tensor  # exp(S_ij - m_tilde), unnormalised
    m: torch.Tensor  # running row max of Q_i's rows after this step
    l: torch.Tensor  # running row sum
    O_i: torch.Tensor  # running (normalised) output rows


def mirror_forward(q, k, v, causal=False, softmax_scale=None, *, Br=32, Bc=32, on_step=None):
    """Algorithm 1 in plain PyTorch, with the loop order and names of kernels/flash.cu.
    A tile here is a slice of all (B, H) slices at once; the kernel gives each its own block.
    Calls on_step(Step) after every (j, i) step. Returns (O, L) like forward()."""
    N = q.shape[-2]
    scale = _scale(q, softmax_scale)
    O = torch.zeros_like(q)  # Algorithm 1, line 2
    l = q.new_zeros(q.shape[:-1])
    m = q.new_full(q.shape[:-1], float("-inf"))
    Tr, Tc = math.ceil(N / Br), math.ceil(N / Bc)
    for j in range(Tc):
        cols = range(j * Bc, min(N, (j + 1) * Bc))
        K_j, V_j = k[..., cols.start:cols.stop, :], v[..., cols.start:cols.stop, :]
        for i in range(j * Bc // Br if causal else 0, Tr):  # causal: tiles above the diagonal skipped
            rows = range(i * Br, min(N, (i + 1) * Br))
            r = slice(rows.start, rows.stop)
            S_ij = scale * q[..., r, :] @ K_j.transpose(-2, -1)
            if causal:
                S_ij = S_ij.masked_fill(_above_diagonal(len(rows), len(cols), rows.start, cols.start, q.device),
                                        float("-inf"))
            m_tilde = S_ij.amax(dim=-1)
            # A row that sees no key of this tile has m_tilde = -inf; it gets P = 0, as in the kernel.
            P_ij = torch.where(S_ij == float("-inf"), 0.0, torch.exp(S_ij - m_tilde[..., None]))
            l_tilde = P_ij.sum(dim=-1)
            m_new = torch.maximum(m[..., r], m_tilde)
            alpha = l[..., r] * torch.exp(m[..., r] - m_new)
            beta = torch.exp(m_tilde - m_new)
            l_new = alpha + beta * l_tilde
            O[..., r, :] = (alpha[..., None] * O[..., r, :] + beta[..., None] * (P_ij @ V_j)) / l_new[..., None]
            m[..., r], l[..., r] = m_new, l_new
            if on_step is not None:
                on_step(Step(j, i, rows, cols, S_ij, P_ij, m[..., r].clone(), l[..., r].clone(),
                             O[..., r, :].clone()))
    return O, m + torch.log(l)


@dataclass
class BackwardStep:
    """What one (j, i) step of Algorithm 4 computed, for the notebooks to inspect."""
    j: int
    i: int
    rows: range
    cols: range
    P_ij: torch.Tensor  # exp(S_ij - L_i): the forward's softmax probabilities, recomputed
    dP_ij: torch.Tensor  # dO_i V_j^T
    dS_ij: torch.Tensor  # P_ij * (dP_ij - D_i)
    dK_j: torch.Tensor  # running sums over the Q tiles seen so far
    dV_j: torch.Tensor


def mirror_backward(dO, q, k, v, O, L, causal=False, softmax_scale=None, *, Br=32, Bc=32, on_step=None):
    """Algorithm 4 in plain PyTorch, with the loop order and names of kernels/flash_backward.cu.
    O and L are the forward's outputs. Calls on_step(BackwardStep) after every (j, i) step.
    Returns (dQ, dK, dV) like backward()."""
    N = q.shape[-2]
    scale = _scale(q, softmax_scale)
    D = (dO * O).sum(dim=-1)  # D_i = rowsum(dO_i * O_i), once per row
    dQ, dK, dV = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    Tr, Tc = math.ceil(N / Br), math.ceil(N / Bc)
    for j in range(Tc):
        cols = range(j * Bc, min(N, (j + 1) * Bc))
        c = slice(cols.start, cols.stop)
        K_j, V_j = k[..., c, :], v[..., c, :]
        dK_j, dV_j = torch.zeros_like(K_j), torch.zeros_like(V_j)
        for i in range(j * Bc // Br if causal else 0, Tr):
            rows = range(i * Br, min(N, (i + 1) * Br))
            r = slice(rows.start, rows.stop)
            Q_i, dO_i = q[..., r, :], dO[..., r, :]
            S_ij = scale * Q_i @ K_j.transpose(-2, -1)
            if causal:
                S_ij = S_ij.masked_fill(_above_diagonal(len(rows), len(cols), rows.start, cols.start, q.device),
                                        float("-inf"))
            P_ij = torch.exp(S_ij - L[..., r, None])  # masked scores give exp(-inf) = 0
            dV_j += P_ij.transpose(-2, -1) @ dO_i
            dP_ij = dO_i @ V_j.transpose(-2, -1)
            dS_ij = P_ij * (dP_ij - D[..., r, None])
            dQ[..., r, :] += scale * dS_ij @ K_j
            dK_j += scale * dS_ij.transpose(-2, -1) @ Q_i
            if on_step is not None:
                on_step(BackwardStep(j, i, rows, cols, P_ij, dP_ij, dS_ij, dK_j.clone(), dV_j.clone()))
        dK[..., c, :], dV[..., c, :] = dK_j, dV_j
    return dQ, dK, dV

"""Minimal FlashAttention: the Python face of kernels/*.cu.

    flash_attention(q, k, v, causal=False, softmax_scale=None)   the kernels, on GPU or CPU, with autograd
                                                                  (version=2: the FlashAttention-2 kernels)
    manual_attention(q, k, v, causal=False, softmax_scale=None)  plain attention, the reference
    forward(q, k, v, ...), backward(dO, q, k, v, O, L, ...)       the kernels (version=1 or 2), called directly
    mirror_forward(q, k, v, ...), mirror_backward(...)            Algorithms 1 and 4 tile by tile in PyTorch

Tensors are (B, H, N, d), the layout of torch.nn.functional.scaled_dot_product_attention.
CUDA tensors run the CUDA build of kernels/; CPU tensors run the very same source compiled as C++
against kernels/cpu_cuda.h, an emulation of the CUDA runtime (see the README).

Block sizes Br, Bc are compile-time constants of the kernels. Choose them per call
(flash_attention(..., Br=64, Bc=16)) or for the process with the environment variables
MINIMAL_FLASH_BR and MINIMAL_FLASH_BC; each configuration is compiled once and cached.
"""

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.utils.cpp_extension

KERNELS = Path(__file__).resolve().parent / "kernels"
_loaded = {}  # (device type, Br, Bc) -> extension module


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


def load_kernels(device_type="cuda", Br=None, Bc=None):
    """Compile (first time only) and load the kernels for 'cuda' or 'cpu' with block sizes Br, Bc."""
    Br, Bc = block_sizes(Br, Bc)
    key = (device_type, Br, Bc)
    if key not in _loaded:
        name = f"minimal_flash_{device_type}_br{Br}_bc{Bc}"
        build_dir = (Path(torch.utils.cpp_extension.get_default_build_root())
                     / f"minimal_flash-torch{torch.__version__}" / name)
        build_dir.mkdir(parents=True, exist_ok=True)
        defines = [f"-DBR={Br}", f"-DBC={Bc}"]
        if device_type == "cuda":
            source, flags = KERNELS / "bindings.cu", {"extra_cuda_cflags": ["-O3", "-lineinfo"] + defines}
        else:
            source, flags = KERNELS / "cpu.cpp", {"extra_cflags": ["-O3", "-Wno-unknown-pragmas"] + defines}
        _use_this_pythons_ninja()
        _say_if_building(build_dir / f"{name}.so", f"{source.relative_to(KERNELS.parent)} for {device_type} "
                         f"with Br={Br}, Bc={Bc}")
        _loaded[key] = torch.utils.cpp_extension.load(
            name=name, sources=[str(source)], build_directory=str(build_dir), **flags)
    return _loaded[key]


def _use_this_pythons_ninja():
    """torch builds with the first `ninja` on PATH. Put the one that requirements.txt installed beside
    this Python first: a process started without activating the environment (a Jupyter kernel, say)
    would otherwise find another ninja, or none, and two ninja versions rebuild each other's builds."""
    interpreter_bin, path = str(Path(sys.executable).parent), os.environ.get("PATH", "")
    if path.split(os.pathsep)[0] != interpreter_bin:
        os.environ["PATH"] = interpreter_bin + os.pathsep + path


def _say_if_building(built, what):
    """torch rebuilds, silently, when a source changed since the last build (you edited a .cu file):
    say so, or the minute it takes looks like a hang."""
    if not built.exists() or built.stat().st_mtime < max(f.stat().st_mtime for f in KERNELS.iterdir()):
        print(f"minimal_flash: compiling {what}; a build takes a minute or so", file=sys.stderr, flush=True)


def _check_inputs(q, k, v):
    """Raise a clear error for anything the kernels cannot take; return (q, k, v) contiguous."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float32_tensor(name, t)
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


def forward(q, k, v, causal=False, softmax_scale=None, *, Br=None, Bc=None, out=None, version=1):
    """Run kernels/flash.cu (version 1, Algorithm 1) or kernels/flash2.cu (version 2, the
    FlashAttention-2 loop order). Returns (O, L): the attention output and the row log-sum-exp
    L = m + log(l) that the backward pass needs. `out=(O, L)` writes into given tensors (the tests
    fill them with NaN first, so an element the kernel fails to write shows)."""
    q, k, v = _check_inputs(q, k, v)
    _check_version(version)
    scale = _scale(q, softmax_scale)
    O, L = out if out is not None else (torch.empty_like(q), q.new_empty(q.shape[:-1]))
    if q.numel() > 0:  # B, H or N is 0: nothing to compute, and a grid of 0 blocks is an error
        kernels = load_kernels(q.device.type, Br, Bc)
        _check_shared_memory(kernels, q, "forward", version)
        _raise_if(kernels.forward(q, k, v, O, L, bool(causal), scale, version))
    return O, L


def _check_version(version):
    if version not in (1, 2):
        raise ValueError(f"version = {version!r}: 1 (Algorithm 1, kernels/flash.cu) or 2 "
                         "(FlashAttention-2, kernels/flash2.cu)")


def backward(dO, q, k, v, O, L, causal=False, softmax_scale=None, *, Br=None, Bc=None, out=None, version=1):
    """Run kernels/flash_backward.cu (version 1, Algorithm 4) or kernels/flash2_backward.cu (version 2,
    the FlashAttention-2 loop order): the gradients (dQ, dK, dV) of a loss whose gradient with
    respect to the output O = forward(q, k, v)[0] is dO. O and L are what forward() returned for
    these q, k, v, causal, scale and block sizes (either version's: both give the same O and L).
    `out=(dQ, dK, dV)` writes into given tensors."""
    q, k, v = _check_inputs(q, k, v)
    dO, O = (_check_like(name, t, q) for name, t in (("dO", dO), ("O", O)))
    L = _check_like("L", L, q[..., 0])
    _check_version(version)
    scale = _scale(q, softmax_scale)
    dQ, dK, dV = out if out is not None else (torch.empty_like(q) for _ in range(3))
    if q.numel() > 0:
        kernels = load_kernels(q.device.type, Br, Bc)
        _check_shared_memory(kernels, q, "backward", version)
        _raise_if(kernels.backward(q, k, v, O, dO, L, dQ, dK, dV, bool(causal), scale, version))
    return dQ, dK, dV


def _check_float32_tensor(name, t):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} has dtype {t.dtype}; the kernels are float32 only (use .float())")


def _check_like(name, t, like):
    """The backward's other inputs must match q in shape (L: q's without d), dtype and device."""
    _check_float32_tensor(name, t)
    if t.shape != like.shape:
        raise ValueError(f"{name} must have shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name} is on {t.device}, q on {like.device}: they must be on one device")
    return t.contiguous()


def _raise_if(error):
    """The extension returns an error message instead of throwing (see kernels/bindings.cu)."""
    if error:
        raise RuntimeError(f"minimal_flash: {error}")


# Per (pass, version): the extension's function that gives a block's least shared memory for head
# dim d, and the kernel's name in the error message.
_SHARED_BYTES = {("forward", 1): ("forward_shared_bytes", "forward"),
                 ("forward", 2): ("flash2_shared_bytes", "FlashAttention-2 forward"),
                 ("backward", 1): ("backward_shared_bytes", "backward"),
                 ("backward", 2): ("flash2_backward_shared_bytes", "FlashAttention-2 backward")}


def _check_shared_memory(kernels, q, pass_, version):
    shared_bytes, kernel = _SHARED_BYTES[pass_, version]
    needed = getattr(kernels, shared_bytes)(q.shape[-1])
    available = kernels.device_shared_bytes(q)
    if needed > available:
        raise ValueError(f"head dim d = {q.shape[-1]} needs {needed} bytes of shared memory per block "
                         f"in the {kernel} kernel with Br = {kernels.Br}, Bc = {kernels.Bc}, more than "
                         f"the {available} this device allows: use a smaller d or smaller block sizes")


class FlashAttention(torch.autograd.Function):
    """flash_attention with gradients. The forward saves q, k, v, O and the row log-sum-exp L: O(N d)
    memory. The N x N matrix P is never stored; the backward kernel recomputes it tile by tile."""

    @staticmethod
    def forward(ctx, q, k, v, causal, softmax_scale, Br, Bc, version):
        q, k, v = _check_inputs(q, k, v)
        if any(ctx.needs_input_grad[:3]) and q.numel() > 0:
            # Fail now, not after the forward has run, if the backward will not fit.
            kernels = load_kernels(q.device.type, Br, Bc)
            _check_shared_memory(kernels, q, "backward", version)
        O, L = forward(q, k, v, causal, softmax_scale, Br=Br, Bc=Bc, version=version)
        ctx.save_for_backward(q, k, v, O, L)
        ctx.options = dict(causal=causal, softmax_scale=softmax_scale, Br=Br, Bc=Bc, version=version)
        return O

    @staticmethod
    def backward(ctx, dO):
        dQ, dK, dV = backward(dO, *ctx.saved_tensors, **ctx.options)
        return dQ, dK, dV, None, None, None, None, None


def flash_attention(q, k, v, causal=False, softmax_scale=None, *, Br=None, Bc=None, version=1):
    """softmax(q k^T * softmax_scale [+ causal mask]) v, computed by the FlashAttention kernels,
    differentiable. softmax_scale defaults to 1/sqrt(d). Br, Bc default to MINIMAL_FLASH_BR/_BC,
    else 32. version=1 runs the FlashAttention paper's loop order (forward kernels/flash.cu,
    backward kernels/flash_backward.cu), version=2 FlashAttention-2's (kernels/flash2.cu,
    kernels/flash2_backward.cu)."""
    Br, Bc = block_sizes(Br, Bc)  # fixed now: the backward must use the forward's
    _check_version(version)
    return FlashAttention.apply(q, k, v, causal, softmax_scale, Br, Bc, version)


def manual_attention(q, k, v, causal=False, softmax_scale=None):
    """Plain attention: builds the whole N x N score matrix S. The reference for every check."""
    N = q.shape[-2]
    S = (q @ k.transpose(-2, -1)) * _scale(q, softmax_scale)
    if causal:
        S = S.masked_fill(_above_diagonal(N, N, 0, 0, q.device), float("-inf"))
    return torch.softmax(S, dim=-1) @ v


def _scale(q, softmax_scale):
    """The factor on Q K^T: 1/sqrt(d) unless given."""
    return 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)


def _above_diagonal(rows, cols, row0, col0, device):
    """Mask of the (query, key) pairs a causal model hides: key index > query index."""
    r = torch.arange(row0, row0 + rows, device=device)[:, None]
    c = torch.arange(col0, col0 + cols, device=device)[None, :]
    return c > r


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

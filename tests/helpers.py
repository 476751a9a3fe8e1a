"""Shared by the tests: the devices, the test matrix over (version, dtype), fresh random inputs, the
float64 reference and the error measures; flash_attn_varlen_func's reference, a sequence at a time; the
scripts of tools/ as modules."""
import importlib.util
import math
from pathlib import Path

import pytest
import torch

import minimal_flash as mf

ROOT = Path(__file__).resolve().parents[1]


def tool(name):
    """tools/NAME.py as a module (tools/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# Every kernel test runs on the CPU emulation; on a machine with a GPU it runs on CUDA too.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine"))]

# The matrix: every (version, dtype) that the kernels take, from minimal_flash.VERSIONS. A new
# version's row there puts it under every test that takes CASES.
CASES = [(n, dtype) for n, v in mf.VERSIONS.items() for dtype in v.dtypes]
CASE_IDS = [f"v{n}-{str(dtype).replace('torch.', '')}" for n, dtype in CASES]
MATRIX = pytest.mark.parametrize("version,dtype", CASES, ids=CASE_IDS)
# The versions whose tiles the block sizes Br, Bc shape (1 and 2).
SIZED = [n for n, v in mf.VERSIONS.items() if v.block_sizes is not None]

# fp32 kernels against a float64 reference: seen ~3e-7 on the CPU. A wrong mask, a row read past
# the end or a missing rescale gives errors of order 1e-2 to 1. Half precision: the official
# FlashAttention tests' rule, at most twice the error of plain attention in the same precision.
TOL = 1e-5

# With the default Br = Bc = 32: N of one row, below, equal to, a multiple of and not a multiple of
# the block size; d from 1 to 200 (odd ones too; 128 and 200 need the >48 KB shared-memory opt-in).
FP32_SHAPES = [(2, 3, 1, 64), (2, 3, 17, 64), (2, 3, 32, 64), (2, 3, 64, 64), (2, 3, 100, 64),
               (1, 2, 77, 1), (1, 2, 77, 3), (2, 1, 50, 16), (1, 2, 65, 128), (1, 1, 40, 200)]
# Versions 3 and 4 (d = 64 and 128): N of one row, below, equal to, past and a multiple of the
# tiles' 64 rows or keys (version 3) or 128 (version 4, and version 3's backward block), 255: a warp's
# last key at N - 1, the edge-tile test's boundary; 384 and 520: 3 and 5 key tiles of 128, so that
# version 4's 2-stage ring of K_j, V_j refills each stage and its barriers change phase; B * H > 1.
# Last, version 3's other head dims: 32 and 96, and 192 and 256, where its forward blocks take 8 warps of
# 16 rows and its backward blocks 64 keys, two warps on each 16 (N = 130: two row blocks, three key blocks).
HALF_SHAPES = [(2, 3, 1, 64), (2, 3, 17, 64), (1, 2, 64, 64), (2, 2, 100, 64), (1, 1, 130, 128), (2, 1, 64, 128),
               (1, 1, 255, 64), (1, 2, 384, 128), (1, 1, 520, 64), (2, 2, 100, 32), (1, 2, 130, 96),
               (1, 2, 130, 192), (2, 1, 130, 256)]


def shapes(version):
    """The shapes a version is tested at: any d for the fp32 versions, its own for the others."""
    head_dims = mf.VERSIONS[version].head_dims
    return FP32_SHAPES if head_dims is None else [s for s in HALF_SHAPES if s[3] in head_dims]


def head_dim(version, d=32):
    """d if the version takes it, else its smallest head dim: for tests whose d does not matter."""
    head_dims = mf.VERSIONS[version].head_dims
    return d if head_dims is None or d in head_dims else head_dims[0]


CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
# Other block sizes, Br > Bc and Br < Bc: a causal row can then see no key of a tile at all.
OTHER_N = pytest.mark.parametrize("N", [1, 15, 16, 64, 100])
OTHER_BLOCK_SIZES = pytest.mark.parametrize("Br,Bc", [(16, 64), (64, 16)])


def rel_err(x, ref):
    """||x - ref|| / ||ref||, in float64; NaN anywhere in x gives NaN, which fails any bound."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def random_qkv(B, H, N, d, device, generator, dtype=torch.float32):
    """Fresh standard-normal q, k, v: never zeros or ones, which hide indexing mistakes."""
    return [torch.randn(B, H, N, d, generator=generator).to(device, dtype) for _ in range(3)]


def plain_scores(q, k, causal, scale=None):
    """S = q k^T scale (1 / sqrt(d) unless given), causal: a key after its query -inf; in q's dtype.
    Written here, not taken from minimal_flash (its manual_attention shares _scale with the kernels:
    a reference must not share the code it checks)."""
    N, d = q.shape[-2:]
    S = (q @ k.transpose(-2, -1)) * (d ** -0.5 if scale is None else scale)
    if causal:
        S = S.masked_fill(torch.ones(N, k.shape[-2], dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return S


def plain_attention(q, k, v, causal, scale=None):
    """softmax(S) v, in q's dtype: the reference in float64, the half-precision rule's yardstick in bf16
    and fp16 (the same operations as minimal_flash.manual_attention, none of its code)."""
    return torch.softmax(plain_scores(q, k, causal, scale), dim=-1) @ v


def reference(q, k, v, causal, scale=None):
    """O and L = logsumexp of the scores, computed in float64 by plain attention."""
    q, k, v = q.double(), k.double(), v.double()
    return plain_attention(q, k, v, causal, scale), plain_scores(q, k, causal, scale).logsumexp(dim=-1)


def poisoned_outputs(q):
    """O and L filled with NaN, so that an element the kernel never writes fails the check."""
    return torch.full_like(q, float("nan")), q.new_full(q.shape[:-1], float("nan"), dtype=torch.float32)


def reference_grads(q, k, v, dO, causal, scale=None):
    """dQ, dK, dV of sum(O * dO), O = plain attention, by float64 autograd."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(plain_attention(q, k, v, causal, scale), (q, k, v), dO.double())


def half_precision_grads(q, k, v, dO, causal, scale=None):
    """dQ, dK, dV of sum(O * dO), O = plain attention, by autograd in q's own precision (version 3's
    tests: the gradients whose error the official FlashAttention rule takes as its yardstick)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(plain_attention(q, k, v, causal, scale), (q, k, v), dO)


def random_dO(q, generator):
    """A fresh random output gradient: with dO = ones, a dV that uses the wrong row of dO still
    comes out right."""
    return torch.randn(q.shape, generator=generator, dtype=q.dtype).to(q.device)


def cancelled_scale(q, k, v, dO, scale):
    """At N = 1 there is one key, P = 1 and O = V, so dS = dP - D = dO.v - dO.O is exactly 0 and so
    are dQ and dK: computed, they are rounding noise of the terms that cancel. This is the size of
    those terms in dQ (scale * dP * k) and dK (scale * dP * q), to judge the noise against."""
    dP = (dO.double() * v.double()).sum(dim=-1, keepdim=True)
    return scale * dP * k.double(), scale * dP * q.double()


def assert_close(name, x, ref, plain=None, atol=0.0):
    """x against its float64 reference: fp32 within TOL (relative); half precision (plain given: the
    same computed by plain attention in x's precision) by the official tests' rule: a largest error at
    most twice plain's, plus twice the rounding of x's dtype at the reference's size (the official
    2 |(ref + 0.3 - 0.3) - ref|, ref in x's dtype: about two of its steps there, so that plain's error
    landing on half a step, the least that rounding allows, does not leave x no room for one), plus atol
    (the official tests' 3e-4 with softcap). NaN anywhere in x (an element never written) fails either."""
    assert torch.isfinite(x).all(), f"{name}: an element was not written"
    if x.dtype == torch.float32:
        assert rel_err(x, ref) < TOL, (name, rel_err(x, ref))
    else:
        error, plain_error = ((t.double() - ref).abs().max().item() for t in (x, plain))
        rounded = ref.to(x.dtype)
        rounding = 2 * (rounded + 0.3 - 0.3 - rounded).abs().max().item() if ref.numel() else 0.0
        assert error <= 2 * plain_error + rounding + atol, (name, error, plain_error, rounding)


def assert_gradients(grads, q, k, v, dO, causal, scale=None):
    """dQ, dK, dV against float64 autograd of plain attention (half precision: the 2x rule against
    plain attention's own gradients in that precision). At N = 1, dQ and dK are exactly 0 (one key: P
    = 1, dS = dP - D = 0); ours are the rounding noise of terms that cancel, judged against their size."""
    refs = reference_grads(q, k, v, dO, causal, scale)
    plains = half_precision_grads(q, k, v, dO, causal, scale) if q.dtype != torch.float32 else (None,) * 3
    assert all(g.dtype == q.dtype for g in grads)
    if q.shape[2] == 1:
        bound = TOL if q.dtype == torch.float32 else 1e-4
        sizes = cancelled_scale(q, k, v, dO, q.shape[-1] ** -0.5 if scale is None else scale)
        for name, grad, size in zip(("dQ", "dK"), grads, sizes):
            assert torch.isfinite(grad).all(), f"{name}: an element was not written"
            assert (grad.double() - 0).norm() / size.norm() < bound, name
        grads, refs, plains = grads[2:], refs[2:], plains[2:]
    for name, grad, ref, plain in zip(("dQ", "dK", "dV")[-len(grads):], grads, refs, plains):
        assert_close(name, grad, ref, plain)


def cu_seqlens(lengths, device):
    """cu_seqlens: int32 (batch + 1,), each sequence's first row, then the total."""
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def causal_hidden(Lq, Lk, causal):
    """(Lq, Lk) mask of the keys a query does not see: causal, aligned at the bottom right."""
    if not causal:
        return torch.zeros(Lq, Lk, dtype=bool)
    return torch.arange(Lk)[None, :] > torch.arange(Lq)[:, None] + Lk - Lq


def split_options(options, device):
    """A call's options (the official window_size, softcap, alibi_slopes; score_mod, mask_mod and
    mod_tensors) as the kernels take them, their tensors on `device`, and the official ones alone, on
    the CPU, as the dense references take them."""
    def to(x):
        if isinstance(x, dict):  # mod_tensors
            return {n: t.to(device) for n, t in x.items()}
        return x.to(device) if torch.is_tensor(x) else x
    official = {name: x for name, x in options.items() if name in ("window_size", "softcap", "alibi_slopes")}
    return {name: to(x) for name, x in options.items()}, official


def softmax_attention(S, keep, v, dropped=1.0):
    """The last step of the dense references (here and tests/test_mods.py's): P = the softmax of the scores
    S (..., Lq, Lk) over the keys that keep (broadcastable to S) keeps, P V in S's dtype, and the log-sum-exp
    of the kept scores in float64. A row that sees no key: out 0 and lse -inf (its scores are set to 0
    first, so that neither the softmax nor its gradient is NaN; then its P is 0). dropped: dropout's
    Z / (1 - p), multiplied into P before P V (the lse is the undropped one, as the kernels' L)."""
    keep = torch.as_tensor(keep, device=S.device).expand(S.shape)
    S = S.masked_fill(~keep, -math.inf)
    empty = ~keep.any(dim=-1, keepdim=True)
    P = torch.softmax(S.masked_fill(empty, 0.0), dim=-1) * ~empty
    return (P * torch.as_tensor(dropped, device=S.device).to(P.dtype)) @ v, S.double().logsumexp(dim=-1)


def sequence_attention(q, k, v, causal, scale, window_size=(-1, -1), softcap=0.0, slopes=None, bias=0.0, keep=True,
                       dropped=1.0):
    """Plain attention of one sequence in q's dtype, differentiable: q (Lq, H, d), k, v (Lk, Hk, d), each
    query head reading the kv head of its group. Returns out (Lq, H, d) and lse (H, Lq), the log-sum-exp
    of the visible scores, in float64 (softmax_attention). The official options, written out densely:
    window_size (left, right) and ALiBi's slopes (H,) measure query i's distance to key j from the bottom
    right, i + Lk - Lq - j, as causal does; softcap caps the scaled scores first. bias, keep: a dense
    score_mod's bias and mask_mod's mask, (H or 1, Lq, Lk), added and applied after them; dropped,
    dropout's multiplier of P (softmax_attention)."""
    (Lq, H, _), Lk = q.shape, k.shape[0]
    kh, vh = (t.repeat_interleave(H // k.shape[1], dim=1).transpose(0, 1) for t in (k, v))  # (H, Lk, d)
    S = q.transpose(0, 1) @ kh.transpose(1, 2) * scale  # (H, Lq, Lk)
    distance = (torch.arange(Lq)[:, None] + Lk - Lq - torch.arange(Lk)[None, :]).to(q.device)  # (Lq, Lk)
    if softcap:
        S = softcap * torch.tanh(S / softcap)
    if slopes is not None:
        S = S - slopes.to(S.dtype)[:, None, None] * distance.abs()
    S = S + torch.as_tensor(bias, device=q.device).to(S.dtype)
    hidden = causal_hidden(Lq, Lk, causal).to(q.device)
    left, right = window_size
    hidden = hidden | (distance > left if left >= 0 else False) | (distance < -right if right >= 0 else False)
    out, lse = softmax_attention(S, ~hidden & torch.as_tensor(keep, device=q.device), vh, dropped)
    return out.transpose(0, 1), lse


# A score_mod and mask_mod of one's own on a KV cache (test_kvcache) and on packed sequences (test_varlen),
# one build for both (each set of mods is compiled once: tens of seconds on a GPU machine): a bias from a
# table per (sequence, head) growing with the distance, and a mask that reads every index, q's head among them.
TABLE_SCORE_MOD = "score + table(b, h) * 0.1f * (q_idx + shift - kv_idx)"
EVERY_INDEX_MASK_MOD = "(q_idx + 2 * kv_idx + b + h) % 5 != 1"


def varlen_reference(q, k, v, lengths_q, lengths_k, causal, dO, dtype=torch.float64, window_size=(-1, -1),
                     softcap=0.0, alibi_slopes=None, mods=None, dropped=None):
    """flash_attn_varlen_func's reference on packed q (total_q, H, d), k, v (total_k, Hk, d): out, lse
    (H, total_q), dQ, dK, dV of sum(out * dO), attention a sequence at a time in `dtype` (float64: the
    reference; q's: plain attention, the yardstick of the official rule), with the official options
    (alibi_slopes (H,) or (batch, H)) and mods(b, Lq, Lk) -> (bias, keep) of sequence b, a score_mod and
    mask_mod written out densely (sequence_attention); dropped(b, Lq, Lk) -> (H, Lq, Lk), dropout's
    multiplier of sequence b's P."""
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    scale = q.shape[-1] ** -0.5
    outs, lses = [], []
    cq, ck = cu_seqlens(lengths_q, "cpu").tolist(), cu_seqlens(lengths_k, "cpu").tolist()
    for b in range(len(lengths_q)):
        slopes = None if alibi_slopes is None else alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
        bias, keep = (0.0, True) if mods is None else mods(b, lengths_q[b], lengths_k[b])
        out, lse = sequence_attention(q[cq[b]:cq[b + 1]], k[ck[b]:ck[b + 1]], v[ck[b]:ck[b + 1]], causal, scale,
                                      window_size, softcap, slopes, bias, keep,
                                      1.0 if dropped is None else dropped(b, lengths_q[b], lengths_k[b]))
        outs.append(out)
        lses.append(lse)
    out = torch.cat(outs)
    grads = torch.autograd.grad(out, (q, k, v), dO.to(dtype))
    return out.detach(), torch.cat(lses, dim=1), *grads


# Philox4x32-10, the counter-based generator of dropout's mask (kernels/philox.cuh), in PyTorch: tests/
# test_dropout.py checks it against the published answers.
MASK32 = 0xFFFFFFFF


def mulhilo(m, x):
    """(m x) >> 32 and (m x) & (2^32 - 1) for a 32-bit constant m and int64 tensors x < 2^32, exactly
    (x split in 16-bit halves: every product fits in int64)."""
    xh, xl = x >> 16, x & 0xFFFF
    a, t = m * xh, m * xl
    return (a + (t >> 16)) >> 16, (((a & 0xFFFF) << 16) + t) & MASK32


def philox(c, key):
    """Philox4x32-10 on int64 tensors c = (x, y, z, w), key = (k0, k1): four words."""
    x, y, z, w = c
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = mulhilo(0xD2511F53, x)
        hi1, lo1 = mulhilo(0xCD9E8D57, z)
        x, y, z, w = hi1 ^ y ^ k0, lo1, hi0 ^ w ^ k1, lo0
        k0, k1 = (k0 + 0x9E3779B9) & MASK32, (k1 + 0xBB67AE85) & MASK32
    return x, y, z, w


def dropout_kept(bh, Lq, Lk, p, seed):
    """(len(bh), Lq, Lk) bool: the pairs (query i, key j) of slices bh that dropout keeps, their word of
    Philox for the seed at least p 2^32 (kernels/mods.cuh's dropout_words): the counter (j0, i0, bh, 0)
    with i0, j0 = i, j with bit 3 cleared, and its word x, y, z, w for (i0, j0), (i0, j0 + 8), (i0 + 8,
    j0), (i0 + 8, j0 + 8)."""
    j, i = torch.arange(Lk)[None, None, :], torch.arange(Lq)[None, :, None]
    counter = [t.expand(len(bh), Lq, Lk).long() for t in (j & ~8, i & ~8, bh[:, None, None], torch.zeros(1, 1, 1))]
    words = torch.stack(philox(counter, (seed & MASK32, seed >> 32)))
    which = (2 * (i >> 3 & 1) + (j >> 3 & 1)).expand(len(bh), Lq, Lk)
    return words.gather(0, which[None])[0] >= min(round(p * 2**32), MASK32)

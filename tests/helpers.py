"""Shared by the tests: the devices, the test matrix, fresh random inputs, the float64 reference and
the error measure."""
import pytest
import torch

import minimal_flash as mf

# Every kernel test runs on the CPU emulation; on a machine with a GPU it runs on CUDA too.
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU on this machine"))]

# fp32 kernels against a float64 reference: seen ~3e-7 on the CPU. A wrong mask, a row read past
# the end or a missing rescale gives errors of order 1e-2 to 1.
TOL = 1e-5

# With the default Br = Bc = 32: N of one row, below, equal to, a multiple of and not a multiple of
# the block size; d from 1 to 200 (odd ones too; 128 and 200 need the >48 KB shared-memory opt-in).
SHAPES = [(2, 3, 1, 64), (2, 3, 17, 64), (2, 3, 32, 64), (2, 3, 64, 64), (2, 3, 100, 64),
          (1, 2, 77, 1), (1, 2, 77, 3), (2, 1, 50, 16), (1, 2, 65, 128), (1, 1, 40, 200)]

# The float32 versions: 1, the paper's loop order (flash.cu, flash_backward.cu); 2, FlashAttention-2's
# (flash2.cu, flash2_backward.cu). Version 3 (bf16, fp16) has its own tests, test_flash3.py.
VERSIONS = pytest.mark.parametrize("version", mf.FP32_VERSIONS, ids=[f"v{v}" for v in mf.FP32_VERSIONS])
CAUSAL = pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
# Other block sizes, Br > Bc and Br < Bc: a causal row can then see no key of a tile at all.
OTHER_N = pytest.mark.parametrize("N", [1, 15, 16, 64, 100])
OTHER_BLOCK_SIZES = pytest.mark.parametrize("Br,Bc", [(16, 64), (64, 16)])


def rel_err(x, ref):
    """||x - ref|| / ||ref||, in float64; NaN anywhere in x gives NaN, which fails any bound."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def random_qkv(B, H, N, d, device, generator):
    """Fresh standard-normal q, k, v: never zeros or ones, which hide indexing mistakes."""
    return [torch.randn(B, H, N, d, generator=generator).to(device) for _ in range(3)]


def reference(q, k, v, causal, scale=None):
    """O and L = logsumexp of the scores, computed in float64 by plain attention."""
    q, k, v = q.double(), k.double(), v.double()
    N, d = q.shape[-2:]
    S = (q @ k.transpose(-2, -1)) * (d ** -0.5 if scale is None else scale)
    if causal:
        S = S.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return mf.manual_attention(q, k, v, causal, scale), S.logsumexp(dim=-1)


def poisoned_outputs(q):
    """O and L filled with NaN, so that an element the kernel never writes fails the check."""
    return torch.full_like(q, float("nan")), q.new_full(q.shape[:-1], float("nan"))


def reference_grads(q, k, v, dO, causal, scale=None):
    """dQ, dK, dV of sum(O * dO), O = plain attention, by float64 autograd."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(mf.manual_attention(q, k, v, causal, scale), (q, k, v), dO.double())


def half_precision_grads(q, k, v, dO, causal, scale=None):
    """dQ, dK, dV of sum(O * dO), O = plain attention, by autograd in q's own precision (version 3's
    tests: the gradients whose error the official FlashAttention rule takes as its yardstick)."""
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(mf.manual_attention(q, k, v, causal, scale), (q, k, v), dO)


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

"""Version 3 (kernels/flash3.cu, kernels/flash3_backward.cu, tensor cores), bf16 and fp16, against
float64 attention of the same 16-bit inputs, forward and backward (always with a random dO). The
bound is the official FlashAttention tests' rule: the largest error of our output (or gradient) at
most twice that of plain attention computed in the same half precision (its gradients by autograd).
On the CPU this runs the emulation of ldmatrix and mma.sync (kernels/cpu_cuda.h); on a GPU, the
tensor cores."""
import pytest
import torch

import minimal_flash as mf
from helpers import (CAUSAL, DEVICES, cancelled_scale, half_precision_grads, random_dO, random_qkv, reference,
                     reference_grads, rel_err)

HALVES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# N of one row, below, equal to, past and a multiple of the tiles' 64 rows or keys and the backward
# block's 128 keys (255: a warp's last key at N - 1, the edge-tile test's boundary); d = 64 and 128;
# B * H > 1.
SHAPES = [(2, 3, 1, 64), (2, 3, 17, 64), (1, 2, 64, 64), (2, 2, 100, 64), (1, 1, 130, 128), (2, 1, 64, 128),
          (1, 1, 255, 64)]


def check_forward(device, shape, causal, dtype, generator, scale=None):
    q, k, v = (t.to(dtype) for t in random_qkv(*shape, device, generator))
    O, L = torch.full_like(q, float("nan")), q.new_full(q.shape[:-1], float("nan"), dtype=torch.float32)
    mf.forward(q, k, v, causal, scale, out=(O, L), version=3)
    O_ref, L_ref = reference(q, k, v, causal, scale)  # float64, of the 16-bit values
    plain = mf.manual_attention(q, k, v, causal, scale)  # in the same half precision
    assert torch.isfinite(O).all() and torch.isfinite(L).all(), "an output element was not written"
    error, plain_error = ((x.double() - O_ref).abs().max().item() for x in (O, plain))
    assert error <= 2 * plain_error, (error, plain_error)
    assert rel_err(L, L_ref) < 1e-5  # S and its log-sum-exp are fp32 sums of exact products


def test_flash_attention_picks_version_3_for_half_precision(generator):
    q, k, v = (t.bfloat16() for t in random_qkv(1, 2, 33, 64, "cpu", generator))
    O = mf.flash_attention(q, k, v, causal=True)
    assert O.dtype == torch.bfloat16 and torch.equal(O, mf.forward(q, k, v, True, version=3)[0])


def test_head_dims_other_than_64_and_128_are_refused():
    q = torch.randn(1, 1, 8, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="version 3 takes head dim d = 64 or 128, not 32"):
        mf.forward(q, q, q)
    with pytest.raises(RuntimeError, match="version 3 takes head dim d = 64 or 128, not 32"):
        mf.backward(q, q, q, q, q, q[..., 0].float())


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_softmax_scale_not_above_0_is_refused(scale):
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match=f"version 3 takes softmax_scale > 0, not {scale}"):
        mf.forward(q, q, q, softmax_scale=scale)


def test_backward_grid_limit_is_refused():
    """One column of blocks per (batch, head), as in the forward: at most 65535 of them."""
    q = torch.zeros(1, 65536, 1, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="B \\* H = 65536 is more than the 65535"):
        mf.backward(q, q, q, q, q, q[..., 0].float())


def check_gradients(grads, q, k, v, dO, causal, scale=None):
    """The official rule for each of dQ, dK, dV. At N = 1, dQ and dK are exactly 0 and plain
    attention gets exact zeros too; ours are the rounding noise of fp32 sums that cancel (dP - D,
    summed in two orders), judged against the size of those terms, as in test_backward.py."""
    assert all(g.dtype == q.dtype and torch.isfinite(g).all() for g in grads), "a gradient element was not written"
    refs = reference_grads(q, k, v, dO, causal, scale)  # float64, of the 16-bit values
    plains = half_precision_grads(q, k, v, dO, causal, scale)
    if q.shape[2] == 1:
        for grad, size in zip(grads, cancelled_scale(q, k, v, dO, mf._scale(q, scale))):
            assert grad.double().norm() / size.norm() < 1e-4
        grads, refs, plains = grads[2:], refs[2:], plains[2:]
    for name, grad, plain, ref in zip(("dQ", "dK", "dV")[-len(grads):], grads, plains, refs):
        error, plain_error = ((x.double() - ref).abs().max().item() for x in (grad, plain))
        assert error <= 2 * plain_error, (name, error, plain_error)


def check_backward(device, shape, causal, dtype, generator, scale=None):
    q, k, v = (t.to(dtype) for t in random_qkv(*shape, device, generator))
    dO = random_dO(q, generator)
    O, L = mf.forward(q, k, v, causal, scale, version=3)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))  # unwritten elements show
    mf.backward(dO, q, k, v, O, L, causal, scale, out=grads, version=3)
    check_gradients(grads, q, k, v, dO, causal, scale)


PASSES = pytest.mark.parametrize("check", [check_forward, check_backward], ids=["forward", "backward"])


@pytest.mark.parametrize("device", DEVICES)
@PASSES
@HALVES
@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_float64(device, shape, causal, dtype, check, generator):
    check(device, shape, causal, dtype, generator)


@pytest.mark.parametrize("device", DEVICES)
@PASSES
@HALVES
def test_softmax_scale(device, dtype, check, generator):
    check(device, (1, 2, 45, 64), True, dtype, generator, scale=0.3)


@pytest.mark.parametrize("device", DEVICES)
@HALVES
@CAUSAL
def test_loss_backward_reaches_q_k_v(device, causal, dtype, generator):
    """A loss built on flash_attention in half precision: .backward() fills q.grad, k.grad, v.grad
    in that precision, through kernels/flash3_backward.cu."""
    q, k, v = (t.to(dtype).requires_grad_() for t in random_qkv(2, 3, 70, 64, device, generator))
    weights = random_dO(q, generator)
    (mf.flash_attention(q, k, v, causal) * weights).sum().backward()
    check_gradients((q.grad, k.grad, v.grad), q.detach(), k.detach(), v.detach(), weights, causal)

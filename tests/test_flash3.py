"""Version 3 (kernels/flash3.cu, tensor cores), bf16 and fp16, against float64 attention of the same
16-bit inputs. The bound is the official FlashAttention tests' rule: the largest error of our output
at most twice that of plain attention computed in the same half precision. On the CPU this runs the
emulation of ldmatrix and mma.sync (kernels/cpu_cuda.h); on a GPU, the tensor cores."""
import pytest
import torch

import minimal_flash as mf
from helpers import CAUSAL, DEVICES, random_qkv, reference, rel_err

HALVES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
# N of one row, below, equal to, past and a multiple of the block's 64 rows and the tile's 64 keys;
# d = 64 and 128; B * H > 1.
SHAPES = [(2, 3, 1, 64), (2, 3, 17, 64), (1, 2, 64, 64), (2, 2, 100, 64), (1, 1, 130, 128), (2, 1, 64, 128)]


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


@pytest.mark.parametrize("device", DEVICES)
@HALVES
@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64(device, shape, causal, dtype, generator):
    check_forward(device, shape, causal, dtype, generator)


@pytest.mark.parametrize("device", DEVICES)
@HALVES
def test_softmax_scale(device, dtype, generator):
    check_forward(device, (1, 2, 45, 64), True, dtype, generator, scale=0.3)


def test_flash_attention_picks_version_3_for_half_precision(generator):
    q, k, v = (t.bfloat16() for t in random_qkv(1, 2, 33, 64, "cpu", generator))
    O = mf.flash_attention(q, k, v, causal=True)
    assert O.dtype == torch.bfloat16 and torch.equal(O, mf.forward(q, k, v, True, version=3)[0])


def test_head_dims_other_than_64_and_128_are_refused():
    q = torch.randn(1, 1, 8, 32, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="version 3 takes head dim d = 64 or 128, not 32"):
        mf.forward(q, q, q)


def test_negative_softmax_scale_is_refused():
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="version 3 takes softmax_scale >= 0, not -0.5"):
        mf.forward(q, q, q, softmax_scale=-0.5)


def test_gradients_are_refused_before_the_forward_runs():
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="version 3 has no backward pass yet"):
        mf.flash_attention(q, q, q)
    with torch.no_grad():
        assert mf.flash_attention(q, q, q).shape == q.shape

"""Bad input gets a clear error that names the problem; odd-but-valid input gets the right answer."""
import pytest
import torch

import minimal_flash as mf
from helpers import random_qkv, reference, rel_err


def qkv(B=1, H=2, N=20, d=16, **kw):
    return [torch.randn(B, H, N, d, **kw) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32])
def test_rejects_other_dtypes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q has dtype .*float32 only"):
        mf.flash_attention(q.to(dtype), k, v)


def test_rejects_non_tensors():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor, got list"):
        mf.flash_attention(q, k.tolist(), v)


@pytest.mark.parametrize("shape", [(2, 20, 16), (1, 1, 2, 20, 16)])
def test_rejects_other_ranks(shape):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"v must be 4-D \(B, H, N, d\)"):
        mf.flash_attention(q, k, torch.randn(shape))


def test_rejects_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="same shape"):
        mf.flash_attention(q, k[:, :, :10], v)


def test_rejects_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="one device"):
        mf.flash_attention(q, k.to("meta"), v)


def test_rejects_devices_without_kernels():
    with pytest.raises(ValueError, match="run on CUDA or on the CPU"):
        mf.flash_attention(*qkv(device="meta"))


def test_rejects_head_dim_zero():
    with pytest.raises(ValueError, match="head dim d is 0"):
        mf.flash_attention(*qkv(d=0))


def test_rejects_head_dim_too_large_for_shared_memory():
    with pytest.raises(ValueError, match=r"head dim d = 1000 needs \d+ bytes of shared memory"):
        mf.flash_attention(*qkv(N=4, d=1000))


@pytest.mark.parametrize("Br,Bc", [(0, 32), (2048, 32), (32, 0), (32, 1000)])
def test_rejects_bad_block_sizes(Br, Bc):
    with pytest.raises(ValueError, match="B[rc] = "):
        mf.flash_attention(*qkv(), Br=Br, Bc=Bc)


@pytest.mark.parametrize("shape", [(1, 2, 0, 16), (0, 2, 5, 16), (2, 0, 5, 16)])
def test_empty_sizes_give_empty_results(shape):
    q, k, v = [torch.randn(shape) for _ in range(3)]
    O, L = mf.forward(q, k, v)
    assert O.shape == shape and L.shape == shape[:3]


def test_non_contiguous_input_is_copied(generator):
    q, k, v = random_qkv(1, 20, 3, 16, "cpu", generator)  # (B, N, H, d), as many models hold it
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # a (B, H, N, d) view, not contiguous
    assert not q.is_contiguous()
    assert rel_err(mf.flash_attention(q, k, v), reference(q, k, v, False)[0]) < 1e-5

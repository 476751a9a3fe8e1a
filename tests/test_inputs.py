"""Bad input gets a clear error that names the problem; odd-but-valid input gets the right answer."""
import pytest
import torch

import minimal_flash as mf
from helpers import DEVICES, VERSIONS, random_dO, random_qkv, reference, reference_grads, rel_err


def qkv(B=1, H=2, N=20, d=16, **kw):
    return [torch.randn(B, H, N, d, **kw) for _ in range(3)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_dtypes_no_version_takes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q has dtype .*; version 2's kernels are float32 only: the kernels "
                                        r"take float32 \(versions 1, 2\), bfloat16 and float16 \(version 3\)"):
        mf.flash_attention(q.to(dtype), k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", [1, 2])
def test_half_precision_needs_version_3(dtype, version):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match=rf"q has dtype {dtype}; version {version}'s kernels are float32 only: "
                                        r"bfloat16 and float16 run version 3"):
        mf.flash_attention(q, k, v, version=version)


def test_version_3_takes_half_precision_only():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q has dtype torch.float32; version 3's kernels are bfloat16 and "
                                        r"float16 only: float32 runs version 1 or 2"):
        mf.flash_attention(q, k, v, version=3)
    with pytest.raises(TypeError, match=r"k has dtype torch.float32; version 3"):
        mf.flash_attention(q.bfloat16(), k, v)  # q picks version 3, so k must be bfloat16 too


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


@pytest.mark.parametrize("version", [0, 4, "2"])
def test_rejects_unknown_versions(version):
    with pytest.raises(ValueError, match="version = .*: 1 .* or 2 .* or 3"):
        mf.flash_attention(*qkv(), version=version)


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


def off_16_bytes(t):
    """t's values in a contiguous tensor that starts one element into its storage, as a slice of a
    flat buffer can: not at a 16-byte-aligned address."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
def test_input_off_a_16_byte_boundary_is_copied(device, version, generator):
    """The kernels move rows 16 bytes at a time (float4 loads, cp.async, vector atomics): on a GPU a
    misaligned one is a fault. Such inputs are copied first; the gradients reach the caller's views."""
    q, k, v = random_qkv(2, 3, 70, 64, device, generator)
    dO = random_dO(q, generator)
    views = [off_16_bytes(t).requires_grad_() for t in (q, k, v)]
    assert all(t.is_contiguous() and t.data_ptr() % 16 for t in views)
    O = mf.flash_attention(*views, version=version)
    assert rel_err(O, reference(q, k, v, False)[0]) < 1e-5
    for grad, ref in zip(torch.autograd.grad(O, views, off_16_bytes(dO)), reference_grads(q, k, v, dO, False)):
        assert rel_err(grad, ref) < 1e-5


@pytest.mark.parametrize("version,d,kernel,largest", [(1, 300, "flash_backward.cu", 268),
                                                       (2, 300, "flash2_backward.cu", 256)])
def test_gradients_need_a_backward_that_fits_in_shared_memory(version, d, kernel, largest):
    """These d fit the forward's shared memory but not the backward's (it holds more tiles): with
    gradients wanted, the forward refuses at once, saying which d fit; without, it runs. Version 2's
    backward, with its own tiles, takes d up to 256 (a multiple of its passes of 64 columns)."""
    q, k, v = qkv(N=4, d=d)
    assert mf.flash_attention(q, k, v, version=version).shape == q.shape
    message = rf"d = {d} needs \d+ bytes of shared memory per block in the backward kernel of version {version} "
    with pytest.raises(ValueError, match=message + rf"\(kernels/{kernel}\).* it takes d up to {largest} "):
        mf.flash_attention(q.requires_grad_(), k, v, version=version)


def backward_inputs():
    q, k, v = qkv()
    O, L = mf.forward(q, k, v)
    return torch.randn_like(q), q, k, v, O, L


def test_backward_rejects_dO_of_another_dtype():
    dO, *rest = backward_inputs()
    with pytest.raises(TypeError, match=r"dO has dtype torch.float64; it must be torch.float32, as q"):
        mf.backward(dO.double(), *rest)


def test_backward_rejects_dO_of_another_shape():
    dO, *rest = backward_inputs()
    with pytest.raises(ValueError, match=r"dO must have shape \(1, 2, 20, 16\), got \(1, 2, 19, 16\)"):
        mf.backward(dO[:, :, 1:], *rest)


def test_backward_rejects_L_of_another_shape():
    dO, q, k, v, O, L = backward_inputs()
    with pytest.raises(ValueError, match=r"L must have shape \(1, 2, 20\)"):
        mf.backward(dO, q, k, v, O, L[..., None])


def test_backward_rejects_dO_on_another_device():
    dO, *rest = backward_inputs()
    with pytest.raises(ValueError, match="dO is on meta, q on cpu"):
        mf.backward(dO.to("meta"), *rest)


def test_backward_checks_q_k_v_like_the_forward():
    dO, q, k, v, O, L = backward_inputs()
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        mf.backward(dO, q, k, v.half(), O, L)


@pytest.mark.parametrize("version", [1, 2])
def test_empty_sizes_give_empty_gradients(version):
    q, k, v = (torch.randn(1, 2, 0, 16, requires_grad=True) for _ in range(3))
    mf.flash_attention(q, k, v, version=version).sum().backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == (1, 2, 0, 16)


def test_out_tensors_are_checked():
    """The kernel writes into out= tensors in place: they must be float32, shaped like q (L: without
    d), contiguous and, but for L, 16-byte aligned."""
    q, k, v = qkv()
    L = q.new_empty(1, 2, 20)
    with pytest.raises(ValueError, match=r"O \(out=\) must be contiguous"):
        mf.forward(q, k, v, out=(torch.empty(1, 2, 16, 20).transpose(2, 3), L))
    with pytest.raises(TypeError, match="L has dtype torch.float64"):
        mf.forward(q, k, v, out=(torch.empty_like(q), L.double()))
    with pytest.raises(ValueError, match=r"dK must have shape \(1, 2, 20, 16\)"):
        O, L = mf.forward(q, k, v)
        mf.backward(torch.randn_like(q), q, k, v, O, L, out=(q.clone(), q[:, :1].clone(), q.clone()))
    with pytest.raises(ValueError, match=r"dQ \(out=\) must start at a 16-byte-aligned address"):
        mf.backward(torch.randn_like(q), q, k, v, O, L, out=(off_16_bytes(q), q.clone(), q.clone()))


def test_version_2_names_the_block_sizes_it_takes():
    """Version 2's forward gives each thread 4 rows by 8 keys and the Bc / 8 threads of a row
    consecutive lanes of one warp: it takes Br a multiple of 4 and Bc = 16, 32 or 64."""
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="version 2 takes Br a multiple of 4 and Bc = 16, 32 or 64; "
                                           "these kernels have Br = 32, Bc = 48"):
        mf.forward(q, k, v, Br=32, Bc=48, version=2)
    assert mf.forward(q, k, v, Br=32, Bc=48, version=1)[0].shape == q.shape  # version 1 takes any

"""Bad input gets a clear error that names the problem; odd-but-valid input gets the right answer.
Every pair of inputs that must agree (dtype, shape, device, the layout of out=) is checked, and
every option in the wrong place is refused rather than read as another."""
import re

import numpy as np
import pytest
import torch

import minimal_flash as mf
from helpers import (DEVICES, MATRIX, TOL, assert_close, assert_gradients, head_dim, plain_attention, random_dO,
                     random_qkv, reference, rel_err)


def qkv(B=1, H=2, N=20, d=16, **kw):
    return [torch.randn(B, H, N, d, **kw) for _ in range(3)]


# --- The two silent wrong answers this file once missed, and their siblings


def test_q_k_v_of_different_half_precisions_are_refused():
    """bf16 q with fp16 k: each dtype alone is one version 3 takes, but the kernel would read k's
    fp16 bits as bf16 (a relative error of ~3.6, silently)."""
    q, k, v = qkv(d=64)
    with pytest.raises(TypeError, match=r"q, k, v must have one dtype, got torch.bfloat16, torch.float16, "
                                        r"torch.bfloat16"):
        mf.flash_attention(q.bfloat16(), k.half(), v.bfloat16())
    for dtypes in ((torch.float16, torch.float16, torch.bfloat16), (torch.float16, torch.bfloat16, torch.bfloat16)):
        names = ", ".join(str(t) for t in dtypes)  # each name at its place
        with pytest.raises(TypeError, match=f"q, k, v must have one dtype, got {names}$"):
            mf.forward(*(t.to(dtype) for t, dtype in zip((q, k, v), dtypes)))


def test_options_are_keyword_only():
    """scaled_dot_product_attention's positional order is (attn_mask, dropout_p); flash_attention's
    options once came positionally as (causal, softmax_scale), so SDPA's None, 0.0 became a causal of
    None and a scale of 0 (an error of 0.78, silently). No positional order is safe: options come by
    name."""
    q, k, v = qkv()
    for call in (lambda: mf.flash_attention(q, k, v, None, 0.0), lambda: mf.flash_attention(q, k, v, True),
                 lambda: mf.forward(q, k, v, True), lambda: mf.manual_attention(q, k, v, True)):
        with pytest.raises(TypeError, match="positional argument"):
            call()
    O, L = mf.forward(q, k, v)
    with pytest.raises(TypeError, match="positional argument"):
        mf.backward(torch.randn_like(q), q, k, v, O, L, True)


def test_sdpa_options_these_kernels_lack_are_refused():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="attn_mask: these kernels take no mask tensor"):
        mf.flash_attention(q, k, v, attn_mask=torch.ones(20, 20, dtype=torch.bool))
    with pytest.raises(TypeError,
                       match="q is torch.float32: .* dropout_p are compiled into the kernels of versions 3 and 4"):
        mf.flash_attention(q, k, v, dropout_p=0.1)  # qkv(): float32
    assert torch.equal(mf.flash_attention(q, k, v, attn_mask=None, dropout_p=0.0), mf.flash_attention(q, k, v))


@pytest.mark.parametrize("causal", [None, "yes", 2, torch.ones(20, 20)])
def test_causal_must_be_true_or_false(causal):
    with pytest.raises(TypeError, match="causal = .*: it must be True or False"):
        mf.flash_attention(*qkv(), causal=causal)


@pytest.mark.parametrize("scale,error,message", [
    ("0.3", TypeError, "it must be a number"), (torch.tensor(0.3), TypeError, "it must be a number"),
    (True, TypeError, "it must be a number"), (float("nan"), ValueError, "it must be finite"),
    (float("inf"), ValueError, "it must be finite"),
    # in float32, inf (out was NaN) and 0
    (1e39, ValueError, "the kernels take it as a float32, where it must be a normal number"),
    (1e-46, ValueError, "the kernels take it as a float32, where it must be a normal number")])
def test_softmax_scale_must_be_a_finite_number(scale, error, message):
    with pytest.raises(error, match=f"softmax_scale = .*: {message}"):
        mf.flash_attention(*qkv(), softmax_scale=scale)


def test_numpy_numbers_are_numbers():
    """softmax_scale a numpy float, as the official package takes it: the same as the Python float."""
    q, k, v = qkv(N=8, d=64)
    assert torch.equal(mf.flash_attention(q, k, v, softmax_scale=np.float32(0.25)),
                       mf.flash_attention(q, k, v, softmax_scale=0.25))


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_version_3_takes_softmax_scale_above_0(scale):
    """Version 3 keeps the running max of unscaled scores, right only for scale > 0 (at 0 a masked
    score's exponent would be -inf * 0 = NaN). The fp32 versions take any finite scale (and test_kernels'
    test_fp32_versions_take_any_finite_scale checks them at it, forward and backward)."""
    q, k, v = qkv(N=8, d=64)
    with pytest.raises(ValueError, match=f"softmax_scale = {scale}: version 3 takes softmax_scale > 0"):
        mf.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), softmax_scale=scale)
    assert rel_err(mf.flash_attention(q, k, v, softmax_scale=scale), reference(q, k, v, False, scale)[0]) < TOL


# --- dtypes, shapes, devices


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32])
def test_rejects_dtypes_no_version_takes(dtype):
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"q has dtype .*; version 2's kernels take float32 only: the kernels "
                                        r"take float32 \(versions 1, 2\), bfloat16 and float16 \(versions 3, 4\)"):
        mf.flash_attention(q.to(dtype), k, v)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("version", [1, 2])
def test_half_precision_needs_version_3(dtype, version):
    q, k, v = (t.to(dtype) for t in qkv())
    with pytest.raises(TypeError, match=rf"q has dtype {dtype}; version {version}'s kernels take float32 only: "
                                        rf"{str(dtype)[6:]} runs version 3"):
        mf.flash_attention(q, k, v, version=version)


def test_version_3_takes_half_precision_only():
    q, k, v = qkv(d=64)
    with pytest.raises(TypeError, match=r"q has dtype torch.float32; version 3's kernels take bfloat16 and "
                                        r"float16 only: float32 runs version 1 or 2"):
        mf.flash_attention(q, k, v, version=3)
    with pytest.raises(TypeError, match=r"k has dtype torch.float32; version 3"):
        mf.flash_attention(q.bfloat16(), k, v)  # q picks version 3, so k must be bfloat16 too


def test_half_precision_versions_refuse_head_dims_above_their_largest():
    """A d between the compiled ones runs padded (test_kernels.py); above the largest, none does."""
    for version, d, compiled in ((3, 264, "32, 64, 96, 128, 192 or 256"), (4, 136, "64 or 128")):
        q = torch.randn(1, 1, 8, d, dtype=torch.float16)
        message = f"head dim d = {d}: version {version} is compiled for d = {compiled} .*; above {d - 8}, none"
        with pytest.raises(ValueError, match=message):
            mf.forward(q, q, q, version=version)
        with pytest.raises(ValueError, match=message):
            mf.backward(q, q, q, q, q, q[..., 0].float(), version=version)
        with pytest.raises(ValueError, match=message):
            mf.flash_attn_func(q, q, q, version=version)


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


@pytest.mark.parametrize("version,heads_k", [(2, 1), (1, 1), (3, 3), (4, 3), (3, 8), (3, 0)])
def test_grouped_heads_only_where_a_version_takes_them(version, heads_k):
    """k, v with fewer heads than q: versions 3 and 4 only, and a number that divides q's (4 here);
    k and v must agree with each other and with q in B, N and d."""
    dtype = torch.float32 if version < 3 else torch.bfloat16
    q = torch.randn(1, 4, 8, 64, dtype=dtype)
    k, v = (torch.randn(1, heads_k, 8, 64, dtype=dtype) for _ in range(2))
    with pytest.raises(ValueError, match=r"same shape \(B, H, N, d\).*fewer heads \(H\) than q, a number that divides"):
        mf.flash_attention(q, k, v, version=version)


@pytest.mark.parametrize("version,k_shape", [(2, (1, 8, 2, 64)), (3, (1, 8, 3, 64)), (3, (1, 8, 4, 32)),
                                             (3, (2, 8, 4, 64))])
def test_flash_attn_func_names_shapes_in_its_own_layout(version, k_shape):
    """flash_attn_func's q, k, v are (B, N, H, d): a mismatch is reported as the caller passed them, not
    as the (B, H, N, d) views flash_attention is given."""
    dtype = torch.float32 if version < 3 else torch.bfloat16
    q, k = torch.randn(1, 8, 4, 64, dtype=dtype), torch.randn(k_shape, dtype=dtype)
    message = (r"flash_attn_func takes q \(B, N, H, d\) and k, v \(B, N_k, H_k, d\): k and v of one shape, B and d "
               rf"as q's, .* divides H \(grouped-query attention\); got \(1, 8, 4, 64\), {re.escape(str(k_shape))}")
    with pytest.raises(ValueError, match=message):
        mf.flash_attn_func(q, k, k.clone(), version=version)


@pytest.mark.parametrize("k_shape,v_shape", [((1, 2, 8, 64), (1, 1, 8, 64)), ((1, 2, 9, 64), (1, 2, 9, 64)),
                                             ((2, 2, 8, 64), (2, 2, 8, 64))])
def test_grouped_heads_must_agree_in_the_rest(k_shape, v_shape):
    q = torch.randn(1, 4, 8, 64, dtype=torch.bfloat16)
    k, v = torch.randn(k_shape, dtype=torch.bfloat16), torch.randn(v_shape, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="same shape"):
        mf.flash_attention(q, k, v, version=3)


def test_grouped_heads_through_autograd_and_flash_attn_func(generator, poisoned):
    """Gradients land in k, v of their own shape, through flash_attention and flash-attn's layout."""
    q = torch.randn(1, 4, 40, 64, generator=generator).bfloat16().requires_grad_()
    k, v = (torch.randn(1, 2, 40, 64, generator=generator).bfloat16().requires_grad_() for _ in range(2))
    dO = torch.randn(1, 4, 40, 64, generator=generator).bfloat16()
    (mf.flash_attention(q, k, v, causal=True, version=3) * dO).sum().backward()
    grads = [t.grad for t in (q, k, v)]
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    for t in (q, k, v):
        t.grad = None
    out = mf.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, version=3)
    (out.transpose(1, 2) * dO).sum().backward()
    assert all(torch.equal(a, t.grad) for a, t in zip(grads, (q, k, v)))


@pytest.mark.parametrize("moved", [0, 1, 2], ids=["q", "k", "v"])
def test_rejects_device_mismatch(moved):
    """Any one of q, k, v elsewhere (a v on meta reaching the CPU kernels would crash the process); the
    message names each device at its place, in the forward and in backward()."""
    tensors = qkv()
    tensors[moved] = tensors[moved].to("meta")
    devices = ", ".join(str(t.device) for t in tensors)
    with pytest.raises(ValueError, match=f"q, k, v must be on one device, got {devices}$"):
        mf.flash_attention(*tensors)
    dO, q, k, v, O, L = backward_inputs()
    tensors = [q, k, v]
    tensors[moved] = tensors[moved].to("meta")
    with pytest.raises(ValueError, match=f"q, k, v must be on one device, got {devices}$"):
        mf.backward(dO, *tensors, O, L)


def test_rejects_devices_without_kernels():
    with pytest.raises(ValueError, match="run on CUDA or on the CPU"):
        mf.flash_attention(*qkv(device="meta"))


def test_rejects_head_dim_zero():
    with pytest.raises(ValueError, match="head dim d is 0"):
        mf.flash_attention(*qkv(d=0))


def test_rejects_head_dim_too_large_for_shared_memory():
    with pytest.raises(ValueError, match=r"head dim d = 1000 needs \d+ bytes of shared memory"):
        mf.flash_attention(*qkv(N=4, d=1000))


# --- versions and block sizes


@pytest.mark.parametrize("Br,Bc,message", [
    (0, 32, "Br = 0: version 1 gives each row of Q_i a thread, so 1 <= Br <= 1024"),
    (2048, 32, "Br = 2048: version 1"), (32, 0, "Bc = 0: version 1 holds a row of Bc scores"),
    (32, 1000, "Bc = 1000: version 1")])
def test_version_1_names_the_block_sizes_it_takes(Br, Bc, message):
    with pytest.raises(ValueError, match=message):
        mf.flash_attention(*qkv(), Br=Br, Bc=Bc, version=1)


def test_version_2_blocks_are_whole_warps_of_tiles(generator):
    """A block of version 2 is whole warps of tiles of Br / 4 x Bc / 8 threads: tiles of 510 threads would
    take 8160 (refused by the rule, before anything is built); tiles of 18 run 16 to a block (right), and
    tiles of 50 need 16 to a block, whose shared memory at d = 24 is more than there is (refused naming
    Br, Bc and d; both used to fail at launch with a message that named none of them)."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match="Br = 1020, Bc = 16: a tile of version 2 takes .* 510 threads, and a "
                                         "block whole warps of tiles, here 8160 threads, more than 1024"):
        mf.forward(q, k, v, Br=1020, Bc=16, version=2)
    q, k, v = (torch.randn(1, 2, 50, 64, generator=generator) for _ in range(3))
    assert rel_err(mf.forward(q, k, v, Br=36, Bc=16, version=2)[0], reference(q, k, v, False)[0]) < TOL
    q, k, v = (torch.randn(1, 1, 23, 24, generator=generator) for _ in range(3))
    with pytest.raises(ValueError, match=r"head dim d = 24 needs \d+ bytes .* with Br = 100, Bc = 16"):
        mf.forward(q, k, v, Br=100, Bc=16, version=2)


@pytest.mark.parametrize("Br,Bc", [(32, 48), (30, 32), (32, 8)])
def test_version_2_names_the_block_sizes_it_takes(Br, Bc):
    """Version 2's forward gives each thread 4 rows by 8 keys and the Bc / 8 threads of a row
    consecutive lanes of one warp: it takes Br a multiple of 4 and Bc = 16, 32 or 64. Checked before
    anything is built."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=f"Br = {Br}, Bc = {Bc}: version 2 gives each thread 4 rows by 8 keys"):
        mf.forward(q, k, v, Br=Br, Bc=Bc, version=2)


def test_version_1_takes_block_sizes_version_2_refuses():
    q, k, v = qkv()
    assert rel_err(mf.forward(q, k, v, Br=32, Bc=48, version=1)[0], reference(q, k, v, False)[0]) < TOL


def test_block_sizes_are_refused_where_they_do_not_apply():
    """Version 3's tiles are its own: a Br or Bc given with it is a mistake, not an option to ignore.
    The environment's MINIMAL_FLASH_BR / _BC, a default for the versions they shape, leave it alone."""
    q = torch.randn(1, 1, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"Br = 64, Bc = None: version 3 .* has tiles of its own; block sizes "
                                         r"apply to versions 1 and 2"):
        mf.flash_attention(q, q, q, Br=64)
    assert mf.block_sizes(3) == (None, None)


def test_block_sizes_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("MINIMAL_FLASH_BR", "16")
    monkeypatch.setenv("MINIMAL_FLASH_BC", "64")
    assert mf.block_sizes(1) == (16, 64) and mf.block_sizes(2, Bc=16) == (16, 16)
    monkeypatch.setenv("MINIMAL_FLASH_BC", "48")
    with pytest.raises(ValueError, match="Br = 16, Bc = 48: version 2"):
        mf.block_sizes(2)
    monkeypatch.setenv("MINIMAL_FLASH_BC", "many")
    with pytest.raises(TypeError, match=r"Bc = 'many' \(from MINIMAL_FLASH_BC\): a block size is a whole number"):
        mf.block_sizes(1)


@pytest.mark.parametrize("version", [0, 5, "2", True])
def test_rejects_unknown_versions(version):
    with pytest.raises(ValueError, match="version = .*: 1 .* or 2 .* or 3 .* or 4"):
        mf.flash_attention(*qkv(), version=version)


# --- empty, non-contiguous and misaligned inputs


@pytest.mark.parametrize("shape", [(1, 2, 0, 16), (0, 2, 5, 16), (2, 0, 5, 16)])
def test_empty_sizes_give_empty_results(shape):
    q, k, v = [torch.randn(shape) for _ in range(3)]
    O, L = mf.forward(q, k, v)
    assert O.shape == shape and L.shape == shape[:3]


def test_queries_of_no_head_give_keys_no_gradient(poisoned):
    """q of 0 heads beside k, v of 2 (a group of 0 each): no query sees a key, so dK = dV = 0 (allocated
    as NaN here, conftest's poisoned: they must be zeroed)."""
    q = torch.randn(1, 0, 8, 64, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 2, 8, 64, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mf.flash_attention(q, k, v).sum().backward()
    assert q.grad.shape == q.shape and not k.grad.any() and not v.grad.any()


@MATRIX
def test_empty_sizes_give_empty_gradients(version, dtype):
    q, k, v = (torch.randn(1, 2, 0, head_dim(version, 16), dtype=dtype, requires_grad=True) for _ in range(3))
    mf.flash_attention(q, k, v, version=version).sum().backward()
    assert q.grad.shape == k.grad.shape == v.grad.shape == q.shape


def test_non_contiguous_input_is_copied(generator):
    q, k, v = random_qkv(1, 20, 3, 16, "cpu", generator)  # (B, N, H, d), as many models hold it
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # a (B, H, N, d) view, not contiguous
    assert not q.is_contiguous()
    assert rel_err(mf.flash_attention(q, k, v), reference(q, k, v, False)[0]) < TOL


def test_a_signature_checked_before_skips_the_input_checks_and_nothing_else(generator, monkeypatch):
    """q, k, v whose types, shapes, strides, dtypes and devices, with the version asked for, have passed
    the input checks before skip them (host time: a model calls with one signature step after step).
    Whatever differs in any of those is checked again; the other options on every call."""
    q, k, v = random_qkv(1, 2, 20, 16, "cpu", generator)
    expected, checks, check = reference(q, k, v, False)[0], [], mf._check_inputs
    monkeypatch.setattr(mf, "_check_inputs", lambda *args: checks.append(args) or check(*args))
    monkeypatch.setattr(mf, "_checked", {})
    for _ in range(3):
        assert rel_err(mf.flash_attention(q, k, v, version=2), expected) < TOL
    assert len(checks) == 1
    with pytest.raises(TypeError, match="k has dtype torch.float64"):
        mf.flash_attention(q, k.double(), v, version=2)
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        mf.flash_attention(q, k, v.to("meta"), version=2)
    with pytest.raises(ValueError, match="q, k, v must have the same shape"):
        mf.flash_attention(q, k[:, :, :10], v[:, :, :10], version=2)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        mf.flash_attention(q, k, v.numpy(), version=2)
    assert rel_err(mf.flash_attention(q, k, v, version=1), expected) < TOL
    with pytest.raises(ValueError, match="version = True"):  # True == 1 and hashes as 1: not version 1
        mf.flash_attention(q, k, v, version=True)
    with pytest.raises(TypeError, match="causal = 1.0"):  # 1.0 == True: options are checked on every call
        mf.flash_attention(q, k, v, causal=1.0, version=2)
    with pytest.raises(ValueError, match="softmax_scale = nan"):
        mf.flash_attention(q, k, v, softmax_scale=float("nan"), version=2)
    v_columns = v.transpose(2, 3).contiguous().transpose(2, 3)  # v's values in another layout: a copy read
    assert rel_err(mf.flash_attention(q, k, v_columns, version=2), expected) < TOL
    assert rel_err(mf.flash_attention(q, k, torch.nn.Parameter(v), version=2), expected) < TOL  # another type
    assert len(checks) == 8 and rel_err(mf.flash_attention(q, k, v_columns, version=2), expected) < TOL
    assert len(checks) == 9  # a layout the kernels cannot read is copied on every call, so checked too


def off_16_bytes(t):
    """t's values in a contiguous tensor that starts one element into its storage, as a slice of a
    flat buffer can: not at a 16-byte-aligned address."""
    view = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)[1:].view(t.shape)
    return view.copy_(t)


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
def test_input_off_a_16_byte_boundary_is_copied(device, version, dtype, generator):
    """The kernels move rows 16 bytes at a time (float4 loads, cp.async, vector atomics): on a GPU a
    misaligned one is a fault. Such inputs are copied first; the gradients reach the caller's views."""
    q, k, v = random_qkv(2, 3, 70, 64, device, generator, dtype)
    dO = random_dO(q, generator)
    views = [off_16_bytes(t).requires_grad_() for t in (q, k, v)]
    assert all(t.is_contiguous() and t.data_ptr() % 16 for t in views)
    O = mf.flash_attention(*views, version=version)
    assert_close("O", O, reference(q, k, v, False)[0], plain_attention(q, k, v, False))
    assert_gradients(torch.autograd.grad(O, views, off_16_bytes(dO)), q, k, v, dO, False)


@pytest.mark.parametrize("version,d,kernel,largest", [(1, 300, "flash_backward.cu", 268),
                                                       (2, 300, "flash2_backward.cu", 256)])
def test_gradients_need_a_backward_that_fits_in_shared_memory(version, d, kernel, largest):
    """These d fit the forward's shared memory but not the backward's (it holds more tiles): with
    gradients wanted, the forward refuses at once, saying which d fit; without, it runs. Version 2's
    backward, with its own tiles, takes d up to 256 (a multiple of its passes of 64 columns)."""
    q, k, v = qkv(N=4, d=d)
    assert mf.flash_attention(q, k, v, version=version).shape == q.shape
    message = rf"d = {d} needs \d+ bytes of shared memory per block in the backward kernel of version {version} "
    with pytest.raises(ValueError, match=message + rf"\(kernels/{kernel}\).* it takes d up to {largest}"):
        mf.flash_attention(q.requires_grad_(), k, v, version=version)


# --- backward()'s other inputs and out=


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


def test_backward_rejects_L_of_another_shape_or_dtype():
    dO, q, k, v, O, L = backward_inputs()
    with pytest.raises(ValueError, match=r"L must have shape \(1, 2, 20\)"):
        mf.backward(dO, q, k, v, O, L[..., None])
    with pytest.raises(TypeError, match=r"L has dtype torch.float64; it must be torch.float32"):
        mf.backward(dO, q, k, v, O, L.double())


def test_backward_rejects_dO_on_another_device():
    dO, *rest = backward_inputs()
    with pytest.raises(ValueError, match="dO is on meta, q on cpu"):
        mf.backward(dO.to("meta"), *rest)


def test_backward_rejects_O_of_another_dtype_shape_or_device():
    """O goes into D = rowsum(dO * O): of another dtype its bits would be read as q's (NaN, or
    gradients off by 1e19), silently."""
    dO, q, k, v, O, L = backward_inputs()
    with pytest.raises(TypeError, match=r"O has dtype torch.float64; it must be torch.float32, as q"):
        mf.backward(dO, q, k, v, O.double(), L)
    with pytest.raises(ValueError, match=r"O must have shape \(1, 2, 20, 16\), got \(1, 2, 19, 16\)"):
        mf.backward(dO, q, k, v, O[:, :, 1:], L)
    with pytest.raises(ValueError, match="O is on meta, q on cpu"):
        mf.backward(dO, q, k, v, O.to("meta"), L)
    with pytest.raises(ValueError, match="L is on meta, q on cpu"):
        mf.backward(dO, q, k, v, O, L.to("meta"))


def test_backward_checks_q_k_v_like_the_forward():
    dO, q, k, v, O, L = backward_inputs()
    with pytest.raises(TypeError, match="v has dtype torch.float16"):
        mf.backward(dO, q, k, v.half(), O, L)


def test_out_tensors_are_checked():
    """The kernel writes into out= tensors in place: they must be float32, shaped like q (L: without
    d), contiguous and, but for L, 16-byte aligned."""
    q, k, v = qkv()
    L = q.new_empty(1, 2, 20)
    with pytest.raises(ValueError, match=r"O \(out=\) must be contiguous"):
        mf.forward(q, k, v, out=(torch.empty(1, 2, 16, 20).transpose(2, 3), L))
    with pytest.raises(TypeError, match="L has dtype torch.float64"):
        mf.forward(q, k, v, out=(torch.empty_like(q), L.double()))
    with pytest.raises(TypeError, match=r"out= must be a tuple \(O, L\)"):
        mf.forward(q, k, v, out=torch.empty_like(q))
    O, L = mf.forward(q, k, v)
    with pytest.raises(ValueError, match=r"dK must have shape \(1, 2, 20, 16\)"):
        mf.backward(torch.randn_like(q), q, k, v, O, L, out=(q.clone(), q[:, :1].clone(), q.clone()))
    with pytest.raises(ValueError, match=r"dQ \(out=\) must start at a 16-byte-aligned address"):
        mf.backward(torch.randn_like(q), q, k, v, O, L, out=(off_16_bytes(q), q.clone(), q.clone()))
    # L, dQ, dK, dV not contiguous: written as contiguous rows under a view, they would come back permuted
    with pytest.raises(ValueError, match=r"L \(out=\) must be contiguous"):
        mf.forward(q, k, v, out=(torch.empty_like(q), torch.empty(1, 20, 2).transpose(1, 2)))
    for n, name in enumerate(("dQ", "dK", "dV")):
        out = [torch.empty_like(q) for _ in range(3)]
        out[n] = torch.empty(1, 2, 16, 20).transpose(2, 3)
        with pytest.raises(ValueError, match=fr"{name} \(out=\) must be contiguous"):
            mf.backward(torch.randn_like(q), q, k, v, O, L, out=tuple(out))


def test_out_tensors_must_not_share_memory_with_inputs_or_each_other():
    """An out= tensor that is an input (or part of one, or another out=) would be written while the
    kernel still reads it: refused, where it would otherwise be a wrong answer."""
    q, k, v = qkv()
    L = q.new_empty(1, 2, 20)
    with pytest.raises(ValueError, match=r"O \(out=\) shares memory with an input"):
        mf.forward(q, k, v, out=(v, L))
    O, L = mf.forward(q, k, v)
    dO, grads = torch.randn_like(q), [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(ValueError, match=r"dQ \(out=\) shares memory with dV \(out=\)"):
        mf.backward(dO, q, k, v, O, L, out=(grads[0], grads[1], grads[0]))
    with pytest.raises(ValueError, match=r"dK \(out=\) shares memory with an input"):
        mf.backward(dO, q, k, v, O, L, out=(grads[0], dO, grads[2]))
    # part of one: O over the second half of v and what follows it in one buffer; L over O's last floats
    buffer = torch.empty(2 * q.numel())
    v_in, O_over = buffer[:q.numel()].view(q.shape), buffer[q.numel() // 2:][:q.numel()].view(q.shape)
    v_in.copy_(v)
    with pytest.raises(ValueError, match=r"O \(out=\) shares memory with an input"):
        mf.forward(q, k, v_in, out=(O_over, L))
    O_and_L = torch.empty(q.numel() + L.numel())
    O_over, L_over = O_and_L[:q.numel()].view(q.shape), O_and_L[q.numel() - 8:][:L.numel()].view(L.shape)
    with pytest.raises(ValueError, match=r"O \(out=\) shares memory with L \(out=\)"):
        mf.forward(q, k, v, out=(O_over, L_over))
    both = torch.empty(2, *q.shape[1:])  # two (1, H, N, d) halves of one buffer: apart, so fine
    assert rel_err(mf.forward(q, k, v, out=(both[:1], L.clone()))[0], reference(q, k, v, False)[0]) < TOL


# --- the official package's entry points: its positional order, its options


def test_flash_attn_func_keeps_the_official_positional_order(generator):
    """flash_attn_func(q, k, v, dropout_p, softmax_scale, causal): snippets written for the flash-attn
    package run unchanged."""
    q, k, v = random_qkv(2, 37, 3, 16, "cpu", generator)  # (B, N, H, d)
    out = mf.flash_attn_func(q, k, v, 0.0, 0.2, True)
    views = [t.transpose(1, 2) for t in (q, k, v)]
    assert torch.equal(out.transpose(1, 2), mf.flash_attention(*views, causal=True, softmax_scale=0.2))


@pytest.mark.parametrize("option,value", [("window_size", (128, 0)), ("softcap", 30.0),
                                          ("alibi_slopes", torch.ones(3))])
def test_flash_attn_func_options_need_half_precision(option, value):
    """window_size, softcap, alibi_slopes are mods compiled into versions 3 and 4 (tests/test_mods.py): float32
    inputs are refused by name."""
    q = torch.randn(1, 8, 3, 16)
    with pytest.raises(TypeError, match="q is torch.float32: score_mod, mask_mod, window_size, softcap, alibi_slopes "
                                        "and dropout_p"):
        mf.flash_attn_func(q, q, q, **{option: value})
    assert mf.flash_attn_func(q, q, q, window_size=[-1, -1], softcap=0.0).shape == q.shape  # the defaults


@pytest.mark.parametrize("dropout_p,error,message", [
    (1.0, ValueError, "dropout_p = 1.0: it must be in \\[0, 1\\)"),
    (-0.1, ValueError, "dropout_p = -0.1: it must be in"), (None, TypeError, "dropout_p = None: it must be a number"),
    ("0", TypeError, "dropout_p = '0': it must be a number")])
def test_bad_dropout_is_refused_clearly(dropout_p, error, message):
    """Positionally too: flash_attn_func(q, k, v, None, 0.0), SDPA's order, fails on its None."""
    q = torch.randn(1, 4, 1, 8, dtype=torch.bfloat16)
    with pytest.raises(error, match=message):
        mf.flash_attn_func(q, q, q, dropout_p)


def test_deterministic_needs_a_deterministic_backward(generator):
    """deterministic=True (the official option): version 1's backward has no atomics, so its dQ is the
    same bit for bit run to run; versions 2 and 3 add into dQ with atomics, and refuse it."""
    q = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match="deterministic=True: version 2's backward adds into dQ with atomics"):
        mf.flash_attn_func(q, q, q, deterministic=True)
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 40, 2, 16, "cpu", generator))
    grads = [torch.autograd.grad(mf.flash_attn_func(q, k, v, causal=True, deterministic=True, version=1).sum(),
                                 (q, k, v)) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    with pytest.raises(ValueError, match="version 3's backward adds into dQ with atomics.*version 1 or 4 can"):
        mf.flash_attention(*(torch.randn(1, 2, 8, 64, dtype=torch.bfloat16) for _ in range(3)), deterministic=True,
                           version=3)
    with pytest.raises(TypeError, match="deterministic = 'yes': it must be True or False"):
        mf.flash_attention(q, k, v, deterministic="yes")


def test_qkvpacked_needs_three_on_dim_2():
    with pytest.raises(ValueError, match=r"qkv must be 5-D \(B, N, 3, H, d\)"):
        mf.flash_attn_qkvpacked_func(torch.randn(1, 8, 2, 3, 16))


def test_version_4_needs_a_hopper_gpu(monkeypatch):
    """Version 4's code is for sm_90a, which only compute capability 9.0 runs: another GPU gets a
    clear error naming it (checked before any build); the CPU emulation runs it."""
    assert mf.version_unavailable(4, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert mf.version_unavailable(3, "cuda") is None
    assert mf.version_unavailable(4, "cuda") == ("version 4 needs a GPU of compute capability 9.0 (Hopper, sm_90a); "
                                                 "cuda is NVIDIA A100-SXM4-80GB (8.0)")
    assert mf.default_version(torch.bfloat16, "cuda") == 3  # there, half precision runs version 3
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert mf.version_unavailable(4, "cuda") is None and mf.default_version(torch.bfloat16, "cuda") == 4
    # up to version 4's largest head dim (128, a smaller d padded up); above, version 3's 192 and 256
    assert [mf.default_version(torch.bfloat16, "cuda", d) for d in (32, 128, 136, 256)] == [4, 4, 3, 3]

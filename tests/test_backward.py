"""The backward kernels (kernels/flash_backward.cu, version 1; kernels/flash2_backward.cu, version 2)
and autograd through flash_attention, against float64 autograd of plain attention, always with a
random dO."""
import pytest
import torch

import minimal_flash as mf
from helpers import (CAUSAL, DEVICES, OTHER_BLOCK_SIZES, OTHER_N, SHAPES, TOL, VERSIONS, cancelled_scale, random_dO,
                     random_qkv, reference_grads, rel_err)


def check_backward(device, shape, causal, generator, scale=None, version=1, **block_sizes):
    q, k, v = random_qkv(*shape, device, generator)
    dO = random_dO(q, generator)
    O, L = mf.forward(q, k, v, causal, scale, **block_sizes, version=version)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))  # unwritten elements show
    mf.backward(dO, q, k, v, O, L, causal, scale, out=grads, **block_sizes, version=version)
    assert all(torch.isfinite(g).all() for g in grads), "a gradient element was not written"
    refs = reference_grads(q, k, v, dO, causal, scale)
    if shape[2] == 1:
        dQ, dK, dV = grads
        size_dQ, size_dK = cancelled_scale(q, k, v, dO, mf._scale(q, scale))
        assert (dQ.double() - refs[0]).norm() / size_dQ.norm() < TOL
        assert (dK.double() - refs[1]).norm() / size_dK.norm() < TOL
        assert rel_err(dV, refs[2]) < TOL
    else:
        for name, grad, ref in zip(("dQ", "dK", "dV"), grads, refs):
            assert rel_err(grad, ref) < TOL, name


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_backward_matches_float64(device, shape, causal, version, generator):
    check_backward(device, shape, causal, generator, version=version)


# Br != Bc: the Q tiles and K tiles then have different strides and a causal row can see no key of
# a tile; with Br < Bc a block has fewer threads than a K tile has rows.
@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
@CAUSAL
@OTHER_N
@OTHER_BLOCK_SIZES
def test_other_block_sizes(device, Br, Bc, N, causal, version, generator):
    check_backward(device, (2, 2, N, 32), causal, generator, Br=Br, Bc=Bc, version=version)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [63, 64, 65, 300])
def test_version_2_across_key_tiles(device, N, generator):
    """Version 2's backward gives each block 64 keys and adds every block's share of dQ into it: N
    just below, at and past one block's keys, and several blocks, causal."""
    check_backward(device, (1, 2, N, 16), True, generator, version=2)


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
def test_softmax_scale(device, version, generator):
    check_backward(device, (1, 2, 45, 32), True, generator, scale=0.3, version=version)


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
def test_slices_do_not_bleed(device, version, generator):
    """Each (batch, head) slice's gradients come from its own rows only."""
    q, k, v = random_qkv(2, 2, 45, 16, device, generator)
    dO = random_dO(q, generator)
    O, L = mf.forward(q, k, v)
    alone = mf.backward(dO[:1, :1], q[:1, :1], k[:1, :1], v[:1, :1], O[:1, :1], L[:1, :1], version=version)
    k[0, 1] *= 1e4
    dO[1, 0] += 1e4
    O, L = mf.forward(q, k, v)
    together = mf.backward(dO, q, k, v, O, L, version=version)
    for name, a, t in zip(("dQ", "dK", "dV"), alone, together):
        if version == 2 and name == "dQ":
            # Version 2 adds into dQ with atomics, in an order that changes from run to run: equal
            # up to rounding. A bleed of the 1e4-sized neighbours would be far larger.
            assert rel_err(t[0, 0], a[0, 0].double()) < 1e-6, name
        else:
            assert torch.equal(t[0, 0], a[0, 0]), name


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
@CAUSAL
def test_loss_backward_reaches_q_k_v(device, causal, version, generator):
    """A loss built on flash_attention: .backward() fills q.grad, k.grad, v.grad, through the
    kernels, with what float64 autograd of plain attention gives."""
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 3, 50, 32, device, generator))
    weights = random_dO(q, generator)
    loss = (mf.flash_attention(q, k, v, causal, version=version) * weights).sum() + 1.0
    loss.backward()
    refs = reference_grads(q.detach(), k.detach(), v.detach(), weights, causal)
    for name, grad, ref in zip(("q", "k", "v"), (q.grad, k.grad, v.grad), refs):
        assert grad is not None and rel_err(grad, ref) < TOL, name


def test_non_contiguous_inputs_get_gradients(generator):
    """(B, N, H, d) tensors viewed as (B, H, N, d): the gradients reach the original tensors."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 20, 3, 16, "cpu", generator))
    views = [t.transpose(1, 2) for t in (q, k, v)]
    weights = random_dO(views[0], generator)
    (mf.flash_attention(*views) * weights).sum().backward()
    refs = reference_grads(*(t.detach() for t in views), weights, False)
    for grad, ref in zip((q.grad, k.grad, v.grad), refs):
        assert rel_err(grad.transpose(1, 2), ref) < TOL


def test_only_what_the_backward_needs_is_saved():
    """The autograd graph keeps q, k, v, O and L: O(N d) memory, never the N x N matrix P."""
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    O = mf.flash_attention(q, k, v)
    saved = O.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(1, 2, 40, 8)] * 4 + [(1, 2, 40)]

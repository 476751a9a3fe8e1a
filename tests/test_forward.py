"""The forward kernels (kernels/flash.cu, version 1; kernels/flash2.cu, version 2) against float64
plain attention, on the CPU emulation and, where there is one, on the GPU."""
import pytest
import torch

import minimal_flash as mf
from helpers import (CAUSAL, DEVICES, OTHER_BLOCK_SIZES, OTHER_N, SHAPES, TOL, VERSIONS, poisoned_outputs,
                     random_qkv, reference, rel_err)


def check_forward(device, shape, causal, generator, scale=None, **options):
    q, k, v = random_qkv(*shape, device, generator)
    O, L = poisoned_outputs(q)
    mf.forward(q, k, v, causal, scale, out=(O, L), **options)
    O_ref, L_ref = reference(q, k, v, causal, scale)
    assert torch.isfinite(O).all() and torch.isfinite(L).all(), "an output element was not written"
    assert rel_err(O, O_ref) < TOL
    assert rel_err(L, L_ref) < TOL


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
@CAUSAL
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_float64(device, shape, causal, version, generator):
    check_forward(device, shape, causal, generator, version=version)


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
@CAUSAL
@OTHER_N
@OTHER_BLOCK_SIZES
def test_other_block_sizes(device, Br, Bc, N, causal, version, generator):
    check_forward(device, (2, 2, N, 32), causal, generator, Br=Br, Bc=Bc, version=version)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [127, 128, 129, 300])
def test_version_2_across_query_tiles(device, N, generator):
    """Version 2 gives each block G * Br query rows (128 by default): N just below, at and past
    one block's rows, and several blocks, causal (later blocks see more key tiles)."""
    check_forward(device, (1, 2, N, 16), True, generator, version=2)


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
def test_softmax_scale(device, version, generator):
    check_forward(device, (1, 2, 45, 32), True, generator, scale=0.3, version=version)


@pytest.mark.parametrize("device", DEVICES)
@VERSIONS
def test_slices_do_not_bleed(device, version, generator):
    """Each (batch, head) slice is computed from its own rows only: a huge neighbour changes nothing."""
    q, k, v = random_qkv(2, 2, 45, 16, device, generator)
    alone = mf.flash_attention(q[:1, :1], k[:1, :1], v[:1, :1], version=version)
    k[0, 1] *= 1e4
    v[1, 0] += 1e4
    together = mf.flash_attention(q, k, v, version=version)
    assert torch.equal(together[0, 0], alone[0, 0])


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attention_returns_O(device, generator):
    q, k, v = random_qkv(2, 2, 33, 16, device, generator)
    assert rel_err(mf.flash_attention(q, k, v, causal=True), reference(q, k, v, True)[0]) < TOL

"""Errors inside the extension come back as Python exceptions, never crashes or silent results.
These call the extension directly, past minimal_flash's input checks, to reach its own."""
import pytest
import torch

import minimal_flash as mf
from helpers import DEVICES


@pytest.mark.parametrize("device", DEVICES)
def test_internal_layout_check_raises(device):
    q = torch.randn(1, 1, 8, 4, device=device)
    with pytest.raises(RuntimeError, match="L has the wrong layout"):
        mf._raise_if(mf.load_kernels(device).forward(q, q, q, torch.empty_like(q), q, False, 1.0, 1))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [1, 2])
def test_refused_shared_memory_raises(device, version):
    """d = 1000 needs ~520 KB of shared memory; the device (and the emulation) refuse it."""
    q = torch.randn(1, 1, 4, 1000, device=device)
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1])
    with pytest.raises(RuntimeError, match="cannot reserve shared memory"):
        mf._raise_if(mf.load_kernels(device).forward(q, q, q, O, L, False, 1.0, version))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [1, 2])
def test_backward_layout_check_raises(device, version):
    q = torch.randn(1, 1, 8, 4, device=device)
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(RuntimeError, match="L has the wrong layout"):
        mf._raise_if(mf.load_kernels(device).backward(q, q, q, q, q, q, *grads, False, 1.0, version))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version,d", [(1, 300), (2, 1000)])
def test_backward_refused_shared_memory_raises(device, version, d):
    """d = 300 needs ~260 KB of shared memory in version 1's backward, d = 1000 ~550 KB in version
    2's; the device (and the emulation) refuse it."""
    q = torch.randn(1, 1, 4, d, device=device)
    L = q.new_zeros(q.shape[:-1])
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(RuntimeError, match="cannot reserve shared memory"):
        mf._raise_if(mf.load_kernels(device).backward(q, q, q, q, q, L, *grads, False, 1.0, version))


@pytest.mark.parametrize("device", DEVICES)
def test_version_2_grid_limit_raises(device):
    """Version 2's grids have one column of blocks per (batch, head): at most 65535 of them."""
    q = torch.randn(1, 65536, 1, 1, device=device)
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1])
    kernels = mf.load_kernels(device)
    with pytest.raises(RuntimeError, match="B \\* H = 65536 is more than the 65535"):
        mf._raise_if(kernels.forward(q, q, q, O, L, False, 1.0, 2))
    with pytest.raises(RuntimeError, match="B \\* H = 65536 is more than the 65535"):
        mf._raise_if(kernels.backward(q, q, q, O, q, L, q, q, q, False, 1.0, 2))

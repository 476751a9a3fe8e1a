"""Errors inside the extension come back as Python exceptions, never crashes or silent results.
These call a build directly (Kernels.run), past minimal_flash's input checks, to reach its own."""
import pytest
import torch

import minimal_flash as mf
from helpers import DEVICES


def run(device, version, pass_, *tensors, causal=False, scale=1.0):
    mf._raise_if(mf.load_kernels(device, version).run(pass_, causal, scale, *tensors))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [1, 2])
def test_internal_layout_check_raises(device, version):
    q = torch.randn(1, 1, 8, 4, device=device)
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(RuntimeError, match="L has the wrong layout"):
        run(device, version, "forward", q, q, q, torch.empty_like(q), q)
    with pytest.raises(RuntimeError, match="L has the wrong layout"):
        run(device, version, "backward", q, q, q, q, q, q, *grads)
    with pytest.raises(RuntimeError, match="differ in shape, layout, dtype or device"):
        run(device, version, "forward", q, q[..., :2].contiguous(), q, torch.empty_like(q), q[..., 0])
    # an input off a 16-byte boundary (the kernels' vector loads), an output not contiguous
    off = torch.empty(q.numel() + 1, device=device)[1:].view(q.shape)
    off.copy_(q)
    transposed = torch.empty(1, 1, 4, 8, device=device).transpose(2, 3)
    for inputs, O in (((off, q, q), torch.empty_like(q)), ((q, q, q), transposed)):
        with pytest.raises(RuntimeError, match="differ in shape, layout, dtype or device, or one is not 16-byte "
                                               "aligned"):
            run(device, version, "forward", *inputs, O, q.new_empty(q.shape[:-1]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [1, 2])
def test_refused_shared_memory_raises(device, version):
    """d = 1000 needs ~520 KB of shared memory; the device (and the emulation) refuse it."""
    q = torch.randn(1, 1, 4, 1000, device=device)
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1])
    with pytest.raises(RuntimeError, match="cannot reserve shared memory"):
        run(device, version, "forward", q, q, q, O, L)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version,d", [(1, 300), (2, 1000)])
def test_backward_refused_shared_memory_raises(device, version, d):
    """d = 300 needs ~260 KB of shared memory in version 1's backward, d = 1000 ~550 KB in version
    2's; the device (and the emulation) refuse it."""
    q = torch.randn(1, 1, 4, d, device=device)
    L = q.new_zeros(q.shape[:-1])
    grads = [torch.empty_like(q) for _ in range(3)]
    with pytest.raises(RuntimeError, match="cannot reserve shared memory"):
        run(device, version, "backward", q, q, q, q, L, q, *grads)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version,dtype,d", [(2, torch.float32, 1), (3, torch.bfloat16, 64)])
def test_grid_limit_raises(device, version, dtype, d):
    """Versions 2 and 3 give each (batch, head) slice a column of blocks: at most 65535 of them."""
    q = torch.zeros(1, 65536, 1, d, device=device, dtype=dtype)
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="B \\* H = 65536 is more than the 65535"):
        run(device, version, "forward", q, q, q, O, L)
    with pytest.raises(RuntimeError, match="B \\* H = 65536 is more than the 65535"):
        run(device, version, "backward", q, q, q, O, L, q, q, q, q)


@pytest.mark.parametrize("device", DEVICES)
def test_version_3_checks_what_python_checks(device):
    """Version 3's launcher refuses what minimal_flash refuses first (float32, softmax_scale <= 0) in the
    same words, and a head dim it is not compiled for (minimal_flash pads one in between)."""
    q = torch.zeros(1, 1, 8, 48, device=device, dtype=torch.float16)
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1], dtype=torch.float32)
    with pytest.raises(RuntimeError, match="version 3 takes head dim d = 32, 64, 96, 128, 192 or 256, not 48"):
        run(device, 3, "forward", q, q, q, O, L)
    q = torch.zeros(1, 1, 8, 64, device=device)
    O, L = torch.empty_like(q), q.new_empty(q.shape[:-1])
    with pytest.raises(RuntimeError, match="version 3 takes bfloat16 or float16 tensors, not float32"):
        run(device, 3, "forward", q, q, q, O, L)
    q = q.half()
    with pytest.raises(RuntimeError, match="version 3 takes softmax_scale > 0, not 0"):
        run(device, 3, "forward", q, q, q, torch.empty_like(q), L, scale=0.0)

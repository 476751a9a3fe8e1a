"""The kernels as PyTorch custom operators (minimal_flash::forward, minimal_flash::backward), which
flash_attention uses under torch.compile: torch.library.opcheck on both (schema, fake shapes, autograd
registration, dispatch), and a compiled function with no graph break against the eager one and
against float64."""
import pytest
import torch

import minimal_flash as mf
from helpers import CAUSAL, DEVICES, TOL, random_dO, random_qkv, reference, reference_grads, rel_err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version,dtype,d", [(1, torch.float32, 16), (2, torch.float32, 16), (3, torch.bfloat16, 64)],
                         ids=["v1", "v2", "v3-bf16"])
@CAUSAL
def test_opcheck(device, version, dtype, d, causal, generator):
    q, k, v = (t.to(dtype) for t in random_qkv(2, 2, 37, d, device, generator))
    options = (causal, 0.3, 32, 32, version)
    torch.library.opcheck(torch.ops.minimal_flash.forward.default, (q, k, v, *options))
    O, L = torch.ops.minimal_flash.forward(q, k, v, *options)
    torch.library.opcheck(torch.ops.minimal_flash.backward.default, (random_dO(q, generator), q, k, v, O, L, *options))


@pytest.mark.parametrize("device", DEVICES)
@CAUSAL
def test_compiled_matches_eager_and_float64(device, causal, generator):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 3, 45, 32, device, generator))
    dO = random_dO(q, generator)
    attention = lambda q, k, v: mf.flash_attention(q, k, v, causal, version=2)  # noqa: E731
    compiled = torch.compile(attention, fullgraph=True)  # fullgraph: a graph break is an error
    results = []
    for fn in (attention, compiled):
        O = fn(q, k, v)
        results.append((O, *torch.autograd.grad(O, (q, k, v), dO)))
    eager, traced = results
    for name, x, y, ref in zip(("O", "dQ", "dK", "dV"), traced, eager,
                               (reference(q, k, v, causal)[0], *reference_grads(q, k, v, dO, causal))):
        assert rel_err(x, ref) < TOL, name
        assert rel_err(x, y.double()) < TOL, name  # dQ's atomic additions may add up in another order

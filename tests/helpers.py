"""Shared by the tests: fresh random inputs, the float64 reference, the error measure."""
import torch

import minimal_flash as mf


def rel_err(x, ref):
    """||x - ref|| / ||ref||, in float64; NaN anywhere in x gives NaN, which fails any bound."""
    return ((x.double() - ref).norm() / ref.norm()).item()


def random_qkv(B, H, N, d, device, generator):
    """Fresh standard-normal q, k, v: never zeros or ones, which hide indexing mistakes."""
    return [torch.randn(B, H, N, d, generator=generator).to(device) for _ in range(3)]


def reference(q, k, v, causal, scale=None):
    """O and L = logsumexp of the scores, computed in float64 by plain attention."""
    q, k, v = q.double(), k.double(), v.double()
    N, d = q.shape[-2:]
    S = (q @ k.transpose(-2, -1)) * (d ** -0.5 if scale is None else scale)
    if causal:
        S = S.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), float("-inf"))
    return mf.manual_attention(q, k, v, causal, scale), S.logsumexp(dim=-1)


def poisoned_outputs(q):
    """O and L filled with NaN, so that an element the kernel never writes fails the check."""
    return torch.full_like(q, float("nan")), q.new_full(q.shape[:-1], float("nan"))


def reference_grads(q, k, v, dO, causal, scale=None):
    """dQ, dK, dV of sum(O * dO), O = plain attention, by float64 autograd."""
    q, k, v = (t.double().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(mf.manual_attention(q, k, v, causal, scale), (q, k, v), dO.double())


def random_dO(q, generator):
    """A fresh random output gradient: with dO = ones, a dV that uses the wrong row of dO still
    comes out right."""
    return torch.randn(q.shape, generator=generator, dtype=q.dtype).to(q.device)

"""The tile-by-tile PyTorch mirror of Algorithm 1, and what it reports after every step."""
import pytest
import torch

import minimal_flash as mf
from helpers import CAUSAL, random_dO, random_qkv, reference, reference_grads, rel_err


@CAUSAL
@pytest.mark.parametrize("N,Br,Bc", [(1, 32, 32), (50, 32, 32), (64, 32, 32), (45, 8, 16), (45, 16, 8)])
def test_mirror_matches_float64(N, Br, Bc, causal, generator):
    q, k, v = (t.double() for t in random_qkv(2, 3, N, 16, "cpu", generator))
    O, L = mf.mirror_forward(q, k, v, causal=causal, Br=Br, Bc=Bc)
    O_ref, L_ref = reference(q, k, v, causal)
    assert rel_err(O, O_ref) < 1e-12 and rel_err(L, L_ref) < 1e-12


@CAUSAL
def test_every_step_is_attention_over_the_keys_seen_so_far(causal, generator):
    """After step (j, i), rows of Q_i hold exact attention over keys 0 .. (j+1)*Bc - 1: m is their
    row max, l the sum of exp(S - m), O the softmax-weighted average of their values."""
    Br, Bc = 8, 16
    q, k, v = (t.double() for t in random_qkv(1, 2, 40, 8, "cpu", generator))
    steps = []
    mf.mirror_forward(q, k, v, causal=causal, Br=Br, Bc=Bc, on_step=steps.append)
    Tr, Tc = 5, 3
    skipped = sum(1 for j in range(Tc) for i in range(Tr) if causal and i * Br + Br - 1 < j * Bc)
    assert len(steps) == Tr * Tc - skipped and (skipped > 0) == causal
    for step in steps:
        seen = step.cols.stop
        rows = slice(step.rows.start, step.rows.stop)
        S = (q[..., rows, :] @ k[..., :seen, :].transpose(-2, -1)) * 8 ** -0.5
        if causal:
            S = S.masked_fill(mf._above_diagonal(len(step.rows), seen, step.rows.start, 0, "cpu"),
                              float("-inf"))
        m = S.amax(dim=-1)
        assert torch.allclose(step.m, m)
        assert torch.allclose(step.l, torch.exp(S - m[..., None]).sum(dim=-1))
        assert torch.allclose(step.O_i, torch.softmax(S, dim=-1) @ v[..., :seen, :])


@CAUSAL
@pytest.mark.parametrize("N,Br,Bc", [(1, 32, 32), (50, 32, 32), (64, 32, 32), (45, 8, 16), (45, 16, 8)])
def test_mirror_backward_matches_float64(N, Br, Bc, causal, generator):
    q, k, v = (t.double() for t in random_qkv(2, 3, N, 16, "cpu", generator))
    dO = random_dO(q, generator)
    O, L = reference(q, k, v, causal)
    grads = mf.mirror_backward(dO, q, k, v, O, L, causal=causal, Br=Br, Bc=Bc)
    for grad, ref in zip(grads, reference_grads(q, k, v, dO, causal)):
        assert (grad - ref).norm() <= 1e-12 * max(ref.norm(), 1.0)


@CAUSAL
def test_backward_steps_recompute_the_softmax_and_sum_to_the_gradients(causal, generator):
    """Every P_ij recomputed from L is the forward's softmax, tile (i, j) of it; the running dV_j
    after the last step of column j is that tile's row of dV."""
    Br, Bc = 8, 16
    q, k, v = (t.double() for t in random_qkv(1, 2, 40, 8, "cpu", generator))
    dO = random_dO(q, generator)
    O, L = reference(q, k, v, causal)
    S = (q @ k.transpose(-2, -1)) * 8 ** -0.5
    if causal:
        S = S.masked_fill(mf._above_diagonal(40, 40, 0, 0, "cpu"), float("-inf"))
    P = torch.softmax(S, dim=-1)
    steps = []
    dQ, dK, dV = mf.mirror_backward(dO, q, k, v, O, L, causal=causal, Br=Br, Bc=Bc, on_step=steps.append)
    for step in steps:
        rows, cols = slice(step.rows.start, step.rows.stop), slice(step.cols.start, step.cols.stop)
        assert torch.allclose(step.P_ij, P[..., rows, cols])
    last = {step.j: step for step in steps}
    for j, step in last.items():
        cols = slice(step.cols.start, step.cols.stop)
        assert torch.allclose(step.dV_j, dV[..., cols, :]) and torch.allclose(step.dK_j, dK[..., cols, :])
        assert torch.allclose(step.dV_j, P[..., :, cols].transpose(-2, -1) @ dO)

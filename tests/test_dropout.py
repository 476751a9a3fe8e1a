"""Dropout (chapter 6, kernels/mods.cuh and kernels/philox.cuh): the mask of each (query, key) pair is
a word of Philox4x32-10 for the counter (key, query, slice, 0), bit 3 of key and query cleared (one call,
four pairs: helpers.dropout_kept), and the call's seed, kept when it is >= p 2^32, so the kernels'
results are checked exactly against dense attention with the same mask,
drawn here by a PyTorch Philox (itself checked against the generator's published answers); the
backward draws the same mask again. Reproducible under torch.manual_seed; kept with probability 1 - p."""
import math

import pytest
import torch

import minimal_flash as mf
from helpers import DEVICES, MASK32, assert_close, dropout_kept, philox, random_dO, random_qkv

@pytest.mark.parametrize("counter,key,expected", [  # Random123's known-answer vectors, philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((MASK32,) * 4, (MASK32,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1))])
def test_the_reference_philox_gives_the_published_answers(counter, key, expected):
    words = philox([torch.tensor([c], dtype=torch.int64) for c in counter], key)
    assert tuple(int(w) for w in words) == expected


def keep_mask(B, H, N, p, seed):
    """(B, H, N, N) bool: the pairs the kernels keep (kernels/mods.cuh's kept)."""
    return dropout_kept(torch.arange(B * H), N, N, p, seed).view(B, H, N, N)


def test_a_pair_is_kept_with_probability_one_minus_p():
    """So that O's expectation is attention without dropout (the kept are scaled by 1 / (1 - p))."""
    for p in (0.1, 0.5):
        kept = keep_mask(2, 3, 200, p, 0x123456789ABCDEF).double().mean().item()
        sigma = math.sqrt(p * (1 - p) / (6 * 200 * 200))
        assert abs(kept - (1 - p)) < 4 * sigma, (p, kept)


def dense_dropout(q, k, v, causal, keep, p, dO):
    """O = (Z P / (1 - p)) V, L = logsumexp of the scores, and dQ, dK, dV of sum(O dO), in q's dtype."""
    N = q.shape[2]
    S = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if causal:
        S = S.masked_fill(torch.ones(N, N, dtype=torch.bool, device=q.device).triu(1), -math.inf)
    P = torch.softmax(S, dim=-1)
    O = (P * keep.to(q.device) / (1 - p)) @ v
    return (O.detach(), S.double().logsumexp(dim=-1), *torch.autograd.grad(O, (q, k, v), dO.to(q.dtype)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [n for n, v in mf.VERSIONS.items() if v.mods], ids=lambda n: f"v{n}")
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("shape", [(2, 3, 1, 64), (1, 2, 130, 128), (2, 2, 200, 64)],
                         ids=lambda s: "x".join(map(str, s)))
def test_dropout_matches_dense_attention_with_the_same_mask(shape, causal, version, device, generator):
    run_case(shape, causal, device, generator, version)


def run_case(shape, causal, device, generator, version):
    """Forward and backward with dropout into NaN-poisoned outputs, against dense attention with the
    same mask (tools/sanitize.py runs it too)."""
    B, H, N, d = shape
    q, k, v = random_qkv(B, H, N, d, device, generator, torch.bfloat16)
    dO = random_dO(q, generator)
    p, seed = 0.17, int(torch.randint(0, 2**62, (1,), generator=generator))
    O, L = torch.full_like(q, math.nan), q.new_full(q.shape[:-1], math.nan, dtype=torch.float32)
    mf.forward(q, k, v, causal=causal, out=(O, L), dropout_p=p, dropout_seed=seed, version=version)
    grads = tuple(torch.full_like(t, math.nan) for t in (q, k, v))
    mf.backward(dO, q, k, v, O, L, causal=causal, out=grads, dropout_p=p, dropout_seed=seed, version=version)
    keep = keep_mask(B, H, N, p, seed)
    ref, plain = (dense_dropout(*(t.detach().to(dtype).requires_grad_() for t in (q, k, v)), causal, keep, p, dO)
                  for dtype in (torch.float64, q.dtype))
    assert (L.double() - ref[1]).abs().max() < 1e-5 * (1 + ref[1].abs().max()), "L: the undropped row sums"
    for name, x, r, pl in zip(("O", "dQ", "dK", "dV"), (O, *grads), (ref[0], *ref[2:]), (plain[0], *plain[2:])):
        if N == 1 and name in ("dQ", "dK"):  # one key: dS = P (dP - D) is rounding noise
            assert x.double().abs().max() < 1e-2 * q.double().abs().max(), name
            continue
        assert_close(name, x, r, pl)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", [n for n, v in mf.VERSIONS.items() if v.mods], ids=lambda n: f"v{n}")
def test_dropout_through_autograd_matches_dense_attention(version, device, generator, monkeypatch):
    """flash_attention with dropout and autograd: the backward draws the forward's mask again (the seed
    the call drew, caught on its way to the kernels), O, dQ, dK, dV against dense attention with it."""
    B, H, N, d, p = 2, 2, 130, 64, 0.17
    q, k, v = random_qkv(B, H, N, d, device, generator, torch.bfloat16)
    dO = random_dO(q, generator)
    seeds, check_mods = [], mf._check_mods

    def seen(*args, **kwargs):
        call = check_mods(*args, **kwargs)
        seeds.append(call.seed)
        return call

    monkeypatch.setattr(mf, "_check_mods", seen)
    inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    out = mf.flash_attention(*inputs, causal=True, dropout_p=p, version=version)
    grads = torch.autograd.grad(out, inputs, dO)
    (seed,) = seeds  # one draw, for the forward and the backward
    keep = keep_mask(B, H, N, p, seed)
    ref, plain = (dense_dropout(*(t.detach().to(dtype).requires_grad_() for t in (q, k, v)), True, keep, p, dO)
                  for dtype in (torch.float64, q.dtype))
    for name, x, r, pl in zip(("O", "dQ", "dK", "dV"), (out, *grads), (ref[0], *ref[2:]), (plain[0], *plain[2:])):
        assert_close(name, x, r, pl)


@pytest.mark.parametrize("device", DEVICES)
def test_a_seed_takes_all_64_bits(device, generator):
    """A seed passed by hand may have its top bits set (torch's draws stay below 2**62): all 64 go to
    Philox's key, the mask the dense one of that seed, not of the seed without them."""
    B, H, N, d, p = 1, 2, 70, 64, 0.17
    q, k, v = random_qkv(B, H, N, d, device, generator, torch.bfloat16)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator)) | (3 << 62)
    O = mf.forward(q, k, v, dropout_p=p, dropout_seed=seed, version=3)[0]
    dO = random_dO(q, generator)
    ref, plain = (dense_dropout(*(t.detach().to(dtype).requires_grad_() for t in (q, k, v)), False,
                                keep_mask(B, H, N, p, seed), p, dO) for dtype in (torch.float64, q.dtype))
    assert_close("O", O, ref[0], plain[0])


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_is_reproducible_under_manual_seed_and_differs_without(device, generator):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 70, 64, device, generator, torch.bfloat16))
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        out = mf.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)), dropout_p=0.3)
        runs.append((out.detach(), *torch.autograd.grad(out, (q, k, v), torch.ones_like(out))))
    assert all(torch.equal(a, b) for a, b in zip(runs[0], runs[1])), "the same seed, the same bits"
    assert not torch.equal(runs[0][0], runs[2][0]), "another seed, another mask"


@pytest.mark.parametrize("options,error,match", [
    (dict(dropout_p=0.1), TypeError, "dropout_seed = None: forward\\(\\) and backward\\(\\) with dropout_p > 0"),
    (dict(dropout_p=0.1, dropout_seed=1.5), TypeError, "dropout_seed = 1.5"),
    (dict(dropout_p=0.1, dropout_seed=1, version=2), ValueError, "version = 2: .* dropout_p are compiled into"),
])
def test_forward_needs_the_seed_named(options, error, match):
    q = torch.zeros(1, 2, 8, 64, dtype=torch.bfloat16)
    with pytest.raises(error, match=match):
        mf.forward(q, q, q, **options)


def test_dropout_while_a_cuda_graph_is_captured_is_refused(monkeypatch):
    """A captured graph would replay the one seed drawn at capture, one mask forever: refused, in the eager
    call and in the compiled one's operator (which draws the seed when it runs), not run."""
    q, k, v = random_qkv(1, 2, 20, 64, "cpu", torch.Generator().manual_seed(0), torch.bfloat16)
    monkeypatch.setattr(mf, "_capturing", lambda device: True)
    for fn in (mf.flash_attention, torch.compile(mf.flash_attention, fullgraph=True)):
        with pytest.raises(RuntimeError, match="dropout_p > 0 while a CUDA graph is captured"):
            fn(q, k, v, dropout_p=0.2)

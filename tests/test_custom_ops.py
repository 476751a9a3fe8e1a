"""The kernels as PyTorch custom operators (minimal_flash::attention, minimal_flash::attention_grads), which
flash_attention uses under torch.compile: torch.library.opcheck on both (schema, fake shapes, autograd
registration, dispatch), and a compiled function with no graph break against the eager one and
against float64; the same for chapter 6's mods (attention_mods) and for packed sequences
(varlen_attention: flash_attn_varlen_func, and flash_attn_func of different lengths), against the eager
call only (test_mods and test_varlen check that one against float64)."""
import pytest
import torch

import minimal_flash as mf
from helpers import (CAUSAL, DEVICES, MATRIX, TOL, cu_seqlens, head_dim, random_dO, random_qkv, reference,
                     reference_grads, rel_err)


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
@CAUSAL
def test_opcheck(device, version, dtype, causal, generator):
    q, k, v = random_qkv(2, 2, 37, head_dim(version, 16), device, generator, dtype)
    options = (causal, 0.3, *mf.block_sizes(version), version, mf.VERSIONS[version].deterministic_mode)
    torch.library.opcheck(torch.ops.minimal_flash.attention.default, (q, k, v, *options))
    O, L = torch.ops.minimal_flash.attention(q, k, v, *options)
    torch.library.opcheck(torch.ops.minimal_flash.attention_grads.default,
                          (random_dO(q, generator), q, k, v, O, L, *options))


@pytest.mark.parametrize("device", DEVICES)
@CAUSAL
def test_compiled_matches_eager_and_float64(device, causal, generator):
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 3, 45, 32, device, generator))
    dO = random_dO(q, generator)
    attention = lambda q, k, v: mf.flash_attention(q, k, v, causal=causal, version=2)  # noqa: E731
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


def test_eager_calls_between_compiled_ones_cause_no_recompile(generator):
    """Eager calls skip the input checks of a signature seen before (minimal_flash._checked); a compiled
    call must not read that memo, or each eager call of a new signature would recompile it."""
    q, k, v = random_qkv(1, 2, 45, 32, "cpu", generator)
    compiled = torch.compile(lambda q, k, v: mf.flash_attention(q, k, v, version=2), fullgraph=True)
    expected = compiled(q, k, v)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for N in (13, 29):
            x = random_qkv(1, 3, N, 32, "cpu", generator)[0]
            mf.flash_attention(x, x, x, version=2)  # a new signature, checked and remembered
            assert torch.equal(compiled(q, k, v), expected)


def test_compiled_return_lse(generator):
    """return_lse under torch.compile: the operator's L, as the eager call's, without gradient."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 2, 45, 32, "cpu", generator))
    attention = lambda q, k, v: mf.flash_attention(q, k, v, causal=True, version=2, return_lse=True)  # noqa: E731
    (out, lse), eager = torch.compile(attention, fullgraph=True)(q, k, v), attention(q, k, v)
    assert torch.equal(out, eager[0]) and torch.equal(lse, eager[1]) and not lse.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_grouped_heads_through_the_operators(device, generator):
    """k, v with fewer heads than q (grouped-query attention, version 3): the operators' fake shapes
    (opcheck), and a compiled function's gradients in k's and v's own shapes, equal to the eager ones."""
    q = random_qkv(1, 4, 37, 64, device, generator, torch.bfloat16)[0]
    k, v = random_qkv(1, 2, 37, 64, device, generator, torch.bfloat16)[:2]
    options = (True, 0.125, None, None, 3, False)
    torch.library.opcheck(torch.ops.minimal_flash.attention.default, (q, k, v, *options))
    O, L = torch.ops.minimal_flash.attention(q, k, v, *options)
    torch.library.opcheck(torch.ops.minimal_flash.attention_grads.default,
                          (random_dO(q, generator), q, k, v, O, L, *options))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dO = random_dO(q, generator)
    attention = lambda q, k, v: mf.flash_attention(q, k, v, causal=True, version=3)  # noqa: E731
    eager, traced = ((fn(q, k, v), *torch.autograd.grad(fn(q, k, v), (q, k, v), dO))
                     for fn in (attention, torch.compile(attention, fullgraph=True)))
    for name, x, y in zip(("O", "dQ", "dK", "dV"), traced, eager):
        assert x.shape == y.shape, name
        if name == "dQ":  # versions 3 and 4 add into dQ in whatever order blocks finish
            assert rel_err(x, y.double()) < 1e-2, name
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("device", DEVICES)
def test_mods_through_the_operators(device, generator):
    """Chapter 6's mods under torch.compile (minimal_flash::attention_mods and its gradients): opcheck,
    and a compiled function with a score_mod reading a tensor, a mask_mod, a window, softcap and ALiBi
    the same as the eager one, with no graph break."""
    q, k, v = random_qkv(1, 2, 100, 64, device, generator, torch.bfloat16)
    bias = torch.randn(2, 199, generator=generator).to(device)
    options = dict(score_mod="score + bias(h, q_idx - kv_idx + 99)", mask_mod="(q_idx + kv_idx) % 7 != 0",
                   mod_tensors={"bias": bias}, window_size=(40, 3), softcap=5.0,
                   alibi_slopes=torch.rand(2, generator=generator).to(device))
    mods = mf._check_mods(q, *(options[name] for name in mf._MOD_OPTIONS[:6]))
    arguments = (q, k, v, False, 0.125, mf.default_version(q.dtype, device), *mf._mod_op_arguments(mods))
    torch.library.opcheck(torch.ops.minimal_flash.attention_mods.default, arguments)
    O, L, seed = torch.ops.minimal_flash.attention_mods(*arguments)  # seed: dropout's (none here: 0)
    torch.library.opcheck(torch.ops.minimal_flash.attention_mods_grads.default,
                          (random_dO(q, generator), q, k, v, O, L, *arguments[3:], seed))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    dO = random_dO(q, generator)
    attention = lambda q, k, v: mf.flash_attention(q, k, v, **options)  # noqa: E731
    eager, traced = ((fn(q, k, v), *torch.autograd.grad(fn(q, k, v), (q, k, v), dO))
                     for fn in (attention, torch.compile(attention, fullgraph=True)))
    for name, x, y in zip(("O", "dQ", "dK", "dV"), traced, eager):
        if name == "dQ":  # versions 3 and 4 add into dQ in whatever order blocks finish
            assert rel_err(x, y.double()) < 1e-2, name
        else:
            assert torch.equal(x, y), name


@pytest.mark.parametrize("device", DEVICES)
@CAUSAL
def test_varlen_through_the_operators(device, causal, generator):
    """flash_attn_varlen_func's passes as operators (minimal_flash::varlen_attention, varlen_attention_mods
    and their gradients): opcheck on two packed sequences of different lengths (causal: rows that see no
    key) with grouped heads, the mods' with a window and softcap;
    then flash_attn_func of different lengths, whose offsets the host knows, compiled with no graph break, at
    two shapes: out, lse, dK and dV the bits of the eager call's, dQ (atomics) within rounding of it."""
    q = torch.randn(43, 4, 64, generator=generator).to(device, torch.bfloat16)
    k, v = (torch.randn(22, 2, 64, generator=generator).to(device, torch.bfloat16) for _ in range(2))
    options = (cu_seqlens([3, 40], device), cu_seqlens([17, 5], device), 40, 17, causal, 0.125)
    torch.library.opcheck(torch.ops.minimal_flash.varlen_attention.default, (q, k, v, *options, True))
    O, L = torch.ops.minimal_flash.varlen_attention(q, k, v, *options, True)  # True: cu_seqlens checked in it
    dO = torch.randn(O.shape, generator=generator).to(device, torch.bfloat16)
    torch.library.opcheck(torch.ops.minimal_flash.varlen_attention_grads.default, (dO, q, k, v, O, L, *options))
    # with mods that need no block mask (a window, softcap): minimal_flash::varlen_attention_mods and its gradients
    mods = mf._mod_op_arguments(mf._check_mods(q, None, None, None, (7, 0), 2.0, None, batch_heads=(2, 4)))
    torch.library.opcheck(torch.ops.minimal_flash.varlen_attention_mods.default, (q, k, v, *options, True, *mods))
    O, L, seed = torch.ops.minimal_flash.varlen_attention_mods(q, k, v, *options, True, *mods)
    torch.library.opcheck(torch.ops.minimal_flash.varlen_attention_mods_grads.default,
                          (dO, q, k, v, O, L, *options, *mods, seed))
    attention = lambda q, k, v: mf.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)[:2]  # noqa: E731
    compiled = torch.compile(attention, fullgraph=True)
    for Nq, Nk in ((5, 70), (9, 130)):  # the second recompiles with the lengths as symbols (dynamic shapes)
        q, k, v = (torch.randn(2, n, h, 64, generator=generator).to(device, torch.bfloat16).requires_grad_()
                   for n, h in ((Nq, 4), (Nk, 2), (Nk, 2)))
        dO = torch.randn(2, Nq, 4, 64, generator=generator).to(device, torch.bfloat16)
        eager, traced = ((*fn(q, k, v), *torch.autograd.grad(fn(q, k, v)[0], (q, k, v), dO))
                         for fn in (attention, compiled))
        for name, x, y in zip(("out", "lse", "dQ", "dK", "dV"), traced, eager):
            assert x.shape == y.shape, name
            if name == "dQ":
                assert rel_err(x, y.double()) < 1e-2, name
            else:
                assert torch.equal(x, y), name


@pytest.mark.parametrize("device", DEVICES)
def test_varlen_func_compiles_and_checks_cu_seqlens_when_it_runs(device, generator):
    """flash_attn_varlen_func under torch.compile(fullgraph=True): no graph break, though cu_seqlens'
    values are checked on the host (the operator does it when it runs); two batches of packed sequences
    (the second recompiles, dynamic shapes) give out, lse, dK and dV the bits of the eager call's, dQ
    within rounding; cu_seqlens that decrease, or a sequence longer than max_seqlen, raise the eager
    call's error from the compiled one. Mods that need no block mask (a window, softcap and ALiBi, a
    score_mod) compile with no graph break too, and match eager to the bit; a mask_mod (its block mask
    made on the host from cu_seqlens) compiles with a graph break, its kernels not traced (torch 2.11's
    dynamo traced into their ctypes launch and failed), and matches, gradients too."""
    def attention(q, k, v, cu_q, cu_k, max_q, max_k, **mods):
        return mf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, causal=True, return_attn_probs=True,
                                         **mods)[:2]

    compiled = torch.compile(attention, fullgraph=True)
    for lengths_q, lengths_k in (([3, 40], [17, 5]), ([1, 7, 30], [9, 7, 65])):
        q = torch.randn(sum(lengths_q), 4, 64, generator=generator).to(device, torch.bfloat16).requires_grad_()
        k, v = (torch.randn(sum(lengths_k), 2, 64, generator=generator).to(device, torch.bfloat16).requires_grad_()
                for _ in range(2))
        dO = torch.randn(q.shape, generator=generator).to(device, torch.bfloat16)
        lengths = (cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device), max(lengths_q), max(lengths_k))
        eager, traced = ((*fn(q, k, v, *lengths), *torch.autograd.grad(fn(q, k, v, *lengths)[0], (q, k, v), dO))
                         for fn in (attention, compiled))
        for name, x, y in zip(("out", "lse", "dQ", "dK", "dV"), traced, eager):
            assert x.shape == y.shape, name
            if name == "dQ":  # atomics: in whatever order blocks finish
                assert rel_err(x, y.double()) < 1e-2, name
            else:
                assert torch.equal(x, y), name
    with torch.no_grad():
        bad = torch.tensor([0, 30, 20, 38], dtype=torch.int32, device=device)  # sequence 1 of length -10
        with pytest.raises(ValueError, match=r"cu_seqlens_q decreases, cu_seqlens_q\[1\] = 30 > cu_seqlens_q\[2\]"):
            compiled(q, k, v, bad, lengths[1], *lengths[2:])
        with pytest.raises(ValueError, match="sequence 2 has 65 keys, more than max_seqlen_k = 64"):
            compiled(q, k, v, lengths[0], lengths[1], lengths[2], 64)
        slopes = torch.rand(4, generator=generator).to(device)
        for mods, fullgraph in ((dict(window_size=(5, 0)), True), (dict(softcap=3.0, alibi_slopes=slopes), True),
                                (dict(score_mod="score * 0.5f"), True), (dict(mask_mod="kv_idx % 3 != 1"), False)):
            run = torch.compile(lambda *args: attention(*args, **mods), fullgraph=fullgraph)
            assert all(torch.equal(x, y) for x, y in zip(run(q, k, v, *lengths), attention(q, k, v, *lengths, **mods)))
    # the mask_mod's graph break with gradients (run: the last one compiled): its kernels run eagerly,
    # through autograd's Function
    eager, traced = (torch.autograd.grad(fn(q, k, v, *lengths)[0], (q, k, v), dO)
                     for fn in (lambda *args: attention(*args, mask_mod="kv_idx % 3 != 1"), run))
    for name, x, y in zip(("dQ", "dK", "dV"), traced, eager):
        assert (rel_err(x, y.double()) < 1e-2) if name == "dQ" else torch.equal(x, y), name


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_under_compile_draws_a_seed_per_call(device, generator):
    """dropout_p under torch.compile(fullgraph=True): the operator draws the seed when it runs, from torch's
    generator as the eager call does, so under one torch.manual_seed the compiled call's output and gradients
    are the eager call's (dQ within rounding: atomics), and a second call draws another mask (the seed is
    not baked into the graph when it is traced); on packed sequences too, where with a mask_mod (whose block
    mask breaks the graph) it is refused by name."""
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 2, 70, 64, device, generator, torch.bfloat16))
    dO = random_dO(q, generator)
    attention = lambda q, k, v: mf.flash_attention(q, k, v, causal=True, dropout_p=0.3)  # noqa: E731
    compiled = torch.compile(attention, fullgraph=True)
    runs = {}
    for name, fn in (("eager", attention), ("compiled", compiled)):
        torch.manual_seed(11)
        O = fn(q, k, v)
        runs[name] = (O, *torch.autograd.grad(O, (q, k, v), dO), fn(q, k, v))  # and a second call
    for what, x, y in zip(("O", "dQ", "dK", "dV", "O of a second call"), runs["compiled"], runs["eager"]):
        if what == "dQ":
            assert rel_err(x, y.double()) < 1e-2, what
        else:
            assert torch.equal(x, y), what
    first, second = runs["compiled"][0], runs["compiled"][4]
    assert not torch.equal(first, second)  # another seed, another mask
    cu = cu_seqlens([30, 40], device)
    packed = [t.detach()[0].transpose(0, 1).contiguous().requires_grad_() for t in (q, k, v)]  # (70, 2, 64)
    varlen = lambda q, k, v, **mods: mf.flash_attn_varlen_func(q, k, v, cu, cu, 40, 40, dropout_p=0.3,  # noqa: E731
                                                                **mods)
    runs = []
    for fn in (varlen, torch.compile(varlen, fullgraph=True)):
        torch.manual_seed(12)
        out = fn(*packed)
        runs.append((out, *torch.autograd.grad(out, packed, dO[0].transpose(0, 1))))
    for what, x, y in zip(("out", "dQ", "dK", "dV"), *runs):
        assert torch.equal(x, y) if what != "dQ" else rel_err(x, y.double()) < 1e-2, what
    with torch.no_grad(), pytest.raises((NotImplementedError, torch._dynamo.exc.Unsupported),  # (fullgraph: Dynamo's
                                        match="dropout_p with a mask_mod under torch.compile"):   # wrapping)
        torch.compile(lambda *t: varlen(*t, mask_mod="kv_idx != 3"), fullgraph=True)(*packed)

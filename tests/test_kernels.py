"""Every version's kernels, forward and backward, against float64 plain attention, on the CPU
emulation and, where there is one, on the GPU: one matrix over (version, dtype) from
minimal_flash.VERSIONS, at each version's shapes, causal and not, into NaN-poisoned outputs, with a
random dO. fp32 within 1e-5 (relative); bf16 and fp16 within the official FlashAttention tests' rule
(largest error at most twice plain attention's in the same precision). A test runs the forward once
and feeds its O and L to the backward: the emulation's time goes to cases, not to repeats."""
import contextlib

import pytest
import torch

import minimal_flash as mf
from helpers import (CASE_IDS, CASES, CAUSAL, DEVICES, MATRIX, OTHER_BLOCK_SIZES, OTHER_N, SIZED, assert_close,
                     assert_gradients, half_precision_grads, head_dim, plain_attention, poisoned_outputs, random_dO,
                     random_qkv, reference, reference_grads, rel_err, shapes)


def check_passes(device, shape, causal, version, dtype, generator, scale=None, **block_sizes):
    """forward() into poisoned O, L, checked; then backward() from them into poisoned dQ, dK, dV, checked."""
    q, k, v = random_qkv(*shape, device, generator, dtype)
    O, L = poisoned_outputs(q)
    mf.forward(q, k, v, causal=causal, softmax_scale=scale, out=(O, L), version=version, **block_sizes)
    O_ref, L_ref = reference(q, k, v, causal, scale)  # float64, of the same (rounded) inputs
    plain = plain_attention(q, k, v, causal, scale) if dtype != torch.float32 else None
    assert_close("O", O, O_ref, plain)
    assert_close("L", L, L_ref)  # fp32 always: S and its log-sum-exp are fp32 sums of exact products
    dO = random_dO(q, generator)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))
    mf.backward(dO, q, k, v, O, L, causal=causal, softmax_scale=scale, out=grads, version=version, **block_sizes)
    assert_gradients(grads, q, k, v, dO, causal, scale)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version,dtype,shape", [(n, dt, s) for n, dt in CASES for s in shapes(n)],
                         ids=[f"{case}-{s}" for (n, _), case in zip(CASES, CASE_IDS) for s in shapes(n)])
@CAUSAL
def test_matches_float64(device, shape, causal, version, dtype, generator):
    check_passes(device, shape, causal, version, dtype, generator)


# Head dims between the ones versions 3 and 4 are compiled for: q, k, v (and O, dO) padded with zero
# columns up to the next one (minimal_flash._padded), the outputs cut back; multiples of 8 and one
# that is not (100), into poisoned outputs of the caller's d.
PADDED = [(n, d, dtype) for n, v in mf.VERSIONS.items() if v.head_dims for d, dtype in (
    (8, torch.bfloat16), (40, torch.float16), (72, torch.bfloat16), (96, torch.float16), (100, torch.float16),
    (120, torch.bfloat16), (136, torch.float16), (200, torch.bfloat16))
          if d not in v.head_dims and d <= max(v.head_dims)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version,d,dtype", PADDED, ids=[f"v{n}-d{d}" for n, d, _ in PADDED])
@CAUSAL
def test_head_dims_between_the_compiled_ones(device, version, d, dtype, causal, generator):
    check_passes(device, (2, 2, 70, d), causal, version, dtype, generator)


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
def test_softmax_scale(device, version, dtype, generator):
    check_passes(device, (1, 2, 45, head_dim(version)), True, version, dtype, generator, scale=0.3)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("scale", [-0.5, 0.0])
@CAUSAL
def test_fp32_versions_take_any_finite_scale(version, scale, causal, generator):
    """Versions 1 and 2 keep the running max of scaled scores, so a scale of 0 or below is as right as
    any, forward and backward (version 3 refuses it: test_inputs), over tiles of 16: 45 rows, the last
    tile partial. At 0 every visible key weighs the same, and dQ = scale dS K and dK are exactly 0 (whose
    relative error has no scale: checked as zeros)."""
    if scale != 0:
        return check_passes("cpu", (2, 2, 45, 16), causal, version, torch.float32, generator, scale=scale, Br=16,
                            Bc=16)
    q, k, v = random_qkv(2, 2, 45, 16, "cpu", generator)
    dO = random_dO(q, generator)
    O, L = poisoned_outputs(q)
    mf.forward(q, k, v, causal=causal, softmax_scale=0.0, out=(O, L), version=version, Br=16, Bc=16)
    O_ref, L_ref = reference(q, k, v, causal, 0.0)
    assert_close("O", O, O_ref)
    assert_close("L", L, L_ref)
    grads = tuple(torch.full_like(q, float("nan")) for _ in range(3))
    mf.backward(dO, q, k, v, O, L, causal=causal, softmax_scale=0.0, out=grads, version=version, Br=16, Bc=16)
    assert torch.equal(grads[0], torch.zeros_like(q)) and torch.equal(grads[1], torch.zeros_like(k))
    assert_close("dV", grads[2], reference_grads(q, k, v, dO, causal, 0.0)[2])


# Br != Bc, for the versions they shape: the Q tiles and K tiles then have different strides and a
# causal row can see no key of a tile; with Br < Bc a block has fewer threads than a K tile has rows.
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", SIZED, ids=[f"v{n}" for n in SIZED])
@CAUSAL
@OTHER_N
@OTHER_BLOCK_SIZES
def test_other_block_sizes(device, Br, Bc, N, causal, version, generator):
    check_passes(device, (2, 2, N, 32), causal, version, torch.float32, generator, Br=Br, Bc=Bc)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("N", [63, 64, 65, 127, 128, 129, 300])
def test_version_2_across_its_blocks(device, N, generator):
    """Version 2 gives each forward block G * Br query rows (128 by default) and each backward block
    64 keys, adding every block's share of dQ into it: N just below, at and past one block, and
    several blocks, causal (later blocks see more tiles)."""
    check_passes(device, (1, 2, N, 16), True, 2, torch.float32, generator)


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
def test_slices_do_not_bleed(device, version, dtype, generator):
    """Each (batch, head) slice is computed from its own rows only: huge neighbours change nothing."""
    q, k, v = random_qkv(2, 2, 45, head_dim(version, 16), device, generator, dtype)
    dO = random_dO(q, generator)
    O, L = mf.forward(q[:1, :1], k[:1, :1], v[:1, :1], version=version)
    alone = (O, *mf.backward(dO[:1, :1], q[:1, :1], k[:1, :1], v[:1, :1], O, L, version=version))
    k[0, 1] *= 100
    v[1, 0] += 100
    dO[1, 0] += 100
    O, L = mf.forward(q, k, v, version=version)
    together = (O, *mf.backward(dO, q, k, v, O, L, version=version))
    for name, a, t in zip(("O", "dQ", "dK", "dV"), alone, together):
        if name == "dQ" and not mf.VERSIONS[version].deterministic:
            # Added into with atomics, in an order that changes from run to run: equal up to
            # rounding. A bleed of the 100-sized neighbours would be far larger.
            assert rel_err(t[0, 0], a[0, 0].double()) < (1e-6 if dtype == torch.float32 else 1e-2), name
        else:
            assert torch.equal(t[0, 0], a[0, 0]), name


@pytest.mark.parametrize("device", DEVICES)
@MATRIX
@CAUSAL
def test_loss_backward_reaches_q_k_v(device, causal, version, dtype, generator, poisoned):
    """A loss built on flash_attention: .backward() fills q.grad, k.grad, v.grad, through the
    kernels, with what float64 autograd of plain attention gives (what the library allocates, NaN until
    written: conftest's poisoned)."""
    q, k, v = (t.requires_grad_() for t in random_qkv(2, 3, 50, head_dim(version), device, generator, dtype))
    weights = random_dO(q, generator)
    loss = (mf.flash_attention(q, k, v, causal=causal, version=version) * weights).sum() + 1.0
    loss.backward()
    assert all(t.grad is not None for t in (q, k, v))
    assert_gradients((q.grad, k.grad, v.grad), q.detach(), k.detach(), v.detach(), weights, causal)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_flash_attention_picks_the_default_version(device, dtype, generator):
    """Version 2 for float32 (the fastest fp32 kernels); for bfloat16 and float16, version 4 on a Hopper
    GPU, version 3 elsewhere."""
    hopper = device == "cuda" and torch.cuda.get_device_capability() == (9, 0)
    version = 2 if dtype == torch.float32 else 4 if hopper else 3
    assert mf.default_version(dtype, device) == version
    q, k, v = random_qkv(2, 2, 33, 64, device, generator, dtype)
    O = mf.flash_attention(q, k, v, causal=True)
    assert O.dtype == dtype and torch.equal(O, mf.forward(q, k, v, causal=True, version=version)[0])
    assert_close("O", O, reference(q, k, v, True)[0], plain_attention(q, k, v, True))


def test_non_contiguous_inputs_get_gradients(generator, poisoned):
    """(B, N, H, d) tensors viewed as (B, H, N, d): the gradients reach the original tensors."""
    q, k, v = (t.requires_grad_() for t in random_qkv(1, 20, 3, 16, "cpu", generator))
    views = [t.transpose(1, 2) for t in (q, k, v)]
    weights = random_dO(views[0], generator)
    (mf.flash_attention(*views) * weights).sum().backward()
    assert_gradients(tuple(t.grad.transpose(1, 2) for t in (q, k, v)), *(t.detach() for t in views), weights, False)


def test_only_what_the_backward_needs_is_saved():
    """The autograd graph keeps q, k, v, O and L: O(N d) memory, never the N x N matrix P."""
    q, k, v = (torch.randn(1, 2, 40, 8, requires_grad=True) for _ in range(3))
    O = mf.flash_attention(q, k, v)
    saved = O.grad_fn.saved_tensors
    assert [tuple(t.shape) for t in saved] == [(1, 2, 40, 8)] * 4 + [(1, 2, 40)]


@contextlib.contextmanager
def emulation_workers(version, count):
    """The CPU emulation's launches of this version on `count` OS threads (1: its blocks one after
    another, in order; more than the cores: in an order that varies), then on one per core again."""
    library = mf.load_kernels("cpu", version)._c
    library.mf_cpu_set_workers(count)
    try:
        yield
    finally:
        library.mf_cpu_set_workers(0)


@pytest.mark.parametrize("device", DEVICES)
@CAUSAL
def test_version_4_deterministic_backward(device, causal, generator):
    """deterministic=True: version 4 adds the shares of dQ in one order (by key block), so dQ is the
    same bits run to run, and as right as the default's. 520 rows: 5 key blocks add into each query
    tile. The default order varies with the blocks' timing; on the CPU the test makes it vary: its
    blocks in order on one thread, then four times on 8 threads sharing the cores (there the default's
    dQ differed from the in-order one in most runs, by the order of its additions: a backward that
    ignored deterministic=True failed this test in 9 runs of 10)."""
    q, k, v = random_qkv(1, 2, 520, 64, device, generator, torch.bfloat16)
    dO = random_dO(q, generator)
    O, L = mf.forward(q, k, v, causal=causal, version=4)

    backward = lambda: mf.backward(dO, q, k, v, O, L, causal=causal, version=4, deterministic=True)  # noqa: E731
    if device == "cpu":  # in order on one thread, then four times out of order
        runs = []
        for count in (1, 8, 8, 8, 8):
            with emulation_workers(4, count):
                runs.append(backward())
    else:
        runs = [backward() for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    assert_gradients(runs[0], q, k, v, dO, causal)


@pytest.mark.parametrize("device", DEVICES)
@CAUSAL
def test_version_4_persistent_blocks_take_every_work_tile(device, causal, generator, poisoned):
    """Version 4's forward runs a block per multiprocessor (in the emulation, per worker), each taking
    work tiles of 128 query rows, one after another, until none is left. On a GPU, 4 x 16 x 8 = 512 work
    tiles: several for each block of any Hopper GPU. On the CPU, 2 x 3 x 5 = 30, taken by one block in
    order, then by three racing for them: every row right both ways, and the same bits (a work tile's
    result does not depend on which block took it, or after which)."""
    shape = (4, 16, 1000, 64) if device == "cuda" else (2, 3, 520, 64)
    q, k, v = random_qkv(*shape, device, generator, torch.bfloat16)
    runs = []
    for count in (1, 3) if device == "cpu" else (0,):
        with emulation_workers(4, count) if device == "cpu" else contextlib.nullcontext():
            runs.append(poisoned_outputs(q))
            mf.forward(q, k, v, causal=causal, out=runs[-1], version=4)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    O_ref, L_ref = reference(q, k, v, causal)
    assert_close("O", runs[0][0], O_ref, plain_attention(q, k, v, causal))
    assert_close("L", runs[0][1], L_ref)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@CAUSAL
def test_version_4_three_consumers_at_d_64(device, causal, dtype, generator, poisoned):
    """At d = 64, long sequences and many work tiles, version 4's forward takes three consumer
    warpgroups and work tiles of 192 rows (kernels/version4.cuh's consumers()). N = 4100: 22 tiles
    a slice, the last one of 68 rows, past the end of the sequence; as many slices as the build says
    make it take three (its mf_forward_consumers; on an H200's 132 multiprocessors, 24), at least 2. On
    the CPU (a multiprocessor per worker) three workers race for the tiles of 2 slices. Every row
    right, as the float64 reference's within the half-precision rule."""
    N = 4100
    kernels = mf.load_kernels(device, 4)
    index = torch.cuda.current_device() if device == "cuda" else 0
    with emulation_workers(4, 3) if device == "cpu" else contextlib.nullcontext():
        three = next((s for s in range(1, 4097) if kernels.forward_consumers(s, N, 64, index) == 3), None)
        assert three is not None, f"version 4's forward takes no three consumers at N = {N} for up to 4096 slices"
        assert kernels.forward_consumers(three, N, 128, index) == 2  # d = 128: two always
        slices = max(2, three)
        q, k, v = random_qkv(1, slices, N, 64, device, generator, dtype)
        O, L = poisoned_outputs(q)
        mf.forward(q, k, v, causal=causal, out=(O, L), version=4)
    O_ref, L_ref = reference(q, k, v, causal)
    assert_close("O", O, O_ref, plain_attention(q, k, v, causal))
    assert_close("L", L, L_ref)


GROUPED = [n for n, x in mf.VERSIONS.items() if x.grouped_heads]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("version", GROUPED, ids=[f"v{n}" for n in GROUPED])
@pytest.mark.parametrize("H,Hk,N,d", [(4, 2, 70, 64), (6, 2, 129, 128), (3, 1, 200, 64), (4, 2, 50, 72)])
@CAUSAL
def test_grouped_query_heads(device, H, Hk, N, d, causal, version, generator, poisoned):
    """k, v with Hk heads, each shared by H / Hk query heads (grouped-query attention; Hk = 1:
    multi-query): O as plain attention's on k, v repeated to q's heads, and each head's dK, dV the sum
    of its group's, in bf16 within the 2x rule (plain attention's gradients summed the same way). d = 72:
    padded (to 96 or 128), the group's sums taken at the padded d and cut back."""
    q = random_qkv(2, H, N, d, device, generator, torch.bfloat16)[0]
    k, v = random_qkv(2, Hk, N, d, device, generator, torch.bfloat16)[:2]
    repeat = lambda t: t.repeat_interleave(H // Hk, dim=1)  # noqa: E731
    fold = lambda g: g.unflatten(1, (Hk, H // Hk)).sum(2, dtype=torch.float64)  # noqa: E731
    O, L = poisoned_outputs(q)
    mf.forward(q, k, v, causal=causal, out=(O, L), version=version)
    O_ref, L_ref = reference(q, repeat(k), repeat(v), causal)
    assert_close("O", O, O_ref, plain_attention(q, repeat(k), repeat(v), causal))
    assert_close("L", L, L_ref)
    dO = random_dO(q, generator)
    grads = tuple(torch.full_like(t, float("nan")) for t in (q, k, v))
    mf.backward(dO, q, k, v, O, L, causal=causal, out=grads, version=version)
    refs = reference_grads(q, repeat(k), repeat(v), dO, causal)
    plains = half_precision_grads(q, repeat(k), repeat(v), dO, causal)
    for name, grad, ref, plain, grouped in zip(("dQ", "dK", "dV"), grads, refs, plains, (False, True, True)):
        if grouped:
            ref, plain = fold(ref), fold(plain).to(plain.dtype)
        assert grad.shape == ref.shape, name
        assert_close(name, grad, ref, plain)


def test_the_half_precision_rule():
    """assert_close's rule for bf16 and fp16, the official tests': an error at most twice plain
    attention's plus twice the dtype's rounding at the values' size. Values between 2 and 4, where bf16's
    step is 2^-6: plain attention off by half a step (correct rounding can do no better) leaves room for
    one step more (the case that failed under compute-sanitizer, whose order of additions differs: dQ off
    by 0.0165 where plain attention was off by 0.0078); a gradient 3% too small (a term dropped) fails."""
    ref = 2 + 2 * torch.rand(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    plain = ref.to(torch.bfloat16)
    down = (ref - plain.double()).argmax()  # the element plain rounded down the most: x one step below it
    x = plain.double().index_add(0, down[None], torch.tensor([-2.0**-6], dtype=torch.float64)).to(torch.bfloat16)
    assert (x.double() - ref).abs().max() > 2 * (plain.double() - ref).abs().max()  # beyond twice plain's
    assert_close("dQ", x, ref, plain)
    with pytest.raises(AssertionError):
        assert_close("dQ", (ref * 0.97).to(torch.bfloat16), ref, plain)

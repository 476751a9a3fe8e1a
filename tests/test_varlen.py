"""flash_attn_varlen_func (version 3's kernels on sequences packed without padding) against float64
attention written here, a sequence at a time, on the CPU emulation and, where there is one, on the GPU.
Each case draws fresh q, k, v and a random dO; sequences of one batch differ in length (0, 1, below,
at and past the 64-key and 128-row tiles, Lq != Lk, so that causal rows may see no key); grouped heads
(group 1 and 4), d = 64 and 128, bf16 and fp16, causal or not. Every output the kernels allocate is
NaN until written. out and dQ, dK, dV within the official rule (largest error at most twice plain
attention's in the same dtype), lse within 1e-5, rows that see no key exactly 0 and -inf (and their
gradients 0). Then each sequence against flash_attention on it alone (the padded batch's kernels):
out, lse, dK, dV to the bit, dQ to within its rounding (added into by atomics in another order). Then
what is refused."""
import math
import re

import pytest
import torch

import minimal_flash as mf
from helpers import (DEVICES, EVERY_INDEX_MASK_MOD, TABLE_SCORE_MOD, assert_close, cu_seqlens, dropout_kept,
                     split_options, varlen_reference)


def packed_inputs(lengths_q, lengths_k, H, Hk, d, dtype, device, generator):
    """Fresh standard-normal q (total_q, H, d), k, v (total_k, Hk, d), requiring gradients, and dO."""
    q, dO = (torch.randn(sum(lengths_q), H, d, generator=generator).to(device, dtype) for _ in range(2))
    k, v = (torch.randn(sum(lengths_k), Hk, d, generator=generator).to(device, dtype) for _ in range(2))
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dO


# (lengths_q, lengths_k, nheads, nheads_k, d, causal, dtype): several sequences a batch; lengths 0, 1,
# below, at and past the forward's 64-key tile and 128-row block and the backward's 128-key block;
# Lq != Lk (causal: Lq > Lk leaves rows with no key; Lq < Lk, every key before the diagonal's start
# seen); a sequence with no query (its keys get dK = dV = 0) and one with no key (its rows 0).
CASES = [
    ([1, 17, 0, 130], [1, 17, 5, 130], 2, 2, 64, True, torch.bfloat16),
    ([64, 3, 128], [70, 0, 128], 4, 1, 128, False, torch.float16),
    ([100, 7, 2], [37, 200, 2], 4, 1, 64, True, torch.float16),
    ([129, 1, 64], [1, 129, 63], 2, 2, 128, False, torch.bfloat16),
    ([200, 65], [3, 300], 4, 4, 128, True, torch.bfloat16),
    ([1, 0, 255], [0, 1, 256], 8, 2, 64, False, torch.bfloat16),
    ([70, 0, 130], [130, 3, 65], 2, 1, 256, True, torch.bfloat16),  # d = 256: 64-row and 64-key blocks, split
    ([40, 9], [40, 70], 4, 2, 72, True, torch.float16),  # d = 72: padded to 96, out cut back
]
CASE_IDS = [f"q{'-'.join(map(str, c[0]))}-k{'-'.join(map(str, c[1]))}-h{c[2]}-hk{c[3]}-d{c[4]}-"
            f"{'causal' if c[5] else 'full'}-{str(c[6]).replace('torch.', '')}" for c in CASES]


# On a GPU, besides: sequences of many blocks of rows and keys, a batch of 8 with grouped heads.
GPU_CASES = [
    ([1000, 2049, 0, 777, 1, 300, 4096, 129], [1000, 2049, 64, 1500, 0, 300, 4000, 128], 8, 2, 128, True,
     torch.bfloat16),
    ([3000, 513, 64], [2000, 513, 3100], 4, 1, 64, False, torch.float16),
]
GPU_CASE_IDS = [f"{len(c[0])}-sequences-{sum(c[0])}-rows-{'causal' if c[5] else 'full'}" for c in GPU_CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths_q,lengths_k,H,Hk,d,causal,dtype", CASES, ids=CASE_IDS)
def test_matches_float64(device, lengths_q, lengths_k, H, Hk, d, causal, dtype, generator, poisoned):
    check_against_float64(device, lengths_q, lengths_k, H, Hk, d, causal, dtype, generator)


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "cpu"])
@pytest.mark.parametrize("lengths_q,lengths_k,H,Hk,d,causal,dtype", GPU_CASES, ids=GPU_CASE_IDS)
def test_matches_float64_at_gpu_sizes(device, lengths_q, lengths_k, H, Hk, d, causal, dtype, generator, poisoned):
    check_against_float64(device, lengths_q, lengths_k, H, Hk, d, causal, dtype, generator)


# The official options on packed sequences (chapter 6's mods, compiled into version 3), each per sequence:
# Lq != Lk both ways, so that the window's and ALiBi's distances from each sequence's own bottom right
# matter; windows that leave rows no key; slopes per head and per (sequence, head); all at once.
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625])
OPTIONS = {"window": (dict(window_size=(20, 0)), True), "window-both-sides": (dict(window_size=(3, 30)), False),
           "softcap": (dict(softcap=2.0), True), "alibi": (dict(alibi_slopes=SLOPES), False),
           "alibi-per-sequence": (dict(alibi_slopes=torch.stack([SLOPES, SLOPES.flip(0), 2 * SLOPES])), True),
           "all": (dict(window_size=(40, 8), softcap=3.0, alibi_slopes=SLOPES), False)}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_official_options_per_sequence(device, name, generator, poisoned):
    options, causal = OPTIONS[name]
    check_against_float64(device, [100, 7, 2], [37, 200, 2], 4, 1, 64, causal, torch.float16, generator, **options)


# A window on packed sequences walks only its band of tiles (kernels/mods.cuh's window_tiles), as the
# official kernels do, not every tile up to the diagonal. The first sequence's queries see keys from 298 on
# (150 back from their diagonal, which starts at key 448): its first 256 keys, four tiles of the forward's
# and two blocks of the backward's, are NaN, and one of their tiles walked would make out and the
# gradients NaN (P = 0 times V = NaN). The second's queries 0-259 see no key (Lq > Lk): its first block of
# rows walks no tile, nor do its keys' blocks walk those rows. A window of 151 keys holds whole tiles of
# 64 x 64, which skip the per-score test (FULL): rows 0-63 of the first against keys 384-447, say.
@pytest.mark.parametrize("device", DEVICES)
def test_a_window_reads_only_its_band(device, generator, poisoned):
    check_against_float64(device, [64, 300, 200], [512, 40, 200], 4, 2, 64, True, torch.bfloat16, generator,
                          unread=slice(0, 256), window_size=(150, 0))


# Your own mods on packed sequences: b is the sequence, h q's head, q_idx and kv_idx positions in the
# sequence. A bias per (sequence, head) from a mod tensor, times the distance from the sequence's own
# diagonal (shift = Lk - Lq), and a mask that differs by sequence and empties some rows; Lq != Lk.
@pytest.mark.parametrize("device", DEVICES)
def test_score_mod_and_mask_mod_per_sequence(device, generator, poisoned):
    lengths_q, lengths_k, H = [100, 7, 2], [37, 200, 2], 4
    table = torch.randn(len(lengths_q), H, generator=generator)

    def dense(b, Lq, Lk):  # the same, written out: (bias, keep) of sequence b, (H, Lq, Lk)
        i, j, h = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :], torch.arange(H)[:, None, None]
        return table[b][:, None, None].double() * 0.1 * (i + Lk - Lq - j), (i + 2 * j + b + h) % 5 != 1

    check_against_float64(device, lengths_q, lengths_k, H, 2, 64, True, torch.bfloat16, generator, dense_mods=dense,
                          score_mod=TABLE_SCORE_MOD, mask_mod=EVERY_INDEX_MASK_MOD, mod_tensors={"table": table})


# A mask_mod on packed sequences skips the tiles it empties where one block mask serves them all
# (minimal_flash._packed_block_mask): here a band of 51 keys written as a mask_mod, which reads shift, on
# sequences of one shift (300 keys more than queries, as after a cached prefix). The first sequence's
# queries see keys from 250 on: its first 128 keys, two tiles of the forward's and one block of the
# backward's, are NaN, and one of their tiles walked would make out and the gradients NaN. Where the
# shifts differ (300 and 250), no one mask serves: none is built, every tile is asked, the answers right.
BAND = "kv_idx <= q_idx + shift && kv_idx >= q_idx + shift - 50"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths_k,unread,built", [([364, 500], slice(0, 128), [(500, 300)]),
                                                    ([364, 450], None, [])], ids=["one-shift", "two-shifts"])
def test_a_mask_mod_skips_its_empty_tiles(device, lengths_k, unread, built, generator, poisoned, monkeypatch):
    asked = []
    block_mask = mf.Kernels.block_mask
    monkeypatch.setattr(mf, "_block_masks", {})  # (none cached from another test)
    monkeypatch.setattr(mf.Kernels, "block_mask", lambda self, a, N, shift, *rest: asked.append((N, shift))
                        or block_mask(self, a, N, shift, *rest))

    check_band(device, lengths_k, unread, generator)
    assert asked == built


def check_band(device, lengths_k, unread, generator):
    def dense(b, Lq, Lk):  # BAND written out: (bias, keep) of sequence b, (Lq, Lk)
        i, j = torch.arange(Lq)[:, None], torch.arange(Lk)[None, :]
        return 0.0, (j <= i + Lk - Lq) & (j >= i + Lk - Lq - 50)

    check_against_float64(device, [64, 200], lengths_k, 4, 2, 64, False, torch.bfloat16, generator, unread=unread,
                          dense_mods=dense, mask_mod=BAND)


def check_against_float64(device, lengths_q, lengths_k, H, Hk, d, causal, dtype, generator, unread=None,
                          dense_mods=None, **options):
    """flash_attn_varlen_func's out, lse (return_attn_probs) and, through autograd, dQ, dK, dV of a
    random dO, against float64 a sequence at a time; options: the official window_size, softcap,
    alibi_slopes (on the CPU: the reference's), and score_mod, mask_mod, mod_tensors, which dense_mods
    writes out for the reference (helpers.varlen_reference's mods). unread: rows of k and v that no query
    sees, NaN for the kernels (0 for the references, whose dense product would spread the NaN)."""
    q, k, v, dO = packed_inputs(lengths_q, lengths_k, H, Hk, d, dtype, device, generator)
    if unread is not None:
        with torch.no_grad():
            k[unread], v[unread] = math.nan, math.nan
    on_device, official = split_options(options, device)
    out, lse, none = mf.flash_attn_varlen_func(q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device),
                                               max(lengths_q), max(lengths_k), causal=causal, return_attn_probs=True,
                                               **on_device)
    grads = torch.autograd.grad(out, (q, k, v), dO)
    assert none is None and not lse.requires_grad
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (H, q.shape[0]) and lse.dtype == torch.float32
    assert all(g.shape == t.shape and g.dtype == dtype for g, t in zip(grads, (q, k, v)))
    out, lse, grads = out.cpu(), lse.cpu(), [g.cpu() for g in grads]
    q, k, v, dO = (t.detach().cpu() for t in (q, k, v, dO))
    if unread is not None:
        k, v = (t.clone().index_fill_(0, torch.arange(len(t))[unread], 0.0) for t in (k, v))
    out_ref, lse_ref, *grads_ref = varlen_reference(q, k, v, lengths_q, lengths_k, causal, dO, mods=dense_mods,
                                                    **official)
    plain, _, *plains = varlen_reference(q, k, v, lengths_q, lengths_k, causal, dO, dtype, mods=dense_mods,
                                         **official)

    empty = torch.isinf(lse_ref)  # (H, total_q): rows that see no key
    rows = empty.t()  # (total_q, H)
    assert torch.equal(out[rows], torch.zeros_like(out[rows])), "rows that see no key: out 0"
    assert torch.equal(lse[empty], lse_ref[empty].float()), "rows that see no key: lse -inf"
    assert torch.equal(grads[0][rows], torch.zeros_like(grads[0][rows])), "rows that see no key: dQ 0"
    assert (~rows).any()
    atol = 3e-4 if options.get("softcap") else 0.0  # the official tests' slack with softcap (tests/test_mods.py)
    assert_close("out", out[~rows], out_ref[~rows], plain[~rows], atol)
    assert_close("lse", lse[~empty], lse_ref[~empty])
    for name, grad, ref, plain in zip(("dQ", "dK", "dV"), grads, grads_ref, plains):
        assert_close(name, grad, ref, plain, atol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("H,Hk,d,dtype", [(2, 2, 64, torch.bfloat16), (4, 1, 128, torch.float16)],
                         ids=["h2-hk2-d64-bfloat16", "h4-hk1-d128-float16"])
def test_each_sequence_as_flash_attention_alone(device, causal, H, Hk, d, dtype, generator):
    """The packed batch against flash_attention on each sequence alone (B = 1, its own length, the
    padded batch's kernels on version 3): the same kernels walk the same tiles in the same order, so out,
    lse, dK and dV are equal to the bit; dQ is added into by atomics in whatever order blocks finish,
    so its fp32 sums may differ in their last bits, and dQ by its rounding (an ulp of its dtype)."""
    lengths = [130, 1, 64, 17]
    q, k, v, dO = packed_inputs(lengths, lengths, H, Hk, d, dtype, device, generator)
    cu = cu_seqlens(lengths, device)
    out, lse, _ = mf.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths), causal=causal,
                                            return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dO)
    for b, (start, end) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        qb, kb, vb = (t.detach()[start:end].transpose(0, 1)[None].requires_grad_() for t in (q, k, v))
        O, L = mf.forward(qb.detach(), kb.detach(), vb.detach(), causal=causal, version=3)
        alone = mf.flash_attention(qb, kb, vb, causal=causal, version=3)
        dQ, dK, dV = (g[0].transpose(0, 1) for g in torch.autograd.grad(alone, (qb, kb, vb),
                                                                          dO[start:end].transpose(0, 1)[None]))
        assert torch.equal(out[start:end], alone[0].transpose(0, 1)), f"sequence {b}: out"
        assert torch.equal(lse[:, start:end], L[0]), f"sequence {b}: lse"
        assert torch.equal(grads[1][start:end], dK) and torch.equal(grads[2][start:end], dV), f"sequence {b}: dK, dV"
        torch.testing.assert_close(grads[0][start:end], dQ, rtol=torch.finfo(dtype).eps,
                                   atol=1e-3 * dQ.abs().max().item(), msg=f"sequence {b}: dQ")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("B,Nq,Nk,H,Hk,d,dtype", [(2, 5, 130, 4, 2, 64, torch.bfloat16),  # a chunk against a context
                                                  (3, 70, 17, 2, 2, 128, torch.float16),  # rows that see no key
                                                  (1, 1, 65, 4, 1, 64, torch.bfloat16)],  # one new query
                         ids=["chunk", "more-queries", "one-query"])
def test_flash_attn_func_of_different_lengths(device, causal, B, Nq, Nk, H, Hk, d, dtype, generator, poisoned):
    """flash_attn_func with seqlen_q != seqlen_k, which it runs as B sequences of flash_attn_varlen_func:
    out, lse and dQ, dK, dV of a random dO against float64 attention (causal aligned at the bottom right),
    in flash_attn_func's shapes; q, k, v transposed views of (B, H, N, d) tensors, as a model may hold them."""
    q, k, v = (torch.randn(B, h, n, d, generator=generator).to(device, dtype).requires_grad_().transpose(1, 2)
               for h, n in ((H, Nq), (Hk, Nk), (Hk, Nk)))
    dO = torch.randn(B, Nq, H, d, generator=generator).to(device, dtype)
    out, lse, none = mf.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dO)
    assert none is None and out.shape == (B, Nq, H, d) and lse.shape == (B, H, Nq) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [t.shape for t in (q, k, v)]
    packed = [t.detach().cpu().reshape(-1, *t.shape[2:]) for t in (q, k, v, dO)]  # (B N, heads, d)
    refs = [varlen_reference(*packed[:3], [Nq] * B, [Nk] * B, causal, packed[3], dt) for dt in (torch.float64, dtype)]
    (out_ref, lse_ref, *grads_ref), (plain, _, *plains) = refs
    out, lse = out.cpu().reshape(B * Nq, H, d), lse.cpu().transpose(0, 1).reshape(H, B * Nq)
    grads = [g.cpu().reshape(-1, *g.shape[2:]) for g in grads]
    empty = torch.isinf(lse_ref)  # (H, B Nq): rows that see no key, out and dQ 0
    assert empty.any() == (causal and Nq > Nk)
    assert torch.equal(out[empty.t()], torch.zeros_like(out[empty.t()])) and (lse[empty] == -math.inf).all()
    assert torch.equal(grads[0][empty.t()], torch.zeros_like(grads[0][empty.t()]))
    assert_close("out", out[~empty.t()], out_ref[~empty.t()], plain[~empty.t()])
    assert_close("lse", lse[~empty], lse_ref[~empty])
    for name, grad, ref, plain in zip(("dQ", "dK", "dV"), grads, grads_ref, plains):
        assert_close(name, grad, ref, plain)


@pytest.mark.parametrize("device", DEVICES)
def test_flash_attn_func_of_different_lengths_waits_for_nothing(device, generator, monkeypatch):
    """Its cu_seqlens are flash_attn_func's own, made on the device, their values known on the host: no
    copy back to check them, so it runs while a CUDA graph is being captured (on a GPU, a real capture
    and its replay; on the CPU, as if one were), where flash_attn_varlen_func is refused."""
    q, k, v = (torch.randn(2, n, 4, 64, generator=generator).to(device, torch.bfloat16) for n in (3, 40, 40))
    eager = mf.flash_attn_func(q, k, v, causal=True)
    if device == "cpu":
        monkeypatch.setattr(mf, "_capturing", lambda device: True)
        assert torch.equal(mf.flash_attn_func(q, k, v, causal=True), eager)
        return
    graph, stream = torch.cuda.CUDAGraph(), torch.cuda.Stream()
    with torch.cuda.stream(stream):
        mf.flash_attn_func(q, k, v, causal=True)  # built and warmed up outside the capture
        with torch.cuda.graph(graph, stream=stream):
            out = mf.flash_attn_func(q, k, v, causal=True)
    out.fill_(math.nan)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)


def test_flash_attn_func_of_different_lengths_on_no_sequence():
    """B = 0: empty results (flash_attn_varlen_func takes at least one sequence), and empty gradients."""
    q, k, v = (torch.zeros(0, n, 4, 64, dtype=torch.bfloat16, requires_grad=True) for n in (3, 5, 5))
    out, lse, _ = mf.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert out.shape == (0, 3, 4, 64) and out.dtype == torch.bfloat16 and lse.shape == (0, 4, 3)
    assert [g.shape for g in torch.autograd.grad(out, (q, k, v), torch.zeros_like(out))] == [q.shape, k.shape, k.shape]
    # its options checked all the same, as with sequences
    for options, error, said in ((dict(causal=2), TypeError, "causal = 2"),
                                 (dict(softmax_scale="x"), TypeError, "softmax_scale = 'x'"),
                                 (dict(dropout_p=1.5), ValueError, "dropout_p = 1.5"),
                                 (dict(window_size=8), ValueError, "window_size = 8"),
                                 (dict(softcap=-1.0), ValueError, "softcap = -1.0"),
                                 (dict(alibi_slopes=torch.zeros(3)), ValueError, "alibi_slopes"),
                                 (dict(mask_mod=3), TypeError, "mask_mod = 3"),
                                 (dict(return_attn_probs=1), TypeError, "return_attn_probs = 1"),
                                 (dict(deterministic="x"), TypeError, "deterministic = 'x'")):
        with pytest.raises(error, match=re.escape(said)):
            mf.flash_attn_func(q, k, v, **options)


@pytest.mark.parametrize("options,said", [
    (dict(dtype=torch.float32, version=2), "q is torch.float32: they take bfloat16 and float16"),
    (dict(version=4), "version = 4: leave it out, or 3"), (dict(Br=64), "Br = 64, Bc = None: they have their own"),
    (dict(d=264), "head dim d = 264: they take d up to 256"),
    (dict(heads_k=3), "k and v have 3 heads, q 4: a number that divides q's (grouped-query attention)"),
    (dict(deterministic=True), "deterministic=True: their backward adds into dQ with atomics, in an order that "
                               "varies from run to run; leave it False")])
def test_flash_attn_func_of_different_lengths_refuses_what_varlen_does_not_take(options, said):
    """Each in flash_attn_func's own terms, not in flash_attn_varlen_func's packed layout."""
    dtype, d, heads_k = options.pop("dtype", torch.bfloat16), options.pop("d", 64), options.pop("heads_k", 4)
    q, k = torch.zeros(2, 3, 4, d, dtype=dtype), torch.zeros(2, 5, heads_k, d, dtype=dtype)
    said = ("q has 3 rows per sequence and k, v 5: flash_attn_func runs different lengths on "
            f"flash_attn_varlen_func's kernels, version 3's; {said}")
    with pytest.raises(ValueError, match=re.escape(said)):
        mf.flash_attn_func(q, k, k, **options)
    if heads_k == 4 and d == 64:
        with pytest.raises(ValueError, match=re.escape("for q and k of different lengths N: flash_attn_func, in bf16 "
                                                       "or fp16, on (B, N, H, d) tensors (q.transpose(1, 2))")):
            mf.flash_attention(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2))


def test_flash_attn_func_of_different_lengths_says_what_must_agree():
    q, k, v = (torch.zeros(2, n, h, 64, dtype=torch.bfloat16) for n, h in ((10, 4), (30, 2), (40, 2)))
    with pytest.raises(ValueError, match=re.escape("flash_attn_func takes q (B, N, H, d) and k, v (B, N_k, H_k, d): k "
                                                   "and v of one shape, B and d as q's")):
        mf.flash_attn_func(q, k, v)
    with pytest.raises(ValueError, match=re.escape("kv must be 5-D (B, N_k, 2, nheads_k, d)")):
        mf.flash_attn_kvpacked_func(q, k)


@pytest.mark.parametrize("device", DEVICES)
def test_a_window_side_past_the_keys_is_no_limit(device, generator):
    """flash-attn 2's rule: a side of window_size at least seqlen_k (max_seqlen_k) is -1. With 75 queries and
    20 keys, aligned at the bottom right, window_size=(-1, 20) would otherwise leave queries 0..34 no key;
    as flash-attn 2 runs it, every query sees every key: the answer without a window, to the bit."""
    q, k, v = (torch.randn(2, n, 2, 64, generator=generator).to(device, torch.bfloat16) for n in (75, 20, 20))
    plain = mf.flash_attn_func(q, k, v)
    for window in [(-1, 20), (20, 25), (30, -1)]:
        assert torch.equal(mf.flash_attn_func(q, k, v, window_size=window), plain), window
    assert (mf.flash_attn_func(q, k, v, window_size=(-1, 19))[:, :35] == 0).all()  # within the keys: as given


@pytest.mark.parametrize("device", DEVICES)
def test_no_keys_at_all_and_no_queries_at_all(device, generator):
    """total_k = 0: every row sees no key (out 0, lse -inf, gradients 0); total_q = 0: empty results."""
    q, k, v, dO = packed_inputs([3, 2], [0, 0], 4, 2, 64, torch.bfloat16, device, generator)
    out, lse, _ = mf.flash_attn_varlen_func(q, k, v, cu_seqlens([3, 2], device), cu_seqlens([0, 0], device), 3, 0,
                                            return_attn_probs=True)
    dQ, dK, dV = torch.autograd.grad(out, (q, k, v), dO)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(dQ, torch.zeros_like(dQ))
    assert lse.shape == (4, 5) and (lse == -math.inf).all() and dK.shape == dV.shape == (0, 2, 64)
    q, k, v, dO = packed_inputs([0, 0], [4, 1], 4, 2, 64, torch.bfloat16, device, generator)
    out = mf.flash_attn_varlen_func(q, k, v, cu_seqlens([0, 0], device), cu_seqlens([4, 1], device), 0, 4, causal=True)
    dQ, dK, dV = torch.autograd.grad(out, (q, k, v), dO)
    assert out.shape == (0, 4, 64) and torch.equal(dK, torch.zeros_like(dK)) and torch.equal(dV, torch.zeros_like(dV))


def small_inputs(lengths_q=(3, 5), lengths_k=(3, 5), H=4, Hk=2, d=64, dtype=torch.bfloat16):
    """q, k, v of zeros and their cu_seqlens and max_seqlen: for the refusals, which come first."""
    q = torch.zeros(sum(lengths_q), H, d, dtype=dtype)
    k, v = (torch.zeros(sum(lengths_k), Hk, d, dtype=dtype) for _ in range(2))
    return q, k, v, cu_seqlens(lengths_q, "cpu"), cu_seqlens(lengths_k, "cpu"), max(lengths_q), max(lengths_k)


def refuse(error, match, *inputs, **options):
    with pytest.raises(error, match=match):
        mf.flash_attn_varlen_func(*inputs, **options)


def paged(k, lengths_k, page, generator):
    """k's packed rows in pages of `page` rows, each sequence's in a random order among all the pool's
    (two spare ones); rows no sequence uses NaN. Returns the pages (num_blocks, page, nheads_k, d),
    block_table (batch, max_pages) int32, and, for each packed row, its (page, row) there."""
    max_pages = max(-(-n // page) for n in lengths_k)
    pool = len(lengths_k) * max_pages + 2
    table = torch.randperm(pool, generator=generator)[:len(lengths_k) * max_pages].reshape(-1, max_pages).int()
    where = [(table[b, j // page].item(), j % page) for b, n in enumerate(lengths_k) for j in range(n)]
    pages = torch.full((pool, page, *k.shape[1:]), math.nan, dtype=k.dtype, device=k.device)
    index = tuple(torch.tensor(x, dtype=torch.long).reshape(-1) for x in zip(*where)) if where else None
    if index:
        pages[index] = k.detach()
    return pages, table.to(k.device), index


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page,causal", [(16, True), (48, False), (256, True)])
def test_paged_keys_are_the_packed_ones(device, page, causal, generator):
    """block_table: k and v in pages of 16, 48 (across the 64-key tiles) and 256 rows (more than a
    sequence), in a shuffled order among unused NaN pages: out to the bit the packed call's (the same
    kernels on the keys gathered), dQ within its rounding (atomics), and the pages' gradients the packed
    dK, dV to the bit where the keys lie, 0 elsewhere."""
    lengths_q, lengths_k, H, Hk, d = [5, 0, 130, 1], [70, 3, 200, 0], 4, 2, 64
    q, k, v, dO = packed_inputs(lengths_q, lengths_k, H, Hk, d, torch.bfloat16, device, generator)
    (k_pages, table, index), (v_pages, _, _) = (paged(t, lengths_k, page, torch.Generator().manual_seed(page))
                                                for t in (k, v))
    k_pages.requires_grad_(), v_pages.requires_grad_()
    cu = (cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device), max(lengths_q), max(lengths_k))
    out = mf.flash_attn_varlen_func(q, k, v, *cu, causal=causal)
    out_paged = mf.flash_attn_varlen_func(q, k_pages, v_pages, *cu, causal=causal, block_table=table)
    assert torch.equal(out_paged, out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dO)
    dq_paged, dk_pages, dv_pages = torch.autograd.grad(out_paged, (q, k_pages, v_pages), dO)
    assert torch.allclose(dq_paged, dq, rtol=2 ** -7, atol=1e-3)
    for pages_grad, packed_grad in ((dk_pages, dk), (dv_pages, dv)):
        assert torch.equal(pages_grad[index], packed_grad)
        pages_grad[index] = 0
        assert not pages_grad.any(), "a page row no sequence uses got a gradient"


def test_bad_block_tables_are_refused():
    q, k, v, cu_q, cu_k, max_q, max_k = small_inputs()  # keys of 3 and 5
    pages = torch.zeros(4, 4, 2, 64, dtype=torch.bfloat16)
    table = torch.tensor([[0, 1], [2, 3]], dtype=torch.int32)
    inputs = (q, pages, pages, cu_q, cu_k, max_q, max_k)
    refuse(ValueError, r"k must be 4-D \(num_blocks, page_block_size, nheads_k, d\): paged, with block_table", q, k, v,
           cu_q, cu_k, max_q, max_k, block_table=table)
    refuse(ValueError, r"block_table \(torch.int64, shape \(2, 2\)\): it must be int32, \(batch = 2, "
           r"max_blocks_per_seq\)", *inputs, block_table=table.long())
    refuse(ValueError, r"block_table \(torch.int32, shape \(3, 2\)\)", *inputs, block_table=torch.zeros(3, 2).int())
    refuse(ValueError, "block_table is on meta, q on cpu", *inputs, block_table=table.to("meta"))
    refuse(ValueError, r"block_table\[1, 1\] = 4: sequence 1 uses that entry, and the cache has pages 0 \.\. 3",
           *inputs, block_table=torch.tensor([[0, 1], [2, 4]], dtype=torch.int32))
    refuse(ValueError, r"sequence 1 has 5 keys, more than its 1 pages of 4 rows in block_table hold \(4\)", *inputs,
           block_table=table[:, :1])
    refuse(TypeError, "block_table must be a torch.Tensor", *inputs, block_table=[[0, 1], [2, 3]])
    # sequence 0's second entry is never used: no error, and the bits of the same call with a page there
    # (random q and pages, so that what is read shows)
    q, pages = (torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).bfloat16() for t in (q, pages))
    call = lambda table: mf.flash_attn_varlen_func(q, pages, pages, *inputs[3:], block_table=table)  # noqa: E731
    assert torch.equal(call(torch.tensor([[0, 9], [2, 3]], dtype=torch.int32)), call(table))


def test_bad_alibi_slopes_are_refused():
    """alibi_slopes: (nheads,) or (batch, nheads), batch the number of sequences, float32 on q's device."""
    refuse(ValueError, r"alibi_slopes \(torch.float32, shape \(3, 4\), on cpu\): it must be float32, of shape "
           r"\(H,\) = \(4,\) or \(B, H\) = \(2, 4\)", *small_inputs(), alibi_slopes=torch.ones(3, 4))
    refuse(ValueError, "window_size = 8: it must be", *small_inputs(), window_size=8)


def test_bad_dropout_deterministic_and_return_attn_probs_are_refused():
    refuse(ValueError, "dropout_p = 1.5: it must be in", *small_inputs(), dropout_p=1.5)
    refuse(ValueError, r"return_attn_probs=True with dropout_p = 0.1: .* \(S_dmask\)", *small_inputs(), dropout_p=0.1,
           return_attn_probs=True)
    refuse(TypeError, "return_attn_probs = 'yes': it must be True or False", *small_inputs(), return_attn_probs="yes")
    refuse(ValueError, "deterministic=True: .* version 3's kernels, whose backward adds into dQ with atomics",
           *small_inputs(), deterministic=True)
    refuse(TypeError, "deterministic = 'yes'", *small_inputs(), deterministic="yes")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_on_packed_sequences(device, causal, generator, poisoned, monkeypatch):
    """dropout_p on packed sequences: the pair (query i, key j) of sequence b's head h kept where its word
    of Philox for slice b H + h (helpers.dropout_kept) and the call's seed is >= p 2^32 (the seed pinned here, through
    _check_mods' dropout_seed), positions within the sequence. out, dQ, dK, dV against float64 attention
    with that mask (P Z / (1 - p)) by the official rule; sequences of 0, 1, 130 and 70 queries on 5, 1, 130
    and 100 keys, grouped heads."""
    seed, p = 0x2D5E_1F00_C0FF_EE, 0.17
    check_mods = mf._check_mods
    monkeypatch.setattr(mf, "_check_mods", lambda *args, **options: check_mods(*args, **options, dropout_seed=seed))
    lengths_q, lengths_k, H, Hk, d = [0, 1, 130, 70], [5, 1, 130, 100], 4, 2, 64
    q, k, v, dO = packed_inputs(lengths_q, lengths_k, H, Hk, d, torch.bfloat16, device, generator)
    out = mf.flash_attn_varlen_func(q, k, v, cu_seqlens(lengths_q, device), cu_seqlens(lengths_k, device),
                                    max(lengths_q), max(lengths_k), p, causal=causal)
    grads = torch.autograd.grad(out, (q, k, v), dO)

    def dropped(b, Lq, Lk):  # (H, Lq, Lk): Z / (1 - p)
        return dropout_kept(b * H + torch.arange(H), Lq, Lk, p, seed).double() / (1 - p)

    (ref, _, *ref_grads), (plain, _, *plain_grads) = (
        varlen_reference(q, k, v, lengths_q, lengths_k, causal, dO, dtype, dropped=dropped)
        for dtype in (torch.float64, q.dtype))
    for name, x, r, pl in zip(("out", "dQ", "dK", "dV"), (out, *grads), (ref, *ref_grads), (plain, *plain_grads)):
        assert_close(name, x, r, pl)


def test_bad_tensors_are_refused():
    q, k, v, cu_q, cu_k, max_q, max_k = inputs = small_inputs()
    refuse(TypeError, "q has dtype torch.float32; flash_attn_varlen_func runs version 3's kernels, which take "
                      "bfloat16 and float16 only", *small_inputs(dtype=torch.float32))
    refuse(ValueError, r"head dim d = 264: .* d up to 256 \(version 3's kernels: 32, 64, 96, 128, 192 or 256, a d "
                       r"in between padded up\)", *small_inputs(d=264))
    refuse(ValueError, "nheads_k = 4 does not divide q's nheads = 6", *small_inputs(H=6, Hk=4))
    refuse(ValueError, "k and v have head dim 128, q 64", q, k.repeat(1, 1, 2), v.repeat(1, 1, 2), *inputs[3:])
    refuse(ValueError, r"q must be 3-D \(total_q, nheads, d\)", q[None], *inputs[1:])
    refuse(ValueError, r"k must be 3-D \(total_k, nheads_k, d\)", q, k[None], *inputs[2:])
    refuse(TypeError, "k has dtype torch.float16, q torch.bfloat16", q, k.half(), *inputs[2:])
    refuse(ValueError, "k and v differ in shape", q, k, v[:, :1], *inputs[3:])
    refuse(ValueError, "v is on meta, q on cpu", q, k, v.to("meta"), *inputs[3:])
    refuse(ValueError, "cu_seqlens_k is on meta, q on cpu", q, k, v, cu_q, cu_k.to("meta"), max_q, max_k)
    refuse(TypeError, "q must be a torch.Tensor, got list", [1.0], *inputs[1:])
    refuse(ValueError, "head dim d = 0: flash_attn_varlen_func takes", q[..., :0], k[..., :0], v[..., :0], *inputs[3:])


def test_bad_cu_seqlens_and_max_seqlen_are_refused():
    q, k, v, cu_q, cu_k, max_q, max_k = small_inputs()
    refuse(TypeError, "cu_seqlens_q has dtype torch.int64; it must be torch.int32", q, k, v, cu_q.long(), cu_k, max_q,
           max_k)
    refuse(ValueError, r"cu_seqlens_k must be 1-D \(batch \+ 1,\), batch >= 1", q, k, v, cu_q, cu_k[:1], max_q, max_k)
    refuse(ValueError, "cu_seqlens_q has 3 entries and cu_seqlens_k 4", q, k, v, cu_q, cu_seqlens([3, 5, 0], "cpu"),
           max_q, max_k)
    refuse(ValueError, r"cu_seqlens_q\[0\] = 1: the offsets start at 0", q, k, v, cu_q + 1, cu_k, max_q, max_k)
    bad = torch.tensor([0, 6, 5, 8], dtype=torch.int32)
    refuse(ValueError, r"cu_seqlens_k decreases, cu_seqlens_k\[1\] = 6 > cu_seqlens_k\[2\] = 5: sequence 1 would have "
                       "a negative length", q, k, v, cu_seqlens([3, 0, 5], "cpu"), bad, max_q, max_k)
    refuse(ValueError, r"cu_seqlens_q\[-1\] = 7, but q has 8 rows",
           q, k, v, cu_seqlens([3, 4], "cpu"), cu_k, max_q, max_k)
    refuse(ValueError, r"cu_seqlens_k\[-1\] = 9, but k has 8 rows",
           q, k, v, cu_q, cu_seqlens([3, 6], "cpu"), max_q, max_k)
    refuse(ValueError, "sequence 1 has 5 queries, more than max_seqlen_q = 4", q, k, v, cu_q, cu_k, 4, max_k)
    refuse(ValueError, "sequence 1 has 5 keys, more than max_seqlen_k = 3", q, k, v, cu_q, cu_k, max_q, 3)
    refuse(TypeError, "max_seqlen_q = 4.5: it must be an int", q, k, v, cu_q, cu_k, 4.5, max_k)
    refuse(TypeError, "max_seqlen_k = True: it must be an int", q, k, v, cu_q, cu_k, max_q, True)
    refuse(TypeError, r"max_seqlen_q = a tensor of shape \(\).*: it must be an int", q, k, v, cu_q, cu_k,
           torch.tensor(5.0), max_k)  # (an integer one is taken: numpy's and torch's ints are)
    refuse(ValueError, "max_seqlen_k = -1", q, k, v, cu_q, cu_k, max_q, -1)
    # larger maxima are no error: the blocks past each sequence's end return at once, the answer the bits of
    # the exact maxima's (random q, k, v, so that a sequence reading another's rows would show)
    q, k, v = (torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).bfloat16() for t in (q, k, v))
    assert torch.equal(mf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 300, 200),
                       mf.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k))


def test_a_cuda_graph_being_captured_is_refused(monkeypatch):
    """The host check of cu_seqlens waits for the device, which capture forbids: refused, not skipped."""
    monkeypatch.setattr(mf, "_capturing", lambda device: True)
    refuse(RuntimeError, "checks cu_seqlens on the host, which waits for the device; a CUDA graph being captured",
           *small_inputs())

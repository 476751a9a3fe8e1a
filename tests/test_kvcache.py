"""flash_attn_with_kvcache (chapter 5: kernels/flash_decode.cu) against float64 attention written here,
on the CPU emulation and, where there is one, on the GPU. Each case draws every sequence's keys and
values first, densely; the caches are built from them afterwards, contiguous (rows past a sequence's
end NaN) or paged (pages in a random order, unused pages and rows NaN), and the reference reads the
dense ones only. Sequences of one batch differ in length (0, 1, around the 64-key tile, ~300, ~1000); the
query positions 1, 3 and more; grouped heads (group 1, 4 and 8, multi-query), d = 64, 128 and 256 and
between (8, 80, 96, 200: in the next kernel up, its extra columns zeros), causal
or not, 1, 2 and 7 splits of the keys and the heuristic's choice (out, lse and the splits' scratch NaN
until written: conftest's poisoned), new keys appended (the cache rows they land in equal them exactly,
every other row keeps its bits). bf16 and fp16 within the official
rule (largest error at most twice plain attention's in the same dtype), lse within 1e-5, rows that see
no key exactly 0 and -inf. Then what is refused, and what a misuse the host does not check (a CUDA
graph being captured) gives: NaN for that sequence, and nothing read or written outside the cache."""
import math

import numpy as np
import pytest
import torch

import minimal_flash as mf
from helpers import (DEVICES, EVERY_INDEX_MASK_MOD, TABLE_SCORE_MOD, assert_close, sequence_attention,
                     split_options)


def dense_sequences(lengths, Hk, d, dtype, generator):
    """Each sequence's keys and values, (L_b, Hk, d): what the caches are built from, and the reference."""
    return [[torch.randn(n, Hk, d, generator=generator).to(dtype) for _ in range(2)] for n in lengths]


def reference(q, sequences, causal, scale, window_size=(-1, -1), softcap=0.0, alibi_slopes=None, mods=None):
    """out (B, Sq, H, d) and lse (B, H, Sq) in float64, a sequence at a time (helpers.sequence_attention:
    each query head reads the kv head of its group; query i of Sq is aligned with key i + L_b - Sq, where
    causal ends, and from which window_size and ALiBi measure; a row that sees no key: out 0, lse -inf);
    alibi_slopes (H,) or (B, H); mods(b, Sq, L_b) -> (bias, keep), a score_mod and mask_mod written out.
    Also out computed the same way in q's dtype (plain attention, for the 2x rule)."""
    outs, lses, plains = [], [], []
    for b, (K, V) in enumerate(sequences):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[b]
        bias, keep = (0.0, True) if mods is None else mods(b, q.shape[1], K.shape[0])
        for dtype, into in ((torch.float64, outs), (q.dtype, plains)):
            out, lse = sequence_attention(q[b].to(dtype), K.to(dtype), V.to(dtype), causal, scale, window_size,
                                          softcap, slopes, bias, keep)
            into.append(out)  # (Sq, H, d)
            if dtype == torch.float64:
                lses.append(lse)  # (H, Sq)
    return torch.stack(outs), torch.stack(lses), torch.stack(plains)


def build_cache(sequences, cached, capacity, page, dtype, generator, pads=None):
    """The first cached[b] rows of each sequence in a cache of `capacity` rows per sequence, from its
    row pads[b] on (cache_leftpad; None: 0), everything else NaN. page None: contiguous, (B, capacity,
    Hk, d). Else paged: pages of `page` rows, each sequence's in a random order among all the pool's (two
    spare ones), block_table (B, max_pages)."""
    B, (Hk, d) = len(sequences), sequences[0][0].shape[1:]
    pads = pads or [0] * B
    if page is None:
        caches = [torch.full((B, capacity, Hk, d), float("nan"), dtype=dtype) for _ in range(2)]
        for b, (K, V) in enumerate(sequences):
            rows = slice(pads[b], pads[b] + cached[b])
            caches[0][b, rows], caches[1][b, rows] = K[:cached[b]], V[:cached[b]]
        return caches, None
    max_pages = capacity // page
    pages = B * max_pages + 2
    block_table = torch.randperm(pages, generator=generator)[:B * max_pages].reshape(B, max_pages).int()
    caches = [torch.full((pages, page, Hk, d), float("nan"), dtype=dtype) for _ in range(2)]
    for b, (K, V) in enumerate(sequences):
        for j in range(cached[b]):
            r = pads[b] + j
            caches[0][block_table[b, r // page], r % page] = K[j]
            caches[1][block_table[b, r // page], r % page] = V[j]
    return caches, block_table


def after_append(caches, k, v, cached, block_table, written, pads=None):
    """The caches as they must be after k, v are appended: copies, with row pads[b] + cached[b] + i of
    each sequence b in `written` set to k[b, i], v[b, i]; every other row as it was."""
    expected = [c.clone() for c in caches]
    page = caches[0].shape[1]
    for b in written:
        for i in range(k.shape[1]):
            j = (pads[b] if pads else 0) + cached[b] + i
            where = (b, j) if block_table is None else (block_table[b, j // page], j % page)
            expected[0][where], expected[1][where] = k[b, i], v[b, i]
    return expected


def bits(t):
    """A tensor's bits, to compare NaN-filled caches exactly."""
    return t.view(torch.int16)


# (seqlen_q, nheads, nheads_k, d, cached keys per sequence, seqlen_new, causal, num_splits, page, dtype).
# Lengths 0 to ~300 around the 64-key tile, with and without new keys; page sizes that divide the tile
# (16), do not (48), hold several (256), and hold a tile or more while tiles straddle two (80, 96); 7 splits
# leave some splits of the shorter sequences empty;
# seqlen_q = 9 with group 8 is 72 rows, two row tiles; causal with L_b < seqlen_q leaves rows with no key.
# d = 256 (Gemma's heads): 16-row blocks, paged, and 64-row blocks with the heuristic's splits. Head dims
# between the kernels' (Phi-3's 96, Phi-2's 80; 8 and 200), through 16- and 64-row blocks, split and not: the
# kernel's zero columns must neither reach out nor lse, nor be read from the cache (its rows are d apart).
# One split of ~700 and ~1000 keys: more tiles than the kernel's buffers (5 at d = 64, 3 at d = 128), so each
# buffer is refilled. 40 and 128 splits: each of the combine's warps sums several splits, some of them
# empty (lse = -inf: the short sequence's, and past 65 of 2 tiles each).
CASES = [
    (1, 8, 2, 64, [1, 63, 64, 65, 300, 0], 1, False, 1, None, torch.bfloat16),
    (1, 8, 1, 128, [1, 63, 64, 65, 301, 0], 0, True, 2, 16, torch.float16),
    (3, 8, 2, 64, [62, 297, 2, 0], 3, True, 7, 48, torch.bfloat16),
    (3, 4, 4, 128, [63, 64, 1], 0, False, 0, 256, torch.bfloat16),
    (5, 8, 1, 64, [300, 0, 3], 0, True, 0, None, torch.float16),
    (9, 8, 1, 128, [100, 7], 1, True, 2, 16, torch.bfloat16),
    (1, 2, 2, 64, [61, 130], 3, False, 7, None, torch.float16),
    (1, 8, 2, 64, [700, 5], 0, True, 1, 16, torch.bfloat16),
    (2, 4, 1, 128, [1000], 2, False, 1, None, torch.float16),
    (1, 8, 2, 64, [2500, 40], 1, False, 40, None, torch.bfloat16),
    (1, 4, 1, 128, [8200, 3], 1, True, 128, 256, torch.float16),
    (2, 8, 2, 64, [300, 97, 0], 2, True, 3, 80, torch.bfloat16),
    (1, 4, 4, 128, [459, 64, 1], 0, False, 2, 96, torch.float16),
    (1, 8, 2, 256, [1, 63, 64, 65, 300, 0], 2, True, 3, 48, torch.bfloat16),
    (5, 8, 1, 256, [130, 0, 70], 1, False, 0, None, torch.float16),
    (1, 8, 2, 96, [1, 63, 64, 65, 300, 0], 2, True, 3, 48, torch.bfloat16),
    (5, 8, 1, 80, [130, 0, 70], 1, False, 0, None, torch.float16),
    (1, 4, 2, 8, [300, 65], 1, True, 2, None, torch.bfloat16),
    (1, 8, 4, 200, [300, 97], 1, False, 5, 80, torch.float16),
]
CASE_IDS = [f"sq{c[0]}-h{c[1]}-hk{c[2]}-d{c[3]}-new{c[5]}-{'causal' if c[6] else 'full'}-split{c[7]}-"
            f"{'contiguous' if c[8] is None else f'page{c[8]}'}-{str(c[9]).replace('torch.', '')}" for c in CASES]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Sq,H,Hk,d,cached,new,causal,splits,page,dtype", CASES, ids=CASE_IDS)
def test_matches_float64(device, Sq, H, Hk, d, cached, new, causal, splits, page, dtype, generator,
                         monkeypatch, poisoned):
    if splits == 0 and device == "cpu":  # the heuristic, as for an H200's 132 multiprocessors: it splits
        monkeypatch.setattr(mf, "_parallel_units", lambda device: 132)
    check_against_float64(device, Sq, H, Hk, d, cached, new, causal, splits, page, dtype, generator)


# The official options (chapter 6's mods in the decode kernels), each from the queries' alignment with
# the end of the sequence: windows that leave some rows no key and, over ~2500 keys, a band that the 8
# splits cut alone (some splits then empty; the first 37 tiles, which no query's window reaches, NaN
# in the cache, so that one of them read would make out NaN); a window on both sides; softcap with ALiBi
# per (sequence, head); paged and contiguous; and a score_mod and mask_mod of one's own (b the sequence,
# h q's head).
SLOPES = torch.tensor([0.5, 0.25, 0.125, 0.0625, 0.03, 0.02, 0.01, 0.005])
OPTIONS = {
    "window": ((3, 8, 2, 64, [62, 297, 2, 0], 3, True, 7, 48, torch.bfloat16), dict(window_size=(40, 0))),
    "window-long": ((1, 8, 2, 128, [2500, 300], 1, True, 8, None, torch.float16), dict(window_size=(100, 0),
                                                                                          unread=(0, 2368))),
    "window-both-sides": ((4, 4, 4, 64, [130, 5], 2, False, 2, 16, torch.bfloat16), dict(window_size=(3, 2))),
    "softcap-alibi": ((2, 8, 1, 64, [300, 97, 0], 2, True, 3, 80, torch.float16),
                      dict(softcap=2.0, alibi_slopes=torch.stack([SLOPES, SLOPES.flip(0), 2 * SLOPES]))),
    "window-softcap-d256": ((1, 8, 4, 256, [300, 97], 1, True, 4, 80, torch.bfloat16),  # Gemma 2's
                            dict(window_size=(63, 0), softcap=30.0)),
    "score_mod-mask_mod": ((3, 8, 2, 64, [200, 65], 1, True, 2, None, torch.bfloat16), dict(
        score_mod=TABLE_SCORE_MOD, mask_mod=EVERY_INDEX_MASK_MOD,
        mod_tensors={"table": torch.arange(16, dtype=torch.float32).reshape(2, 8) / 16})),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(OPTIONS))
def test_official_options_and_mods(device, name, generator, poisoned):
    case, options = OPTIONS[name]
    check_against_float64(device, *case, generator, **options)


def check_against_float64(device, Sq, H, Hk, d, cached, new, causal, splits, page, dtype, generator, unread=None,
                          pads=None, strided=False, **options):
    """flash_attn_with_kvcache on caches built from dense sequences: the caches after the append, to
    the bit; out and lse (return_softmax_lse) against float64 (reference; options: window_size, softcap,
    alibi_slopes, and score_mod, mask_mod, mod_tensors, which dense_mods below writes out). unread =
    (b, n): the first n rows of sequence b's contiguous cache NaN (the reference reads the sequences).
    pads: cache_leftpad, each sequence's keys from that row on (the NaN rows before it never read).
    strided: the caches handed over as views of a larger NaN buffer, heads outermost in each page (see
    relaid below), read and written where they lie."""
    lengths = [n + new for n in cached]
    sequences = dense_sequences(lengths, Hk, d, dtype, generator)
    rows = [n + (pads[b] if pads else 0) for b, n in enumerate(lengths)]
    capacity = math.ceil((max(rows) + 37) / (page or 1)) * (page or 1)  # rows past every sequence's end
    (k_cache, v_cache), block_table = build_cache(sequences, cached, capacity, page, dtype, generator, pads)
    if unread is not None:
        k_cache[unread[0], :unread[1]], v_cache[unread[0], :unread[1]] = math.nan, math.nan
    q = torch.randn(len(lengths), Sq, H, d, generator=generator).to(dtype)
    k, v = (torch.stack([s[i][n:] for s, n in zip(sequences, cached)]) for i in range(2)) if new else (None, None)
    expected = after_append((k_cache, v_cache), k, v, cached, block_table, range(len(cached)) if new else [], pads)
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    on_device, official = split_options(options, device)
    k_cache, v_cache = to(k_cache), to(v_cache)
    if strided:
        k_cache, v_cache = relaid(k_cache), relaid(v_cache)
    seqlens = [n + (pads[b] if pads else 0) for b, n in enumerate(cached)]  # cache_seqlens count the pad
    out, lse = mf.flash_attn_with_kvcache(to(q), k_cache, v_cache, to(k), to(v),
                                          cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
                                          cache_leftpad=None if pads is None else torch.tensor(pads, dtype=torch.int32,
                                                                                               device=device),
                                          block_table=to(block_table), causal=causal, num_splits=splits,
                                          return_softmax_lse=True, **on_device)
    for name, cache, want in (("k_cache", k_cache, expected[0]), ("v_cache", v_cache, expected[1])):
        assert torch.equal(bits(cache.cpu()), bits(want)), f"{name}: a new row is wrong, or another row changed"

    mods = dense_mods(options, H) if "score_mod" in options else None
    out_ref, lse_ref, plain = reference(q, sequences, causal, d ** -0.5, mods=mods, **official)
    out, lse = out.cpu(), lse.cpu()
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (len(lengths), H, Sq)
    empty = torch.isinf(lse_ref)  # (B, H, Sq): rows that see no key
    assert torch.equal(out.transpose(1, 2)[empty], torch.zeros_like(out.transpose(1, 2)[empty])), "empty rows: out 0"
    assert torch.equal(lse[empty], lse_ref[empty].float()), "empty rows: lse -inf"
    seen = ~empty.transpose(1, 2)  # (B, Sq, H)
    assert seen.any()
    atol = 3e-4 if options.get("softcap") else 0.0  # the official tests' slack with softcap (tests/test_mods.py)
    assert_close("out", out[seen], out_ref[seen], plain[seen], atol)
    assert_close("lse", lse[~empty], lse_ref[~empty])


def relaid(cache):
    """The same cache (pages, page, Hk, d) in place in a NaN buffer (pages, Hk, page + 3, d + 8), a view:
    rows d + 8 values apart, heads (page + 3)(d + 8), pages Hk (page + 3)(d + 8), as a transposed
    (batch, nheads_k, seqlen, d) cache lies (transformers'), with gaps. A kernel that took the rows for
    contiguous ones would read NaN or another row."""
    P, S, Hk, d = cache.shape
    buffer = torch.full((P, Hk, S + 3, d + 8), math.nan, dtype=cache.dtype, device=cache.device)
    view = buffer[:, :, :S, :d].transpose(1, 2)
    view.copy_(cache)
    head = (S + 3) * (d + 8) if Hk > 1 else 0  # (one head: its stride is never used)
    assert not view.is_contiguous() and mf._cache_strides(view) == (d + 8, head, Hk * (S + 3))
    return view


# Caches read where they lie, at other strides than contiguous (relaid): contiguous and paged, new keys
# appended into the views, 16- and 64-row blocks, split and not, a head dim between the kernels'.
RELAID = [CASES[0], CASES[2], CASES[4], CASES[5], CASES[15], CASES[16]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("Sq,H,Hk,d,cached,new,causal,splits,page,dtype", RELAID,
                         ids=[CASE_IDS[CASES.index(c)] for c in RELAID])
def test_a_strided_cache_is_read_and_written_in_place(device, Sq, H, Hk, d, cached, new, causal, splits, page,
                                                      dtype, generator, poisoned):
    check_against_float64(device, Sq, H, Hk, d, cached, new, causal, splits, page, dtype, generator, strided=True)


def dense_mods(options, H):
    """OPTIONS' score_mod-mask_mod written out: (bias, keep) of sequence b, (H, Sq, L_b)."""
    table = options["mod_tensors"]["table"]

    def mods(b, Sq, L):
        i, j, h = torch.arange(Sq)[:, None], torch.arange(L)[None, :], torch.arange(H)[:, None, None]
        return table[b][:, None, None].double() * 0.1 * (i + L - Sq - j), (i + 2 * j + b + h) % 5 != 1
    return mods


def test_num_splits_heuristic_fills_one_wave():
    """Splits: as many as fill the slots (132 multiprocessors x 2 blocks on an H200) in one wave, at most
    one per key tile and 128; 1 when the grid fills them already; none that would get no tile."""
    assert mf.num_splits_heuristic(8, 264, 512) == 32  # batch 1, 8 kv heads, 32k keys: 33 fit, the 33rd empty
    assert mf.num_splits_heuristic(8, 264, 100) == 25  # 33 fit: 4 tiles each, 25 splits take them all
    assert mf.num_splits_heuristic(64, 264, 256) == 4  # batch 8, 16k: 256 of 264 (5 would be 2 waves)
    assert mf.num_splits_heuristic(8, 264, 16) == 16  # 1k keys: one split per tile
    assert mf.num_splits_heuristic(1, 1000, 4096) == 128  # at most 128
    assert mf.num_splits_heuristic(512, 264, 64) == 1  # batch 64: two waves already
    assert mf.num_splits_heuristic(0, 264, 0) == 1


def test_one_block_to_a_multiprocessor_at_d_256(monkeypatch):
    """The heuristic counts 2 blocks to a multiprocessor for 16-row blocks up to d = 128 and 1 at d = 256,
    whose three buffers of K and V (192 KB) leave room for one: batch 1, 8 kv heads, 32k keys on 132
    multiprocessors, 32 splits at d = 128 and 16 at d = 256; with 64-row blocks (5 positions of a group of
    8), 16 at both."""
    monkeypatch.setattr(mf, "_parallel_units", lambda device: 132)
    for Sq, d, splits in ((1, 128, 32), (1, 256, 16), (5, 128, 16), (5, 256, 16)):
        assert mf._decode_splits(0, torch.zeros(1, Sq, 32, d), 8, 32768) == splits, (Sq, d)


def test_a_window_splits_its_band(monkeypatch):
    """With a window alone the splits are chosen for the keys the rows read (the kernels' band: left +
    seqlen_q + right, causal: right 0), not for the whole cache: at 32k keys and a window of 100, about two
    tiles, not 512."""
    seen, choose = [], mf._decode_splits
    monkeypatch.setattr(mf, "_decode_splits", lambda *a: seen.append(a[-1]) or choose(*a))
    q, k_cache, v_cache = small_inputs(Sq=2, S=32768)
    for options in (dict(causal=True, window_size=(100, 5)), dict(window_size=(100, 5)), dict(window_size=(100, -1)),
                    dict(softcap=2.0), {}):
        mf.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=3, **options)
    assert seen == [102, 107, 32768, 32768, 32768]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("page", [None, 16])
def test_a_window_side_as_long_as_the_cache_is_no_side(device, page, generator):
    """As the official package has it, a window_size side of at least the cache's rows per sequence (its
    seqlen_k: seqlen_cache, or max_blocks_per_seq x page_block_size paged; here 48) is no limit, -1. It
    matters where there are more queries than the side: measured from the bottom right, a right side of
    48 would hide from 64 queries' first rows the keys past i + L_b - 64 + 48, a sequence's last 16 from
    row 0 (of 9 keys, all: its first rows would see none). So against float64 attention without that
    side; and with a side of 47, which stays one and leaves those rows no key."""
    Sq, H, Hk, d, cached, capacity = 64, 4, 2, 64, [30, 9], 48
    sequences = dense_sequences(cached, Hk, d, torch.bfloat16, generator)
    (k_cache, v_cache), block_table = build_cache(sequences, cached, capacity, page, torch.bfloat16, generator)
    q = torch.randn(len(cached), Sq, H, d, generator=generator).bfloat16()
    seqlens = torch.tensor(cached, dtype=torch.int32, device=device)
    for window, meant in (((-1, 48), (-1, -1)), ((48, 1000), (-1, -1)), ((-1, 47), (-1, 47)), ((5, 48), (5, -1))):
        out, lse = mf.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device),
                                              cache_seqlens=seqlens, window_size=window, return_softmax_lse=True,
                                              block_table=None if page is None else block_table.to(device))
        out_ref, lse_ref, plain = reference(q, sequences, False, d ** -0.5, window_size=meant)
        seen = torch.isfinite(lse_ref)
        assert (window[1] == 47) == bool((~seen).any()), window
        assert torch.equal(lse.cpu().isfinite(), seen), window
        assert_close("out", out.cpu(), out_ref, plain)
        assert_close("lse", lse.cpu()[seen], lse_ref[seen])


@pytest.mark.parametrize("device", DEVICES)
def test_no_new_keys_leave_the_cache_alone_and_seqlens_default_to_the_whole_cache(device, generator):
    """k = v = None: nothing is written; cache_seqlens None: every sequence has the whole cache; an int:
    each has that many keys."""
    sequences = dense_sequences([70, 70], 2, 64, torch.bfloat16, generator)
    (k_cache, v_cache), _ = build_cache(sequences, [70, 70], 70, None, torch.bfloat16, generator)
    q = torch.randn(2, 1, 4, 64, generator=generator).bfloat16()
    before = k_cache.clone(), v_cache.clone()
    out_ref, _, plain = reference(q, sequences, False, 0.125)
    out = mf.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device)).cpu()
    assert_close("out", out, out_ref, plain)
    out_ref, _, plain = reference(q, [[t[:40] for t in s] for s in sequences], False, 0.125)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    out = mf.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, cache_seqlens=40).cpu()
    assert_close("out", out, out_ref, plain)
    # numpy numbers, as the official package takes them: the same as Python's
    assert torch.equal(mf.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, cache_seqlens=np.int64(40),
                                                  num_splits=np.int32(2)).cpu(),
                       mf.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, cache_seqlens=40, num_splits=2).cpu())
    assert torch.equal(bits(k_cache.cpu()), bits(before[0])) and torch.equal(bits(v_cache.cpu()), bits(before[1]))


def small_inputs(B=2, Sq=1, H=4, Hk=2, d=64, S=32, dtype=torch.bfloat16):
    """q, k_cache, v_cache of zeros: for the refusals, which come before anything is computed."""
    return torch.zeros(B, Sq, H, d, dtype=dtype), *(torch.zeros(B, S, Hk, d, dtype=dtype) for _ in range(2))


def paged_inputs():
    q, _, _ = small_inputs()
    k_cache, v_cache = (torch.zeros(6, 16, 2, 64, dtype=torch.bfloat16) for _ in range(2))
    return q, k_cache, v_cache, torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)


def refuse(error, match, *inputs, **options):
    with pytest.raises(error, match=match):
        mf.flash_attn_with_kvcache(*inputs, **options)


# cache_leftpad: sequences of a left-padded batch, their keys from row pads[b] of their cache (the rows
# before it NaN: one read makes out NaN): pads off the 64-key tile and, paged, off the page (a pad of
# whole pages, one that ends mid-page, tiles that straddle pages), a pad with no key after it (out 0,
# lse -inf) and one whose only keys are the new ones; causal and a window then count positions from
# the pad; splits 1, 2 and 7.
LEFTPAD = {
    "contiguous-causal": ((3, 8, 2, 64, [62, 297, 2, 0], 3, True, 7, None, torch.bfloat16), [5, 64, 130, 9], {}),
    "page48-window": ((1, 8, 1, 128, [100, 40, 0], 1, True, 2, 48, torch.float16), [96, 70, 3],
                      dict(window_size=(40, 0))),
    "page80-empty": ((2, 4, 4, 64, [130, 0, 65], 0, False, 1, 80, torch.bfloat16), [17, 50, 80], {}),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(LEFTPAD))
def test_cache_leftpad(device, name, generator, poisoned):
    case, pads, options = LEFTPAD[name]
    check_against_float64(device, *case, generator, pads=pads, **options)


def test_bad_cache_leftpad_is_refused():
    q, k_cache, v_cache = small_inputs()
    pad = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    seqlens = pad(10, 3)
    refuse(ValueError, r"cache_leftpad\[1\] = 4: sequence 1's keys start there, so it must be in 0 \.\. "
                       r"cache_seqlens\[1\] = 3", q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=pad(0, 4))
    refuse(ValueError, r"cache_leftpad\[0\] = -1", q, k_cache, v_cache, cache_seqlens=seqlens, cache_leftpad=pad(-1, 0))
    refuse(ValueError, "cache_leftpad: its dtype is torch.int64, not torch.int32", q, k_cache, v_cache,
           cache_seqlens=seqlens, cache_leftpad=pad(0, 1).long())
    refuse(ValueError, r"cache_leftpad: its shape is \(3,\), not \(batch = 2,\)", q, k_cache, v_cache,
           cache_seqlens=seqlens, cache_leftpad=pad(0, 1, 2))
    refuse(ValueError, "cache_leftpad: it is on meta, q on cpu", q, k_cache, v_cache, cache_seqlens=seqlens,
           cache_leftpad=pad(0, 1).to("meta"))
    refuse(TypeError, "cache_leftpad must be a torch.Tensor", q, k_cache, v_cache, cache_leftpad=[0, 1])


@pytest.mark.parametrize("device", DEVICES)
def test_cache_batch_idx_picks_the_entries(device, generator):
    """cache_batch_idx: sequence b uses entry cache_batch_idx[b] of a cache of 5 entries (a server's slots),
    k, v appended there; out and lse to the bit those of the same call on the picked entries gathered into
    a cache of their own (the same tiles in the same order), the new rows in the picked entries, the other
    entries untouched."""
    q = torch.randn(3, 2, 4, 64, generator=generator).to(torch.bfloat16).to(device)
    k_cache, v_cache = (torch.randn(5, 200, 2, 64, generator=generator).to(torch.bfloat16).to(device) for _ in range(2))
    k, v = (torch.randn(3, 2, 2, 64, generator=generator).to(torch.bfloat16).to(device) for _ in range(2))
    idx, lengths = torch.tensor([4, 0, 2], dtype=torch.int32), torch.tensor([150, 7, 65], dtype=torch.int32)
    gathered = [c[idx.long().to(device)].clone() for c in (k_cache, v_cache)]
    before = k_cache.clone(), v_cache.clone()
    out, lse = mf.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lengths.to(device),
                                          cache_batch_idx=idx.to(device), causal=True, num_splits=2,
                                          return_softmax_lse=True)
    out_ref, lse_ref = mf.flash_attn_with_kvcache(q, *gathered, k, v, cache_seqlens=lengths.to(device), causal=True,
                                                  num_splits=2, return_softmax_lse=True)
    assert torch.equal(out, out_ref) and torch.equal(lse, lse_ref)
    for cache, ref, old in zip((k_cache, v_cache), gathered, before):
        assert torch.equal(cache[idx.long().to(device)], ref), "the new rows land in the picked entries"
        assert torch.equal(cache[[1, 3]], old[[1, 3]]), "the other entries are untouched"


def test_bad_cache_batch_idx_is_refused():
    q, k_cache, v_cache = small_inputs()
    entries = torch.zeros(5, 32, 2, 64, dtype=torch.bfloat16)
    new = torch.ones(2, 1, 2, 64, dtype=torch.bfloat16)
    pick = lambda *x: torch.tensor(x, dtype=torch.int32)  # noqa: E731
    refuse(ValueError, r"cache_batch_idx\[1\] = 5: the cache has entries 0 .. 4", q, entries, entries,
           cache_batch_idx=pick(0, 5))
    refuse(ValueError, r"cache_batch_idx\[1\] = 3 is also sequence 0's: both would append", q, entries, entries.clone(),
           new, new, cache_seqlens=3, cache_batch_idx=pick(3, 3))
    refuse(ValueError, "cache_batch_idx: its dtype is torch.int64", q, entries, entries,
           cache_batch_idx=pick(0, 1).long())
    refuse(ValueError, r"cache_batch_idx: its shape is \(3,\), not \(batch = 2,\)", q, entries, entries,
           cache_batch_idx=pick(0, 1, 2))
    refuse(ValueError, "cache_batch_idx: block_table is given too", *paged_inputs()[:3], cache_batch_idx=pick(0, 1),
           block_table=paged_inputs()[3])
    # the same entry twice without new keys: both read it
    out = mf.flash_attn_with_kvcache(q, entries, entries, cache_seqlens=3, cache_batch_idx=pick(3, 3))
    assert out.shape == q.shape


def turned(x, cos, sin, positions, interleaved):
    """The rotary embedding in float64, written as complex numbers: pairs (2i, 2i + 1) interleaved, else (i,
    i + rotary_dim / 2), of x (B, S, heads, d) times exp(i angle) at `positions` (B, S)."""
    r = 2 * cos.shape[1]
    x = x.double()
    pairs = (x[..., :r].unflatten(-1, (r // 2, 2)) if interleaved else
             torch.stack((x[..., :r // 2], x[..., r // 2:r]), -1))
    z = torch.view_as_complex(pairs.contiguous()) * torch.complex(cos.double(), sin.double())[positions][:, :, None]
    z = torch.view_as_real(z)
    return torch.cat((z.flatten(-2) if interleaved else torch.cat((z[..., 0], z[..., 1]), -1), x[..., r:]), -1)


# (interleaved, causal, rotary_dim, leftpad, window_size); the windows, over a cache of 120 rows, hide no
# key: (119, -1) is local all the same (the queries' positions step), (120, -1) and (-1, 500) are no window
# (as in the official package, a side as long as the cache or longer is none).
ROTARY = [(True, True, 64, False, None), (False, False, 32, False, None), (True, False, 32, True, None),
          (False, True, 64, True, None), (True, False, 64, False, (119, -1)), (False, False, 32, True, (120, -1)),
          (True, False, 32, False, (-1, 500))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("interleaved,causal,rotary_dim,leftpad,window", ROTARY, ids=[
    f"{'interleaved' if i else 'neox'}-{'causal' if c else 'full'}-dim{r}{'-leftpad' if p else ''}"
    f"{f'-window{w[0]},{w[1]}' if w else ''}" for i, c, r, p, w in ROTARY])
def test_rotary_embedding(device, interleaved, causal, rotary_dim, leftpad, window, generator):
    """rotary_cos, rotary_sin: q and the new keys turned as the official package turns them (the new keys
    at cache_seqlens[b] + i; the queries there too if causal or local, else all at cache_seqlens[b]; with
    cache_leftpad, these are still rows of the cache, the pad counted), against float64 attention on
    inputs turned here; the cache's new rows those turned keys, within a bf16 step."""
    B, Sq, H, Hk, d, C = 3, 3, 4, 2, 64, 120
    q = torch.randn(B, Sq, H, d, generator=generator).to(torch.bfloat16)
    cached, pads = [60, 7, 0], [5, 0, 40] if leftpad else [0, 0, 0]
    sequences = dense_sequences([n + Sq for n in cached], Hk, d, torch.bfloat16, generator)
    (k_cache, v_cache), _ = build_cache(sequences, cached, C, None, torch.bfloat16, generator, pads)
    k, v = (torch.stack([s[i][n:] for s, n in zip(sequences, cached)]) for i in range(2))
    angles = torch.arange(C)[:, None] * torch.rand(rotary_dim // 2, generator=generator)[None, :]
    cos, sin = angles.cos().to(torch.bfloat16), angles.sin().to(torch.bfloat16)
    seqlens = torch.tensor(cached, dtype=torch.int32) + torch.tensor(pads, dtype=torch.int32)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    out = mf.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, k.to(device), v.to(device),
                                     rotary_cos=cos.to(device), rotary_sin=sin.to(device),
                                     cache_seqlens=seqlens.to(device), causal=causal, rotary_interleaved=interleaved,
                                     cache_leftpad=torch.tensor(pads, dtype=torch.int32, device=device),
                                     window_size=window or (-1, -1))
    positions = seqlens.long()[:, None] + torch.arange(Sq)
    k_turned = turned(k, cos, sin, positions, interleaved)
    steps = causal or (window is not None and any(0 <= side < C for side in window))
    q_turned = turned(q, cos, sin, positions if steps else positions[:, :1].expand(B, Sq), interleaved)
    new_rows = torch.stack([k_cache[b, n:n + Sq].cpu() for b, n in enumerate(seqlens.tolist())]).double()
    assert torch.allclose(new_rows, k_turned, rtol=2 ** -7, atol=1e-5), "the cache's new rows: the keys turned"
    turned_sequences = [[torch.cat((K[:n], k_turned[b].to(K.dtype))), V] for b, ((K, V), n) in
                        enumerate(zip(sequences, cached))]
    out_ref, _, plain = reference(q_turned.to(q.dtype), turned_sequences, causal, d ** -0.5, window or (-1, -1))
    assert_close("out", out.cpu(), out_ref, plain)


def test_bad_rotary_tables_are_refused():
    q, k_cache, v_cache = small_inputs()
    new = torch.ones(2, 1, 2, 64, dtype=torch.bfloat16)
    table = torch.zeros(40, 16, dtype=torch.bfloat16)
    refuse(ValueError, "rotary_cos, rotary_sin without k, v", q, k_cache, v_cache, rotary_cos=table, rotary_sin=table)
    refuse(ValueError, "rotary_sin: its dtype is torch.float32, q's torch.bfloat16", q, k_cache, v_cache, new, new,
           rotary_cos=table, rotary_sin=table.float(), cache_seqlens=3)
    refuse(ValueError, r"rotary_cos: its shape is \(40, 12\), not \(seqlen_ro, rotary_dim / 2\)", q, k_cache, v_cache,
           new, new, rotary_cos=table[:, :12], rotary_sin=table[:, :12], cache_seqlens=3)
    refuse(ValueError, "rotary_cos, rotary_sin have 20 positions, and position 20 is embedded", q, k_cache, v_cache,
           new, new, rotary_cos=table[:20], rotary_sin=table[:20], cache_seqlens=20)
    refuse(TypeError, "rotary_interleaved = 1: it must be True or False", q, k_cache, v_cache, rotary_interleaved=1)
    assert (k_cache == 0).all()


def test_bad_mods_are_refused_before_the_cache_is_written():
    """The mods are checked as flash_attention checks them (alibi_slopes (H,) or (B, H)), and before k, v
    are appended: a refused call leaves the cache as it was."""
    q, k_cache, v_cache = small_inputs()
    new = torch.ones(2, 1, 2, 64, dtype=torch.bfloat16)
    refuse(ValueError, r"alibi_slopes .* shape \(3,\), on cpu\): it must be float32, of shape \(H,\) = \(4,\) or "
           r"\(B, H\) = \(2, 4\)", q, k_cache, v_cache, new, new, cache_seqlens=3, alibi_slopes=torch.zeros(3))
    refuse(ValueError, "window_size = 8: it must be", q, k_cache, v_cache, new, new, cache_seqlens=3, window_size=8)
    refuse(TypeError, "mask_mod = 3: it must be", q, k_cache, v_cache, new, new, cache_seqlens=3, mask_mod=3)
    assert (k_cache == 0).all() and (v_cache == 0).all()


def test_bad_tensors_are_refused():
    q, k_cache, v_cache = small_inputs()
    refuse(TypeError, "q has dtype torch.float32; the decode kernels .* take bfloat16 and float16",
           *small_inputs(dtype=torch.float32))
    for d in (100, 264):
        refuse(ValueError, f"head dim d = {d}: the decode kernels .* a multiple of 8 up to 256", *small_inputs(d=d))
    refuse(ValueError, "nheads_k dividing q's nheads = 6", *small_inputs(H=6, Hk=4))
    refuse(TypeError, "k_cache has dtype torch.float16, q torch.bfloat16", q, k_cache.half(), v_cache)
    refuse(ValueError, "v_cache is on meta, q on cpu", q, k_cache, v_cache.to("meta"))
    refuse(ValueError, "k without v", q, k_cache, v_cache, k_cache[:, :1])
    refuse(ValueError, "v without k", q, k_cache, v_cache, v=v_cache[:, :1])
    refuse(ValueError, "k and v must have shape", q, k_cache, v_cache, k_cache[:, :1, :1], v_cache[:, :1, :1])
    # Strides the kernel cannot read in place (a copy would take the new keys, and the caller's cache would
    # not): columns apart, rows 4 values apart (8 bytes), a start off 16 bytes; k_cache and v_cache apart.
    columns = torch.zeros(2, 32, 2, 128, dtype=torch.bfloat16)[..., ::2]
    refuse(ValueError, "must have each row's d values contiguous.*k_cache: its last dim is not contiguous", q, columns,
           v_cache)
    rows = torch.zeros(2, 32, 2, 68, dtype=torch.bfloat16)[..., :64]
    refuse(ValueError, "a multiple of 16 bytes apart.*v_cache: its rows, heads or pages are not so", q, k_cache, rows)
    start = torch.zeros(2 * 32 * 2 * 64 + 4, dtype=torch.bfloat16)[4:].view(2, 32, 2, 64)
    refuse(ValueError, "k_cache: it does not start at a 16-byte-aligned address", q, start, v_cache)
    # Rows the kernel would count past 32 bits (meta: shapes and strides, no memory): refused, not wrapped.
    assert "reach 2^31" in mf._cache_problem(torch.empty(3, 2 ** 30, 1, 8, dtype=torch.bfloat16, device="meta"))
    assert mf._cache_problem(torch.empty(2, 2 ** 30 - 1, 1, 8, dtype=torch.bfloat16, device="meta")) is None
    heads_outside = torch.zeros(2, 2, 32, 64, dtype=torch.bfloat16).transpose(1, 2)
    refuse(ValueError, r"k_cache and v_cache must lie alike: strides \(4096, 64, 2048, 1\) and \(4096, 128, 64, 1\)",
           q, heads_outside, v_cache)
    refuse(ValueError, "seqlen_q = 0", q[:, :0], k_cache, v_cache)


def test_out_of_range_seqlens_and_pages_are_refused():
    q, k_cache, v_cache = small_inputs()
    new = k_cache[:, :3].clone(), v_cache[:, :3].clone()
    refuse(ValueError, r"cache_seqlens = 30: with seqlen_new = 3 new keys, a sequence would have 33, outside the "
                       r"cache's 0 \.\. 32", q, k_cache, v_cache, *new, cache_seqlens=30)
    refuse(ValueError, r"cache_seqlens\[1\] = 30: .* sequence 1 would have 33", q, k_cache, v_cache, *new,
           cache_seqlens=torch.tensor([29, 30], dtype=torch.int32))
    refuse(ValueError, r"cache_seqlens\[0\] = -1", q, k_cache, v_cache,
           cache_seqlens=torch.tensor([-1, 3], dtype=torch.int32))
    # None: full
    refuse(ValueError, "with seqlen_new = 3 new keys, a sequence would have 35", q, k_cache, v_cache, *new)
    refuse(TypeError, "cache_seqlens has dtype torch.int64", q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2]))
    q, k_cache, v_cache, table = paged_inputs()
    table[1, 1] = 6  # a page past the pool's 6
    refuse(ValueError, r"block_table\[1, 1\] = 6: sequence 1 uses that entry, and the cache has pages 0 \.\. 5",
           q, k_cache, v_cache, cache_seqlens=torch.tensor([40, 17], dtype=torch.int32), block_table=table)
    refuse(TypeError, "block_table has dtype torch.int64", q, k_cache, v_cache, block_table=table.long())
    # An entry past the pages a sequence uses is never read: not an error (sequence 1 uses 1 page), and the
    # answer is the bits of the same call with that entry a page of the pool (random q and caches).
    q, k_cache, v_cache = (torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).bfloat16()
                           for t in (q, k_cache, v_cache))
    call = lambda table: mf.flash_attn_with_kvcache(  # noqa: E731
        q, k_cache, v_cache, cache_seqlens=torch.tensor([40, 16], dtype=torch.int32), block_table=table)
    valid = table.clone()
    valid[1, 1] = 0
    assert torch.equal(call(table), call(valid))


@pytest.mark.parametrize("device", DEVICES)
def test_the_host_checks_read_seqlens_leftpad_and_table_where_they_lie(device, generator):
    """cache_seqlens, cache_leftpad and block_table on the call's device, copied to the host for the checks:
    each error names the entry that is wrong; with all three right, the answer is float64 attention's over
    each sequence's keys (37 from row 3, 16 from row 17: a sequence's first page holds none of its keys)."""
    q, k_cache, v_cache, table = (t.to(device) for t in paged_inputs())
    ints = lambda *x: torch.tensor(x, dtype=torch.int32, device=device)  # noqa: E731
    refuse(ValueError, r"cache_seqlens\[1\] = 49: .* sequence 1 would have 49, outside the cache's 0 \.\. 48", q,
           k_cache, v_cache, cache_seqlens=ints(40, 49), cache_leftpad=ints(0, 1), block_table=table)
    refuse(ValueError, r"cache_leftpad\[1\] = 18: .* cache_seqlens\[1\] = 17", q, k_cache, v_cache,
           cache_seqlens=ints(40, 17), cache_leftpad=ints(3, 18), block_table=table)
    bad = table.clone()
    bad[1, 2] = 6
    refuse(ValueError, r"block_table\[1, 2\] = 6: sequence 1 uses that entry", q, k_cache, v_cache,
           cache_seqlens=ints(40, 33), cache_leftpad=ints(3, 17), block_table=bad)
    sequences = dense_sequences([37, 16], 2, 64, torch.bfloat16, generator)
    (k_cache, v_cache), table = build_cache(sequences, [37, 16], 48, 16, torch.bfloat16, generator, pads=[3, 17])
    q = torch.randn(2, 1, 4, 64, generator=generator).bfloat16()
    out = mf.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device), cache_seqlens=ints(40, 33),
                                     cache_leftpad=ints(3, 17), block_table=table.to(device))
    out_ref, _, plain = reference(q, sequences, False, 0.125)
    assert_close("out", out.cpu(), out_ref, plain)


def test_appends_that_would_share_a_row_are_refused(generator):
    """Two sequences' block tables may share a page (a prompt's, read by both), and append to rows of their
    own; two new keys bound for one row (whichever lands last would win: the other lost) are refused,
    between sequences and within one (its table listing a page twice), before anything is written. So is
    one tensor given as both k_cache and v_cache with new keys (the values would overwrite the keys)."""
    q = torch.randn(2, 1, 4, 64, generator=generator).bfloat16()
    k_cache, v_cache = (torch.randn(6, 16, 2, 64, generator=generator).bfloat16() for _ in range(2))
    new, new_v = (torch.randn(2, 2, 2, 64, generator=generator).bfloat16() for _ in range(2))
    seqlens = torch.tensor([16, 20], dtype=torch.int32)
    shared = torch.tensor([[0, 1, 2], [0, 3, 4]], dtype=torch.int32)  # page 0 read by both, rows 16 on apart
    def rows(cache, added, b):  # sequence b's: page 0's 16 (both), page 3's first 4 (sequence 1), its 2 new
        return torch.cat((cache[0], cache[3, :4], added[1]) if b else (cache[0], added[0]))
    sequences = [[rows(k_cache, new, b), rows(v_cache, new_v, b)] for b in range(2)]  # (before the call)
    out = mf.flash_attn_with_kvcache(q, k_cache, v_cache, new, new_v, cache_seqlens=seqlens, block_table=shared)
    for cache, added in ((k_cache, new), (v_cache, new_v)):
        assert torch.equal(cache[1, :2], added[0]) and torch.equal(cache[3, 4:6], added[1])
    out_ref, _, plain = reference(q, sequences, False, 0.125)
    assert_close("out", out, out_ref, plain)
    many = torch.randn(2, 17, 2, 64, generator=generator).bfloat16()
    for table, keys, lengths, match in (
            ([[0, 1, 2], [0, 1, 4]], new, [16, 15], "new key 0 of sequence 0 and new key 1 of sequence 1 would both "
                                                    "be written to row 0 of page 1"),
            ([[0, 1, 2], [5, 5, 4]], many, [0, 0], "new key 0 of sequence 1 and new key 16 of sequence 1 .* row 0 "
                                                   "of page 5")):
        before = k_cache.clone()
        refuse(ValueError, match, q, k_cache, v_cache, keys, keys, cache_seqlens=torch.tensor(lengths).int(),
               block_table=torch.tensor(table).int())
        assert torch.equal(k_cache, before)
    refuse(ValueError, "k_cache and v_cache are one tensor", q, k_cache, k_cache, new, new, cache_seqlens=3,
           block_table=shared)
    assert torch.isfinite(out).all() and torch.equal(  # one tensor read as both, with no new key: fine
        mf.flash_attn_with_kvcache(q, k_cache, k_cache, cache_seqlens=3, block_table=shared),
        mf.flash_attn_with_kvcache(q, k_cache, k_cache.clone(), cache_seqlens=3, block_table=shared))


def test_appends_into_caches_that_share_memory(generator):
    """A cache written in place must give each place memory of its own: an expanded one (its heads, or a
    sequence's rows, at one address: one head's new key would be read as the other's), or a k_cache and a
    v_cache that overlap (views of one buffer, one shifted by a row), are refused with new keys, nothing
    written; read as they are, both are fine. Keys and values packed in one buffer side by side (k_cache,
    v_cache = kv[:, :, 0], kv[:, :, 1]) share no element: taken, and the new rows land in their halves."""
    q = torch.randn(2, 1, 4, 64, generator=generator).bfloat16()
    new, new_v = (torch.randn(2, 1, 2, 64, generator=generator).bfloat16() for _ in range(2))
    one_head, one_row = (torch.randn(2, n, 1, 64, generator=generator).bfloat16() for n in (40, 1))
    buffer = torch.randn(2, 41, 2, 64, generator=generator).bfloat16()
    for k_cache, v_cache, match in (
            (one_head.expand(2, 40, 2, 64), one_head.clone().expand(2, 40, 2, 64), "k_cache is written in place .* and "
                                                                                   "elements of it share memory"),
            (one_row.expand(2, 40, 2, 64)[:1], one_row.clone().expand(2, 40, 2, 64)[:1], "k_cache is written"),
            (buffer[:, :40], buffer[:, 1:], "k_cache and v_cache share memory")):
        B = len(k_cache)
        before = (k_cache.clone(), v_cache.clone())
        refuse(ValueError, match, q[:B], k_cache, v_cache, new[:B], new_v[:B], cache_seqlens=7)
        assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
        sequences = [[k_cache[b, :7].clone(), v_cache[b, :7].clone()] for b in range(B)]
        out = mf.flash_attn_with_kvcache(q[:B], k_cache, v_cache, cache_seqlens=7)  # read only: fine
        out_ref, _, plain = reference(q[:B], sequences, False, 0.125)
        assert_close("out", out, out_ref, plain)
    kv = torch.randn(2, 40, 2, 2, 64, generator=generator).bfloat16()  # (batch, rows, k or v, nheads_k, d)
    sequences = [[torch.cat((kv[b, :7, 0], new[b])), torch.cat((kv[b, :7, 1], new_v[b]))] for b in range(2)]
    out = mf.flash_attn_with_kvcache(q, kv[:, :, 0], kv[:, :, 1], new, new_v, cache_seqlens=7)
    assert torch.equal(kv[:, 7, 0], new[:, 0]) and torch.equal(kv[:, 7, 1], new_v[:, 0])
    out_ref, _, plain = reference(q, sequences, False, 0.125)
    assert_close("out", out, out_ref, plain)


def test_shared_memory_found_as_by_listing_every_address():
    """_shares_memory against the addresses themselves, listed, over random small layouts (strides that do
    not nest, zeros among them) and offsets of b from a either way."""
    rng = np.random.default_rng(5)
    base = torch.zeros(4000)
    for _ in range(2000):
        shape, strides = rng.integers(1, 6, 4).tolist(), rng.integers(0, 41, 4).tolist()
        a, b = (base.as_strided(shape, strides, int(offset)) for offset in rng.integers(0, 81, 2))
        addresses = [sum(i * s for i, s in zip(index, strides)) for index in np.ndindex(*shape)]
        apart = b.data_ptr() // 4 - a.data_ptr() // 4
        assert bool(mf._shares_memory(a)) == (len(set(addresses)) < len(addresses))
        assert bool(mf._shares_memory(a, b)) == bool(set(addresses) & {x + apart for x in addresses})
    assert mf._shares_memory(base[:8], torch.zeros(8)) == ""  # another tensor's memory


@pytest.mark.parametrize("device", DEVICES)
def test_caches_of_no_row_and_batches_of_none(device):
    """Pages of 0 rows (and entries of 0 rows, picked by cache_batch_idx): no key, so out 0 and lse -inf,
    the table never looked at (an entry past the pool is not used); an entry that is not one still
    refused. A batch of 0 sequences appending to a paged cache, or through cache_batch_idx: an empty out."""
    q = torch.randn(2, 1, 4, 64).bfloat16().to(device)
    empty = torch.zeros(3, 0, 2, 64, dtype=torch.bfloat16, device=device)
    table = torch.tensor([[0, 7], [1, 2]], dtype=torch.int32, device=device)
    for options in (dict(block_table=table), dict(cache_batch_idx=torch.tensor([2, 0], dtype=torch.int32,
                                                                               device=device))):
        out, lse = mf.flash_attn_with_kvcache(q, empty, empty, cache_seqlens=0, return_softmax_lse=True, **options)
        assert not out.any() and (lse == -math.inf).all()
    refuse(ValueError, r"cache_batch_idx\[0\] = 3: the cache has entries 0 .. 2", q, empty, empty, cache_seqlens=0,
           cache_batch_idx=torch.tensor([3, 0], dtype=torch.int32, device=device))
    k_cache, v_cache = (torch.zeros(4, 16, 2, 64, dtype=torch.bfloat16, device=device) for _ in range(2))
    new = torch.ones(0, 1, 2, 64, dtype=torch.bfloat16, device=device)
    for options in (dict(block_table=torch.zeros(0, 2, dtype=torch.int32, device=device)),
                    dict(cache_batch_idx=torch.zeros(0, dtype=torch.int32, device=device))):
        out = mf.flash_attn_with_kvcache(q[:0], k_cache, v_cache, new, new, cache_seqlens=3, **options)
        assert out.shape == (0, 1, 4, 64) and not k_cache.any()


def test_the_append_is_outside_autograd():
    """The new keys are written into the caches as the official kernel writes them, outside autograd: a k
    that requires grad leaves the caches without a graph; a cache made under torch.inference_mode, or
    one that requires grad, takes the write (torch refuses an in-place write to either, tracked)."""
    q, _, _ = small_inputs()
    new = torch.ones(2, 1, 2, 64, dtype=torch.bfloat16, requires_grad=True)
    with torch.inference_mode():
        made_there = torch.zeros(2, 32, 2, 64, dtype=torch.bfloat16)
    for cache in (torch.zeros(2, 32, 2, 64, dtype=torch.bfloat16), made_there,
                  torch.zeros(2, 32, 2, 64, dtype=torch.bfloat16, requires_grad=True)):
        mf.flash_attn_with_kvcache(q, cache, cache.detach().clone(), new * 2, new, cache_seqlens=3)
        assert cache.grad_fn is None and (cache[:, 3] == 2).all() and not cache[:, 4:].any()


def test_num_splits_must_be_0_to_128():
    refuse(ValueError, "num_splits = -1: 0 .*, or 1 to 128", *small_inputs(), num_splits=-1)
    refuse(ValueError, "num_splits = 129", *small_inputs(), num_splits=129)
    refuse(TypeError, "num_splits = 1.5: it must be a whole number", *small_inputs(), num_splits=1.5)
    refuse(TypeError, "return_softmax_lse = 1: it must be True or False", *small_inputs(), return_softmax_lse=1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
def test_a_misuse_the_host_does_not_check_gives_nan(device, paged, splits, generator, monkeypatch):
    """While a CUDA graph is being captured the host checks nothing (it cannot wait for a copy): here
    made so. Sequence 1 is then out of range (a length past the cache, or the page its new key goes to
    past the pool): its output rows and lse are NaN, its new key is not written, and nothing outside
    the cache is read or written; the other sequences are right, their new keys written."""
    monkeypatch.setattr(mf, "_capturing", lambda device: True)
    sequences = dense_sequences([100, 100, 70], 2, 64, torch.bfloat16, generator)
    cached = [99, 99 if paged else 200, 69]
    (k_cache, v_cache), table = build_cache(sequences, [99, 99, 69], 128, 32 if paged else None, torch.bfloat16,
                                            generator)
    if paged:
        table[1, 3] = 1000  # the page of sequence 1's keys 96 to 127, its new key 99 among them
    k, v = (torch.stack([s[i][-1:] for s in sequences]) for i in range(2))
    expected = after_append((k_cache, v_cache), k, v, cached, table, [0, 2])
    q = torch.randn(3, 1, 4, 64, generator=generator).bfloat16()
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    out, lse = mf.flash_attn_with_kvcache(q.to(device), k_cache, v_cache, k.to(device), v.to(device),
                                          cache_seqlens=torch.tensor(cached, dtype=torch.int32, device=device),
                                          block_table=None if table is None else table.to(device), num_splits=splits,
                                          return_softmax_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    for name, cache, want in (("k_cache", k_cache, expected[0]), ("v_cache", v_cache, expected[1])):
        assert torch.equal(bits(cache.cpu()), bits(want)), name
    out_ref, lse_ref, plain = reference(q, sequences, False, 0.125)
    for b in (0, 2):
        assert_close("out", out[b], out_ref[b], plain[b])
        assert_close("lse", lse[b], lse_ref[b])


@pytest.mark.parametrize("device", DEVICES)
def test_a_block_checks_every_page_it_reads(device, generator, monkeypatch):
    """Causal, 400 query rows on 1000 keys, 4 splits: the first row tile sees only 664 keys, 11 tiles,
    3 to a split, so its split 1 reads keys 192 to 383, partly outside that split's share of all the
    keys (256 to 511). A bad page there (keys 192 to 223, a page index 2^20, gigabytes past the pool)
    must be checked by the block that reads it, not only by the split whose share it is in: the
    sequence's rows are NaN and nothing outside the cache is read (before, that block read it: a fault
    on the GPU, on the CPU a read of unmapped memory)."""
    monkeypatch.setattr(mf, "_capturing", lambda device: True)  # the host checks nothing, as in a graph
    sequences = dense_sequences([1000], 1, 64, torch.bfloat16, generator)
    (k_cache, v_cache), table = build_cache(sequences, [1000], 1024, 32, torch.bfloat16, generator)
    table[0, 6] = 1 << 20
    q = torch.randn(1, 400, 1, 64, generator=generator).bfloat16()
    out, lse = mf.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device),
                                          cache_seqlens=torch.tensor([1000], dtype=torch.int32, device=device),
                                          block_table=table.to(device), causal=True, num_splits=4,
                                          return_softmax_lse=True)
    assert torch.isnan(out.cpu()).all() and torch.isnan(lse.cpu()).all()


@pytest.mark.parametrize("device", DEVICES)
def test_pages_before_the_pad_are_neither_checked_nor_read(device, generator):
    """cache_leftpad 96 on pages of 48: the sequence's first two pages hold none of its keys, so their
    block_table entries may be anything (here 2^20, far past the pool): not refused, not read, and the
    answer is the bits of the same call with those entries valid."""
    sequences = dense_sequences([100], 2, 64, torch.bfloat16, generator)
    (k_cache, v_cache), table = build_cache(sequences, [100], 240, 48, torch.bfloat16, generator, pads=[96])
    q = torch.randn(1, 2, 4, 64, generator=generator).bfloat16().to(device)
    k_cache, v_cache = k_cache.to(device), v_cache.to(device)
    call = lambda table: mf.flash_attn_with_kvcache(  # noqa: E731
        q, k_cache, v_cache, cache_seqlens=torch.tensor([196], dtype=torch.int32, device=device),
        cache_leftpad=torch.tensor([96], dtype=torch.int32, device=device), block_table=table.to(device),
        causal=True, num_splits=2, return_softmax_lse=True)
    want = call(table)
    table[0, :2] = 1 << 20
    got = call(table)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
def test_a_leftpad_past_its_sequence_gives_nan_when_the_host_checks_nothing(device, splits, generator, monkeypatch):
    """As in a CUDA graph's capture (the host checks nothing): sequence 1's cache_leftpad past its
    cache_seqlens (a negative length) gets NaN in its rows and lse, and reads nothing; sequence 0 is right."""
    monkeypatch.setattr(mf, "_capturing", lambda device: True)
    sequences = dense_sequences([100, 100], 2, 64, torch.bfloat16, generator)
    (k_cache, v_cache), _ = build_cache(sequences, [100, 100], 128, None, torch.bfloat16, generator)
    q = torch.randn(2, 1, 4, 64, generator=generator).bfloat16()
    out, lse = mf.flash_attn_with_kvcache(q.to(device), k_cache.to(device), v_cache.to(device),
                                          cache_seqlens=torch.tensor([100, 100], dtype=torch.int32, device=device),
                                          cache_leftpad=torch.tensor([0, 101], dtype=torch.int32, device=device),
                                          num_splits=splits, return_softmax_lse=True)
    out, lse = out.cpu(), lse.cpu()
    assert torch.isnan(out[1]).all() and torch.isnan(lse[1]).all()
    out_ref, lse_ref, plain = reference(q, sequences, False, 0.125)
    assert_close("out", out[0], out_ref[0], plain[0])
    assert_close("lse", lse[0], lse_ref[0])


def test_an_int_cache_seqlens_is_known_on_the_host():
    """An int (or None) cache_seqlens needs no copy back for the host checks (no sync on a GPU): the
    values come on the host beside the device's tensor (q on meta here, a device with no memory); a
    tensor is handed on as it is, to be copied."""
    q = torch.empty(3, 1, 4, 64, dtype=torch.bfloat16, device="meta")
    for given, value in ((7, 7), (None, 32)):
        on_device, on_host = mf._check_cache_seqlens(given, q, 32, 1 if given else 0)
        assert on_device.device.type == "meta" and on_device.dtype == torch.int32 and on_device.shape == (3,)
        assert on_host.device.type == "cpu" and on_host.tolist() == [value] * 3
    tensor = torch.tensor([1, 2, 3], dtype=torch.int32, device="meta")
    assert mf._check_cache_seqlens(tensor, q, 32, 0)[1] is tensor

"""Runs every version's CUDA kernels, forward and backward, at partial-tile sizes, causal and not, for
compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py 3   # version 3 only
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py mods   # chapter 6's
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py mods:4 dropout:4  # on version 4
    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/sanitize.py decode  # chapter 5's kernels
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py 3 --part 2/3  # a third of them
    python tools/sanitize.py 3 --part 2/3 --list  # which checks that third is (any machine)

Each run is also checked against float64 (tests/helpers.py's checks: fp32 within 1e-5, half precision
within twice plain attention's error), so a clean sanitizer report on a wrong answer fails too. Versions
that take grouped heads also run each forward with k, v of one head shared by q's three; versions that
read strided inputs (version 4) run each forward and backward once more on a model's views, uncopied;
version 4's forward also with three consumers (d = 64), in a build that takes them at every size.
With version 3 come chapter 5's decode kernels (flash_attn_with_kvcache: contiguous and paged caches,
split keys, cache_leftpad), its kernels on packed sequences of different lengths (flash_attn_varlen_func), and chapter
6's mods (tests/test_mods.py's cases: score_mod, mask_mod, the block mask, the official options; on
version 4, its deterministic backward with a mask too; on version 3, the official options and a
score_mod and mask_mod on packed sequences and in the decode kernels, tests/test_varlen.py's and
tests/test_kvcache.py's) and dropout (tests/test_dropout.py's)."""
import functools
import math
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
import minimal_flash as mf  # noqa: E402  (conftest-free: this file is run as a script)
from helpers import (assert_close, assert_gradients, cu_seqlens, poisoned_outputs, reference,  # noqa: E402
                     varlen_reference)

generator = torch.Generator().manual_seed(0)


def cases(version):
    """(block sizes, N, d) to run: partial last tiles; d = 128 uses the >48 KB opt-in; N = 300 spans
    several version-2 blocks; d = 3 leaves most of a row of version 2's backward tiles to its zero
    padding; N = 130 spans two of version 3's blocks (in the backward, three at d = 192 and 256, where
    its blocks are of 64 keys, two warps on each 16; its forward blocks are of 8 warps there); N = 300, three
    of version 4's key tiles, so its 2-stage ring refills a stage."""
    if mf.VERSIONS[version].head_dims is None:
        return [(sizes, N, d) for sizes in ((32, 32), (64, 16)) for N, d in ((100, 64), (17, 128), (300, 32), (77, 3))]
    cases = ((100, 64), (17, 128), (130, 64), (300, 128), (100, 32), (130, 96), (130, 192), (130, 256))
    return [((None, None), N, d) for N, d in cases if d in mf.VERSIONS[version].head_dims]


def run(version, dtype, causal, Br, Bc, N, d):
    q, k, v = [torch.randn(2, 3, N, d, generator=generator).to("cuda", dtype) for _ in range(3)]
    O, L = poisoned_outputs(q)
    options = dict(causal=causal, Br=Br, Bc=Bc, version=version)
    mf.forward(q, k, v, out=(O, L), **options)
    plain = mf.manual_attention(q, k, v, causal=causal) if dtype != torch.float32 else None
    assert_close("O", O, reference(q, k, v, causal)[0], plain)
    dO = torch.randn(q.shape, generator=generator).to("cuda", dtype)
    grads = [torch.full_like(q, float("nan")) for _ in range(3)]
    mf.backward(dO, q, k, v, O, L, out=grads, **options)
    assert_gradients(grads, q, k, v, dO, causal)
    if mf.VERSIONS[version].deterministic_mode:  # its other dQ path: shares added in turn
        grads = [torch.full_like(q, float("nan")) for _ in range(3)]
        mf.backward(dO, q, k, v, O, L, out=grads, deterministic=True, **options)
        assert_gradients(grads, q, k, v, dO, causal)
    print(f"v{version} {str(dtype)[6:]} Br={Br} Bc={Bc} N={N} d={d} causal={causal}: forward and backward checked")


def run_decode(dtype, Sq, d, causal, page, splits):
    """Chapter 5's decode kernels (kernels/flash_decode.cu, in version 3's build): 3 sequences of 0, 70
    and 400 cached keys, 3 new ones appended (every query row sees a key), 8 query heads sharing 2 heads
    of K and V, contiguous or paged (pages in a shuffled order), `splits` splits of the keys (then the
    combine kernel); checked against float64 attention on the dense keys. One split of 403 keys is 7
    tiles, more than the kernel's buffers (5 at d = 64, 3 at d = 128 and 256): each is refilled."""
    B, H, Hk, cached, new = 3, 8, 2, torch.tensor([0, 70, 400], dtype=torch.int32), 3
    capacity = 432  # rows a sequence may hold: 27 pages of 16, 9 of 48
    keys = [torch.randn(int(n) + new, Hk, d, generator=generator).to(dtype) for n in cached]
    values = [torch.randn(int(n) + new, Hk, d, generator=generator).to(dtype) for n in cached]
    q = torch.randn(B, Sq, H, d, generator=generator).to(dtype)
    k_new = torch.stack([K[-new:] for K in keys]).cuda()
    v_new = torch.stack([V[-new:] for V in values]).cuda()
    if page is None:
        k_cache, v_cache = (torch.zeros(B, capacity, Hk, d, dtype=dtype) for _ in range(2))
        for b, n in enumerate(cached.tolist()):
            k_cache[b, :n], v_cache[b, :n] = keys[b][:n], values[b][:n]
        block_table = None
    else:
        block_table = torch.randperm(B * capacity // page, generator=generator).int().reshape(B, capacity // page)
        k_cache, v_cache = (torch.zeros(B * capacity // page, page, Hk, d, dtype=dtype) for _ in range(2))
        for b, n in enumerate(cached.tolist()):
            for j in range(n):
                k_cache[block_table[b, j // page], j % page] = keys[b][j]
                v_cache[block_table[b, j // page], j % page] = values[b][j]
        block_table = block_table.cuda()
    out, lse = mf.flash_attn_with_kvcache(q.cuda(), k_cache.cuda(), v_cache.cuda(), k_new, v_new,
                                          cache_seqlens=cached.cuda(), block_table=block_table, causal=causal,
                                          num_splits=splits, return_softmax_lse=True)
    for b in range(B):  # (H, Sq, d): plain attention on the sequence's dense keys, in float64 and in dtype
        qb = q[b].transpose(0, 1).cuda()
        kb, vb = (t.transpose(0, 1).repeat_interleave(H // Hk, dim=0).cuda() for t in (keys[b], values[b]))
        n = kb.shape[1]
        hidden = (torch.arange(n)[None, :] > torch.arange(Sq)[:, None] + n - Sq).cuda() & causal
        ref, plain = ((torch.softmax((qb.to(t) @ kb.to(t).transpose(1, 2) * d ** -0.5).masked_fill(hidden, -math.inf),
                                     -1) @ vb.to(t)) for t in (torch.float64, dtype))
        assert_close("O", out[b].transpose(0, 1), ref, plain)
        assert (lse[b] - torch.logsumexp((qb.double() @ kb.double().transpose(1, 2) * d ** -0.5)
                                         .masked_fill(hidden, -math.inf), -1)).abs().max() < 1e-3, "lse"
    print(f"decode {str(dtype)[6:]} Sq={Sq} d={d} causal={causal} page={page} splits={splits}: checked")


def run_grouped(version, dtype, causal, N, d):
    """The forward with k, v of one head shared by q's three (it reads K, V's slice bh / 3); the
    backward of grouped heads runs the kernels above on k, v repeated to q's heads."""
    q = torch.randn(2, 3, N, d, generator=generator).to("cuda", dtype)
    k, v = [torch.randn(2, 1, N, d, generator=generator).to("cuda", dtype) for _ in range(2)]
    O, L = poisoned_outputs(q)
    mf.forward(q, k, v, out=(O, L), causal=causal, version=version)
    k, v = (t.expand(q.shape) for t in (k, v))
    assert_close("O", O, reference(q, k, v, causal)[0], mf.manual_attention(q, k, v, causal=causal))
    print(f"v{version} {str(dtype)[6:]} N={N} d={d} causal={causal}, k and v of 1 head for 3: forward checked")


def run_views(version, dtype, causal, N, d):
    """q, k, v as a model hands them over, views of one (B, N, 3, H, d) projection permuted to (B, H, N,
    d) (rows 3 H d values apart, heads d), and dO the gradient of its (B, N, H, d) output viewed as (B,
    H, N, d): version 4 reads them uncopied, through tensor maps of their strides (and the backward's
    D pre-pass at dO's strides), forward and backward; it writes O, dQ, dK, dV in that (B, N, H, d)
    layout, as minimal_flash lays them out for such views (_output_for), and the pre-pass reads O so."""
    qkv = torch.randn(2, N, 3, 3, d, generator=generator).to("cuda", dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    dO = torch.randn(2, N, 3, d, generator=generator).to("cuda", dtype).transpose(1, 2)
    assert all(mf._reads_as_is(t, version) and not t.is_contiguous() for t in (q, k, v, dO))
    laid = [torch.full(dO.transpose(1, 2).shape, math.nan, dtype=dtype, device="cuda").transpose(1, 2)
            for _ in range(4)]  # O, dQ, dK, dV
    O, L = laid[0], torch.full(q.shape[:-1], math.nan, device="cuda")
    assert all(mf._output_for(x, version).stride() == O.stride() for x in (q, k, v))
    kernels = mf.load_kernels("cuda", version)
    mf._raise_if(kernels.run("forward", causal, d**-0.5, q, k, v, O, L))
    assert_close("O", O, reference(q, k, v, causal)[0], mf.manual_attention(q, k, v, causal=causal))
    mf._raise_if(kernels.run("backward", causal, d**-0.5, q, k, v, O, L, dO, *laid[1:]))
    assert_gradients(laid[1:], q, k, v, dO, causal)
    print(f"v{version} {str(dtype)[6:]} N={N} d={d} causal={causal}, q, k, v, dO strided views: forward and "
          "backward checked")


def run_three_consumers():
    """Version 4's forward with three consumer warpgroups. The launch takes them at d = 64 where the work
    is long and the tiles many (N >= 4096, 4 work tiles of 192 rows per multiprocessor: tests/test_kernels.py
    runs that), too long for racecheck, so here a build that takes them at every d = 64 launch
    (-DTHREE_CONSUMERS_ALWAYS): 2 x 3 heads of 300 rows (a last work tile of 108 rows), and 70 heads of
    200 (140 work tiles: some blocks take two, so the ring and the turns run on from one to the next)."""
    @functools.cache
    def kernels():  # built once, at the first of these checks that runs
        return mf.VERSIONS[4].flagged_kernels("-DTHREE_CONSUMERS_ALWAYS")

    def three(dtype, causal, shape):
        q, k, v = [torch.randn(*shape, generator=generator).to("cuda", dtype) for _ in range(3)]
        O, L = poisoned_outputs(q)
        mf._raise_if(kernels().run("forward", causal, shape[-1] ** -0.5, q, k, v, O, L))
        O_ref, L_ref = reference(q, k, v, causal)
        assert_close("O", O, O_ref, mf.manual_attention(q, k, v, causal=causal))
        assert_close("L", L, L_ref)

    return [check(three, dtype, causal, shape, said=f"v4 {str(dtype)[6:]} {shape} causal={causal}, three consumers: "
                  "forward") for shape in ((2, 3, 300, 64), (1, 70, 200, 64)) for dtype in mf.VERSIONS[4].dtypes
            for causal in (False, True)]


def run_varlen(dtype, d, causal, lengths_q, lengths_k, H, Hk):
    """flash_attn_varlen_func (version 3's kernels on packed sequences), forward and backward: the
    sequences' rows end inside tiles, some sequence has no query or no key (its blocks return at once;
    causal with Lq > Lk, rows that see no key), k, v of Hk heads shared by H; checked against float64
    attention a sequence at a time."""
    q, dO = (torch.randn(sum(lengths_q), H, d, generator=generator).to("cuda", dtype) for _ in range(2))
    k, v = (torch.randn(sum(lengths_k), Hk, d, generator=generator).to("cuda", dtype) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out, lse, _ = mf.flash_attn_varlen_func(q, k, v, cu_seqlens(lengths_q, "cuda"), cu_seqlens(lengths_k, "cuda"),
                                            max(lengths_q), max(lengths_k), causal=causal, return_attn_probs=True)
    grads = torch.autograd.grad(out, (q, k, v), dO)
    out_ref, lse_ref, *grads_ref = varlen_reference(q, k, v, lengths_q, lengths_k, causal, dO)
    plain, _, *plains = varlen_reference(q, k, v, lengths_q, lengths_k, causal, dO, dtype)
    seen = torch.isfinite(lse_ref)  # (H, total_q); rows that see no key: out 0, lse -inf
    assert not out.transpose(0, 1)[~seen].any() and (lse[~seen] == -math.inf).all(), "rows that see no key"
    assert_close("O", out.transpose(0, 1)[seen], out_ref.transpose(0, 1)[seen], plain.transpose(0, 1)[seen])
    assert_close("lse", lse[seen], lse_ref[seen])
    for name, grad, ref, plain in zip(("dQ", "dK", "dV"), grads, grads_ref, plains):
        assert_close(name, grad, ref, plain)
    print(f"varlen {str(dtype)[6:]} d={d} causal={causal} lengths q {lengths_q}, k {lengths_k}, H={H} Hk={Hk}: "
          "forward and backward checked")


# arguments: version numbers; `mods` for chapter 6's mods (each a build, of versions 3 and 4; `mods:4`: of
# version 4 only), `dropout` (`dropout:4`) likewise; `decode`: the decode kernels alone, with their mods
MOD_VERSIONS = [n for n, v in mf.VERSIONS.items() if v.mods]


def run_decodes():
    """Chapter 5's decode kernels, contiguous and paged, split or not, d = 64, 128 and 256 and between (8, 96,
    200: the next kernel up); cache_batch_idx; cache_leftpad; caches at other strides (tests/test_kvcache.py's
    cases without a mod)."""
    import test_kvcache
    checks = [check(run_decode, dtype, Sq, d, causal, page, splits) for dtype in mf.VERSIONS[3].dtypes
              for Sq, d, causal, page, splits in ((1, 128, False, None, 1), (1, 128, True, 16, 3),
                                                  (5, 64, False, None, 2), (3, 64, True, 48, 1),
                                                  (1, 128, True, 144, 2), (1, 256, True, 48, 3),
                                                  (5, 256, False, None, 2), (1, 96, True, 48, 3),
                                                  (5, 200, False, None, 2), (1, 8, False, 16, 2))]
    # entries picked from a cache of five
    checks.append(check(test_kvcache.test_cache_batch_idx_picks_the_entries, "cuda", generator,
                        said="decode cache_batch_idx"))
    for name, (case, pads, options) in test_kvcache.LEFTPAD.items():
        if not options:
            checks.append(check(test_kvcache.check_against_float64, "cuda", *case, generator, pads=pads,
                                said=f"decode cache_leftpad {name}"))
    for case in test_kvcache.RELAID[1:4]:  # caches read in place at other strides (paged, contiguous, 64 rows)
        checks.append(check(test_kvcache.check_against_float64, "cuda", *case, generator, strided=True,
                            said=f"decode strided cache {case[:4]} page {case[8]}"))
    return checks


def run_decode_mods():
    """The decode kernels with chapter 6's mods: tests/test_kvcache.py's official options, a score_mod and
    mask_mod, and cache_leftpad with a window (each a build of version 3)."""
    import test_kvcache
    checks = [check(test_kvcache.check_against_float64, "cuda", *case, generator, **options,
                    said=f"mods decode {name}") for name, (case, options) in test_kvcache.OPTIONS.items()]
    for name, (case, pads, options) in test_kvcache.LEFTPAD.items():
        if options:
            checks.append(check(test_kvcache.check_against_float64, "cuda", *case, generator, pads=pads, **options,
                                said=f"mods decode cache_leftpad {name}"))
    return checks


def check(function, *args, said=None, **kwargs):
    """One check, run later (or only listed): function(*args, **kwargs), then `said: checked` if given
    (run, run_decode and the others print their own line)."""
    def thunk():
        function(*args, **kwargs)
        if said:
            print(f"{said}: checked")
    thunk.label = said or f"{function.__name__}{tuple(a for a in args if a is not generator)}"
    return thunk


def named(args):
    """What the arguments name: (versions, {"mods": versions, "dropout": versions}, decode). An argument that
    names nothing that runs (an unknown version, mods of a version without them) is a one-line error."""
    versions, mod_versions, decode = set(), {"mods": set(), "dropout": set()}, False
    usage = (f"a version ({', '.join(map(str, mf.VERSIONS))}), mods or dropout (of versions "
             f"{', '.join(map(str, MOD_VERSIONS))}; mods:N, dropout:N for one), or decode")
    for a in args or [*map(str, mf.VERSIONS), "mods", "dropout"]:
        name, colon, version = a.partition(":")
        if a == "decode":  # the decode kernels alone, with and without mods
            decode = True
        elif name in mod_versions and not colon:
            mod_versions[name] |= set(MOD_VERSIONS)
        elif name in mod_versions and version in map(str, MOD_VERSIONS):
            mod_versions[name].add(int(version))
        elif a in map(str, mf.VERSIONS):
            versions.add(int(a))
        else:
            sys.exit(f"sanitize.py: {a!r} names no checks: give {usage}")
    return versions, mod_versions, decode


def checks(args):
    """The checks that the arguments name, in order."""
    chosen_versions, mod_versions, decode = named(args)
    out = []
    for version in sorted(chosen_versions):
        for dtype in mf.VERSIONS[version].dtypes:
            for (Br, Bc), N, d in cases(version):
                for causal in (False, True):
                    out.append(check(run, version, dtype, causal, Br, Bc, N, d))
                    if mf.VERSIONS[version].grouped_heads:
                        out.append(check(run_grouped, version, dtype, causal, N, d))
                    if mf.VERSIONS[version].strided:
                        out.append(check(run_views, version, dtype, causal, N, d))
    if 4 in chosen_versions:
        out += run_three_consumers()
    if 3 in chosen_versions or decode:  # chapter 5's decode kernels build with version 3
        out += run_decodes()
    if 3 in chosen_versions:  # and flash_attn_varlen_func
        for dtype in mf.VERSIONS[3].dtypes:
            for d, causal, lengths_q, lengths_k, H, Hk in ((128, True, [0, 100, 300, 1], [5, 100, 260, 0], 8, 2),
                                                           (64, False, [130, 64, 17], [130, 1, 200], 4, 4),
                                                           (64, True, [64, 129], [200, 129], 4, 1)):
                out.append(check(run_varlen, dtype, d, causal, lengths_q, lengths_k, H, Hk))
    if mod_versions["mods"]:  # chapter 6: each of tests/test_mods.py's mods compiled into versions 3 and 4
        from test_mods import CASES as MOD_CASES, run_case, test_deterministic_backward_with_a_mask
        from test_mods import test_a_mod_undefined_where_scores_are_masked_gives_no_nan as undefined_where_masked
        for version in sorted(mod_versions["mods"]):
            for name in MOD_CASES:
                for shape in ((2, 2, 200, 64), (1, 2, 130, 128)):
                    out.append(check(run_case, name, shape, "cuda", generator, version,
                                     said=f"mods v{version} {name} {shape}: forward and backward"))
            out.append(check(undefined_where_masked, "cuda", version, generator,  # mods::times_p
                             said=f"mods v{version} a score_mod undefined where scores are masked: no NaN"))
            if mf.VERSIONS[version].deterministic_mode:  # its other walk: every tile, the EMPTY ones too
                out.append(check(test_deterministic_backward_with_a_mask, "cuda", generator,
                                 said=f"mods v{version} deterministic backward with a mask"))
        if 3 in mod_versions["mods"]:  # mods on packed sequences (flash_attn_varlen_func)
            import test_varlen
            for name in ("all", "alibi-per-sequence"):
                options, causal = test_varlen.OPTIONS[name]
                out.append(check(test_varlen.check_against_float64, "cuda", [100, 7, 2], [37, 200, 2], 4, 1, 64,
                                 causal, torch.float16, generator, **options,
                                 said=f"mods varlen {name}: forward and backward"))
            for test in (test_varlen.test_a_window_reads_only_its_band,  # (the fixture `poisoned`: not needed)
                         test_varlen.test_score_mod_and_mask_mod_per_sequence):
                out.append(check(test, "cuda", generator, None, said=f"mods varlen {test.__name__}"))
            out.append(check(test_varlen.check_band, "cuda", [364, 500], slice(0, 128), generator,  # a block mask
                             said="mods varlen a mask_mod's band, its empty tiles skipped"))  # for packed sequences
    if decode or 3 in mod_versions["mods"]:  # and in the decode kernels (flash_attn_with_kvcache)
        out += run_decode_mods()
    if mod_versions["dropout"]:  # chapter 6's dropout, against dense attention with the same Philox mask
        import test_dropout
        for version in sorted(mod_versions["dropout"]):
            for shape in ((2, 2, 200, 64), (1, 2, 130, 128)):
                for causal in (False, True):
                    out.append(check(test_dropout.run_case, shape, causal, "cuda", generator, version,
                                     said=f"dropout v{version} {shape} causal={causal}: forward and backward"))
        if 3 in mod_versions["dropout"]:  # on packed sequences (flash_attn_varlen_func), its seed pinned
            out += [check(dropout_varlen, causal, said=f"dropout varlen causal={causal}: forward and backward")
                    for causal in (False, True)]
    return out


def dropout_varlen(causal):
    import pytest
    import test_varlen
    with pytest.MonkeyPatch.context() as patch:  # (the fixture `poisoned`: not needed)
        test_varlen.test_dropout_on_packed_sequences("cuda", causal, generator, None, patch)


def main(argv):
    """Arguments as above; `--part K/N` runs the K-th of N consecutive slices of their checks (counting
    from 1), so that a slow tool (racecheck) can cover them in N calls of a few minutes each; `--list`
    prints the checks (with --part, the slice's) without running them, on any machine."""
    args, part, parts, listing = [], 1, 1, False
    argv = list(argv)
    while argv:
        a = argv.pop(0)
        if a == "--part":
            given = argv.pop(0) if argv else ""
            part, _, parts = given.partition("/")
            if not (part.isdigit() and parts.isdigit() and 1 <= int(part) <= int(parts)):
                sys.exit(f"sanitize.py: --part wants K/N with 1 <= K <= N, e.g. --part 2/3, not {given!r}")
            part, parts = int(part), int(parts)
        elif a == "--list":
            listing = True
        else:
            args.append(a)
    every = checks(args)
    if not listing and not torch.cuda.is_available():
        sys.exit("sanitize.py runs the CUDA kernels (under compute-sanitizer): it needs a GPU; --list works anywhere")
    first = (part - 1) * len(every) // parts
    chosen = every[first:part * len(every) // parts]
    for number, thunk in enumerate(chosen, first + 1):
        if listing:
            print(f"{number:4} {thunk.label}")
        else:
            thunk()
    print(f"{len(chosen)} checks {'listed' if listing else 'run'}"
          f"{f' (part {part} of {parts}: {first + 1} to {first + len(chosen)} of {len(every)})' if parts > 1 else ''}")


if __name__ == "__main__":
    main(sys.argv[1:])

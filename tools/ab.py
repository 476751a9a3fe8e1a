"""A kernel change against the commit before it, on a GPU: the kernels and minimal_flash.py of an older
commit (git archive, into a temporary folder) and those of the working tree, both loaded in one process,
each call of one timed against the same call of the other, alternately (as bench.py times: CUDA events,
the calls queued back to back; the medians after warm-up rounds), and their outputs compared bit for bit.
What each session's A/B probe did by hand before it reported a change's speed.

    python tools/ab.py 222390f [--cases causal full mask window document softcap alibi]
                               [--shapes 4,16,4096,128 8,16,1024,128] [--passes forward backward] [--version 4]
                               [--rounds 40]

Prints, per shape and case: each pass's time in both trees (ms), the old time over the new (above 1: the
change is faster), and whether the outputs are the same bits. The backward's dQ may differ in its last
bits run to run (the default mode adds the blocks' shares in the order they arrive); dK, dV may not.

    python tools/ab.py 1fae898~1 --host [--cases causal] [--rounds 40]

--host: the host's time per call instead of the GPU's, for a change to what a call costs the host (its
Python, its launches): flash_attention without and with its backward (autograd), on (1, 1, 128, 64);
microseconds per call as bench.host_ms takes them (each call from an idle GPU), both trees in turn, round
after round (on the lent machines the host's own speed wandered 2x within one process: each round falls
on both alike), medians. Where a model's step waits for its host, these decide.

    python tools/ab.py HEAD~1 --decode [1,32768 8,16384] [--rounds 40]

--decode: a decode step instead (bench.py --decode's: flash_attn_with_kvcache, nheads 32, nheads_k 8,
d = 128, bf16, one query row, every sequence full; at each batch,context, contiguous and paged), each
tree's steps captured in a CUDA graph (the GPU's time, no host in it), the two graphs replayed in turn.
Default points: batch 1 at 32k and 128k, 8 at 32k, 64 at 8k.
"""
import argparse
import importlib.util
import io
import math
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import minimal_flash as mf  # noqa: E402

# flash_attention's options of each case at sequence length N and H heads (mask: causal as bench.py --mods
# spells it, so that the two share its build; document: packed documents of 1000 tokens, causal; softcap and
# alibi: bench.py --mods's, causal)
CASES = {"causal": lambda N, H: dict(causal=True), "full": lambda N, H: {},
         "mask": lambda N, H: dict(mask_mod="q_idx >= kv_idx"), "window": lambda N, H: dict(window_size=(1024, 0)),
         "document": lambda N, H: dict(zip(("mask_mod", "mod_tensors"), mf.document_mask(
             torch.arange(N, device="cuda", dtype=torch.int32) // 1000)), causal=True),
         "softcap": lambda N, H: dict(causal=True, softcap=bench.MODS_SOFTCAP),
         "alibi": lambda N, H: dict(causal=True, alibi_slopes=bench.alibi_slopes(H).cuda())}


def whole_numbers(names):
    """An argument type: whole numbers >= 1 separated by commas, one for each of `names` ("B,H,N,d")."""
    count = len(names.split(","))
    words = {2: "two", 4: "four"}[count]

    def parse(text):
        parts = text.split(",")
        if len(parts) != count or not all(p.isdigit() and int(p) >= 1 for p in parts):
            raise argparse.ArgumentTypeError(f"{text!r} is not {names} ({words} whole numbers >= 1)")
        return tuple(map(int, parts))
    return parse


shape = whole_numbers("B,H,N,d")  # a shape of q, k, v
point = whole_numbers("batch,context")  # a decode step's


DECODE_POINTS = [(1, 32768), (1, 131072), (8, 32768), (64, 8192)]


def commit_of(name):
    """The full hash of a commit of this repository, or None."""
    found = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{name}^{{commit}}"], cwd=ROOT,
                           capture_output=True, text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def load_old(commit, folder):
    """minimal_flash.py and kernels/ of `commit`, extracted into folder, loaded as the module mf_old (its
    builds keyed by their own sources, so neither tree's build is taken for the other's). Its decorators
    register the torch.ops.minimal_flash operators again, over this tree's: this tool calls forward and
    backward, which do not go through them."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit, "kernels", "minimal_flash.py"], cwd=ROOT,
                             capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder)
    spec = importlib.util.spec_from_file_location("mf_old", Path(folder) / "minimal_flash.py")
    old = importlib.util.module_from_spec(spec)
    sys.modules["mf_old"] = old
    spec.loader.exec_module(old)
    return old


def alternating_ms(calls, rounds, warmup=8, device="cuda"):
    """The median ms of each call, the calls taken in turn, timed as bench.py times (bench.time_calls:
    CUDA events, the calls queued back to back), after warm-up rounds (the builds, the clocks)."""
    bench.time_calls(calls, warmup * len(calls), device)
    times = bench.time_calls(calls, rounds * len(calls), device)
    return [statistics.median(times[i::len(calls)]) for i in range(len(calls))]


def host_us(calls, rounds, device="cuda", per_round=25):
    """Each call's host time in us, as bench.host_ms takes it (one call from an idle, synchronised GPU: its
    own Python and launches; the median of `per_round`), the calls taken in turn, round after round:
    medians over the rounds."""
    for call in calls:  # warm: the builds, the checks' caches
        call()
    times = [[bench.host_ms(call, device, per_round) * 1e3 for call in calls] for _ in range(rounds)]
    return [statistics.median(spent) for spent in zip(*times)]


def host_lines(old, cases, version, rounds, device="cuda", per_round=25):
    """--host's lines: per case, flash_attention's host time per call in both trees, without and with
    its backward (torch.autograd.grad: no gradient accumulated into the leaves, a launch each)."""
    dtype = mf.VERSIONS[version].dtypes[0]
    q, k, v, dO = (torch.randn(1, 1, 128, 64, device=device, dtype=dtype) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    for case in cases:
        options = dict(CASES[case](128, 1), version=version)
        forward = [lambda m=m: m.flash_attention(q, k, v, **options) for m in (old, mf)]
        both = [lambda m=m: torch.autograd.grad(m.flash_attention(*leaves, **options), leaves, dO) for m in (old, mf)]
        line = f"(1, 1, 128, 64) {case:>8}:"
        for name, calls in (("forward", forward), ("forward + backward", both)):
            us = host_us(calls, rounds, device, per_round)
            line += f"  {name} {us[0]:.1f} / {us[1]:.1f} us = {us[0] / us[1]:.3f}x"
        yield line


def decode_lines(old, points, rounds, device="cuda"):
    """--decode's lines: per batch,context and layout, a decode step's time in both trees, in us, each
    tree's steps over the input sets (enough to pass the L2 cache, bench.sets_past_l2) captured in one
    CUDA graph (bench.captured), the two graphs replayed in turn; on the CPU (a test's) the plain calls,
    timed by perf_counter. Both trees get the same inputs, pages and page table."""
    H, Hk, d, dtype = bench.DECODE_HEADS, bench.DECODE_HEADS_K, bench.DECODE_HEAD_DIM, torch.bfloat16
    for B, N in points:
        cache = 2 * B * N * Hk * d * dtype.itemsize  # k and v
        sets = bench.sets_past_l2(2 * cache, device)  # contiguous and paged, side by side
        inputs = [[torch.randn(B, 1, H, d, dtype=dtype, device=device),
                   *(torch.randn(B, N, Hk, d, dtype=dtype, device=device) for _ in range(2))] for _ in range(sets)]
        seqlens = torch.full((B,), N, dtype=torch.int32, device=device)
        pages = math.ceil(N / bench.PAGE)
        tables = [torch.randperm(B * pages, device=device).view(B, pages).to(torch.int32) for _ in inputs]
        layouts = {"contiguous": [(s, {}) for s in inputs],
                   "paged": [((q, bench.paged(k, table), bench.paged(v, table)), dict(block_table=table))
                             for (q, k, v), table in zip(inputs, tables)]}
        for layout, calls in layouts.items():
            steps = [[lambda m=m, a=a, kw=kw: m.flash_attn_with_kvcache(*a, cache_seqlens=seqlens, **kw)
                      for a, kw in calls] for m in (old, mf)]
            same = torch.equal(steps[0][0](), steps[1][0]())
            if device == "cuda":
                graphs = [bench.captured(tree) for tree in steps]
                ms = alternating_ms([graph.replay for graph, _ in graphs], rounds)
                us = [t * 1e3 / n for t, (_, n) in zip(ms, graphs)]
                del graphs  # their memory, before the next layout's
            else:
                us = [t * 1e3 for t in alternating_ms([tree[0] for tree in steps], rounds, 1, device)]
            yield (f"batch {B:>2} context {N:>6} {layout:>10}: {us[0]:.1f} / {us[1]:.1f} us = {us[0] / us[1]:.3f}x "
                   f"(same bits? out: {same})")
        del inputs, layouts, steps
        if device == "cuda":
            torch.cuda.empty_cache()


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("commit", help="the older commit (a hash, a branch, HEAD~1)")
    p.add_argument("--cases", nargs="+", choices=list(CASES), help="default: causal full")
    p.add_argument("--shapes", type=shape, nargs="+", metavar="B,H,N,d", help="default: 4,16,4096,128")
    p.add_argument("--passes", nargs="+", choices=["forward", "backward"], help="default: both")
    p.add_argument("--version", type=int, choices=sorted(mf.VERSIONS), help="default: 4")
    p.add_argument("--rounds", type=bench.at_least(1), default=40)
    p.add_argument("--host", action="store_true", help="the host's time per call, not the GPU's (see above)")
    p.add_argument("--decode", type=point, nargs="*", metavar="B,N",
                   help="a decode step's GPU time at these batch,context points (see above)")
    args = p.parse_args(argv)
    if args.host and (args.shapes or args.passes):
        p.error("--host times flash_attention on (1, 1, 128, 64), without and with its backward: leave out "
                "--shapes and --passes")
    if args.decode is not None and (args.host or args.shapes or args.passes or args.cases or args.version):
        p.error("--decode times flash_attn_with_kvcache (version 3's decode kernels) at its own points: leave out "
                "--host, --shapes, --passes, --cases and --version")
    args.cases, args.version = args.cases or ["causal", "full"], args.version or 4
    args.shapes, args.passes = args.shapes or [(4, 16, 4096, 128)], args.passes or ["forward", "backward"]
    commit = commit_of(args.commit)
    if commit is None:
        p.error(f"argument commit: {args.commit!r} is not a commit of this repository")
    if not torch.cuda.is_available():
        sys.exit("ab.py times CUDA kernels: it needs a GPU")
    refusal = mf.version_unavailable(3 if args.decode is not None else args.version, "cuda")
    if refusal:
        sys.exit(f"ab.py: {refusal}")
    with tempfile.TemporaryDirectory(prefix="ab_") as folder:
        old = load_old(commit, folder)
        if args.decode is not None:
            print(f"# {torch.cuda.get_device_name()}, bf16, nheads {bench.DECODE_HEADS}, nheads_k "
                  f"{bench.DECODE_HEADS_K}, d {bench.DECODE_HEAD_DIM}: a decode step of "
                  f"{commit[:7]} (old) and the working tree (new), each in a CUDA graph; us, medians of "
                  f"{args.rounds} alternating replays; old / new", flush=True)
            for line in decode_lines(old, args.decode or DECODE_POINTS, args.rounds):
                print(line, flush=True)
            return
        dtype = mf.VERSIONS[args.version].dtypes[0]  # the decode step's is bf16, as bench.py --decode times it
        if args.host:
            print(f"# {torch.cuda.get_device_name()}, {dtype}, version {args.version}: host time per call of "
                  f"{commit[:7]} (old) and the working tree (new), medians of {args.rounds} rounds; old / new",
                  flush=True)
            for line in host_lines(old, args.cases, args.version, args.rounds):
                print(line, flush=True)
            return
        print(f"# {torch.cuda.get_device_name()}, {dtype}, version {args.version}: {commit[:7]} (old) against the "
              f"working tree (new); ms, medians of {args.rounds} alternating calls; old / new", flush=True)
        for B, H, N, d in args.shapes:
            q, k, v, dO = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(4))
            for case in args.cases:
                options = dict(CASES[case](N, H), version=args.version)
                O, L = mf.forward(q, k, v, **options)
                line = f"B{B} H{H} N{N} d{d} {case:>8}:"
                for pass_ in args.passes:
                    calls = [(lambda m=m: m.forward(q, k, v, **options)) if pass_ == "forward" else
                             (lambda m=m: m.backward(dO, q, k, v, O, L, **options)) for m in (old, mf)]
                    outs = [tuple(call()) for call in calls]
                    same = [torch.equal(a, b) for a, b in zip(*outs)]
                    ms = alternating_ms(calls, args.rounds)
                    names = "O, L" if pass_ == "forward" else "dQ, dK, dV"
                    line += (f"  {pass_} {ms[0]:.4f} / {ms[1]:.4f} = {ms[0] / ms[1]:.3f}x "
                             f"(same bits? {names}: {', '.join(map(str, same))})")
                print(line, flush=True)


if __name__ == "__main__":
    main()

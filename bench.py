"""Profile and time minimal FlashAttention against plain ("manual") attention.

    python bench.py                      # B=16, H=12, N=64, d=64 on a GPU; smaller on the CPU
    python bench.py --seq-len 64 128 512 1024 --no-profile
    python bench.py --br 64 --bc 16      # other block sizes: compiled once, then cached
    python bench.py --sweep --out results   # N = 64 .. 16384: table, CSV and plots, with SDPA too
    python bench.py --sweep --methods manual minimal-flash2 --seq-len 1024 4096   # a part of it
    python bench.py --replot results/sweep.csv   # redraw the plots from a sweep's CSV
    python bench.py --sweep --dtype bf16 -d 128   # tensor cores, against SDPA's FlashAttention-2 and cuDNN
    python bench.py --decode --out results      # one decode step over a KV cache, batch 1..64, context 1k..128k
    python bench.py --decode --batch 1 8 --context 4096 --methods minimal-flash sdpa   # a part of it
    python bench.py --varlen --out results      # a prefill of 8 sequences of 512..8192 tokens, packed and padded
    python bench.py --mods --out results        # chapter 6's mods against no mod and FlexAttention

The default run first checks the values: both methods' O and dQ, dK, dV (for a random output
gradient dO) against float64 attention on the same inputs. Then a torch.profiler table for each
method's forward and backward pass (after a warm-up), as the reference project prints. Then the
timing that counts: on a GPU, CUDA events around each call, warm, median of many calls, fp32 with
TF32 off, inputs rotated through more memory than the L2 cache holds so that no call finds its
inputs already cached by the previous one. The backward is timed alone: the forward graph is built
once and kept.

The sweep does the same timing over sequence lengths, for manual attention, our kernels and
torch.nn.functional.scaled_dot_product_attention (SDPA) pinned to the backend it picks for the
dtype: its memory-efficient kernel for fp32; for bf16 and fp16 (--dtype) on a GPU, two of them side
by side, FlashAttention-2 (sdpa-flash) and cuDNN's (sdpa-cudnn), each where it runs. Manual
attention and SDPA run in the same dtype as our kernels. A version of ours that cannot run on this
device (one for a newer GPU) is left out with a line saying why.
For each point: median time, TFLOP/s, extra peak memory, the ratio to manual, and the error
against manual attention on the same inputs. It writes a table, sweep.csv and two plots.

--decode times one step of generation: a new query row attending to a KV cache of `context` tokens
(bf16, 32 query heads sharing 8 key/value heads, d = 128, as in grouped-query models), through
minimal_flash.flash_attn_with_kvcache on a contiguous and on a paged cache, beside SDPA (enable_gqa)
pinned to FlashAttention-2 and to cuDNN, and plain attention. Each step is timed three ways: its GPU
time, captured in a CUDA graph so that the host is out of the way; its eager time, the plain call;
and the host time of one call. The step reads the whole cache once, so its speed is memory
bandwidth: it is reported against this GPU's own reading and copying speed, measured in the same run,
and against the H200's specified 4.8 TB/s. It writes a table and decode.csv.

--varlen times a prefill of a batch of sequences of different lengths (8 of 512 to 8192 tokens,
drawn with a fixed seed; bf16, 32 query heads sharing 8 key/value heads, d = 128, causal): version 3's
kernels on the sequences packed without padding (minimal_flash.flash_attn_varlen_func), against the
same kernels on the batch padded to its longest sequence (flash_attention) and SDPA on the padded
batch; the forward, and forward and backward, per real token. It writes a table and varlen.csv.

--mods times chapter 6's mods on the kernels of the default version (4 on a Hopper GPU, else 3; --version
3 or 4) (bf16, B = 4, H = 16, N = 4096, d = 128): causal
built in (the baseline), causal as a mask_mod, a sliding window of 1024 keys, softcap 30 and ALiBi, each
causal; for each, ours with the mod, ours causal without it (what the mod costs) and FlexAttention with
the same mask and score_mod (torch.compile'd; eager on the CPU, where it has no backward). Each is first
checked against float64 attention with the mod built densely (at most twice plain bf16 attention's
error), then timed, forward and forward + backward, the methods taken in turn, a call each (a clock that
drifts during the run then slows them alike); the backward is their difference. TFLOP/s count the
work the mask keeps (4 B H d a kept pair forward, 2.5 times that backward). It writes a table and mods.csv.

Without a GPU the same code runs on the CPU emulation of the kernels at small sizes; those times
say nothing about GPU speed.

One mode at a time (--sweep, --decode, --varlen, --mods or --replot); an option that the mode given
does not read is refused, saying which modes read it, as is a size or count out of range.
"""

import argparse
import csv
import itertools
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.profiler import ProfilerActivity, profile, record_function

import minimal_flash as mf

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# How far a method may be from manual attention in the same dtype (relative error) before the
# sweep calls it wrong: fp32 agrees to rounding; bf16 keeps 8 bits of mantissa, fp16 11.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2, torch.float16: 4e-3}
# How far manual attention and SDPA may be from float64 in fp32 when --tf32 lets their matmuls round
# their inputs to TF32 (10 bits of mantissa: about 1e-3 relative error); our kernels stay plain fp32.
TF32_TOLERANCE = 1e-2


def versions_for(dtype):
    """Our kernel versions that take this dtype: 1 and 2 for fp32, 3 for bf16 and fp16."""
    return [n for n, v in mf.VERSIONS.items() if dtype in v.dtypes]

# The sweep's (B, H) at each N: enough (batch, head) slices that every point does real work, and,
# where there is one, the shape at which the reference project was measured, so that its numbers
# describe the same work as ours. On the CPU, small sizes: the emulation is slow.
SWEEP_GPU = {64: (16, 12), 128: (16, 12), 256: (16, 12), 512: (8, 16), 1024: (8, 12), 2048: (4, 16),
             4096: (4, 16), 8192: (2, 16), 16384: (1, 16)}
SWEEP_CPU = {16: (1, 2), 33: (1, 2), 64: (1, 2), 128: (1, 2)}
PASSES = ("forward", "backward")


# ---------------------------------------------------------------------------------------------
# The command line


# The modes besides the default run, each chosen by its own flag (at most one), and which of them read
# each option. An option given in a mode that does not read it is a usage error: that run would do
# something other than what was asked, without a word. --cpu, --no-profile and --tf32 are not in the
# table: where they do not apply they change nothing, and their help says so.
MODES = ("sweep", "decode", "varlen", "mods", "replot")
TIMED = ("sweep", "decode", "varlen", "mods")  # the modes that time with --seconds and write to --out
OPTION_MODES = {"-B/--batch": ("default", *TIMED), "-H/--heads": ("default", *TIMED),
                "-N/--seq-len": ("default", "sweep", "mods"), "-d/--head-dim": ("default", *TIMED),
                "--br": ("default", "sweep"), "--bc": ("default", "sweep"), "--causal": ("default", "sweep"),
                "--dtype": ("default", *TIMED), "--version": ("default", "mods"),
                "--warmup": ("default", *TIMED), "--repeats": ("default", *TIMED), "--min-repeats": TIMED,
                "--seconds": TIMED, "--methods": TIMED, "--out": TIMED, "--context": ("decode",),
                "--heads-k": ("decode", "varlen"), "--lengths": ("varlen",)}


def mode_name(mode):
    return "the default run" if mode == "default" else f"--{mode}"


def at_least(low):
    """An argparse type: a whole number, at least `low` (a size or a count), else a usage error saying so."""
    def whole_number(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, not {value}")
        return value
    return whole_number


def positive_seconds(text):
    """An argparse type: a finite number of seconds above 0 (a budget of time to time calls in)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, not {text}")
    return value


class Distinct(argparse.Action):
    """Stores the option's values (nargs="+"), each given once: a size given twice would be measured twice,
    and a table line per size would show one of the two. Refused, not dropped, so that what runs is what
    was written."""
    def __call__(self, parser, namespace, values, option_string=None):
        twice = [value for i, value in enumerate(values) if value in values[:i]]
        if twice:
            parser.error(f"argument {'/'.join(self.option_strings)}: {twice[0]} given twice; give each once")
        setattr(namespace, self.dest, values)


def or_default(value, default):
    """value, or default where value is None (not given). Not `value or default`, which would also
    replace a given 0."""
    return default if value is None else value


def version_methods(version):
    """The sweep's methods of our kernels' `version`: its own, and the deterministic mode where that is a
    mode of its own (a different backward)."""
    name = method_name(version)
    return [name, *([name + "-deterministic"] if mf.VERSIONS[version].deterministic_mode else [])]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    positive = at_least(1)
    p.add_argument("-B", "--batch", type=positive, nargs="+", action=Distinct,
                   help="batch size (default: 16 on a GPU, 2 on the CPU; --sweep: per N; the modes' own below); "
                        "--decode takes several, each once")
    p.add_argument("-H", "--heads", type=positive,
                   help="query heads (default: 12 on a GPU, 4 on the CPU; --sweep: per N; --decode: 32; "
                        "--varlen, --mods: below)")
    p.add_argument("-N", "--seq-len", type=positive, nargs="+", action=Distinct,
                   help="sequence lengths, each once (default: 64; --sweep: 64 to 16384 on a GPU, 16 to 128 on the "
                        "CPU; --mods: one, below)")
    p.add_argument("-d", "--head-dim", type=positive,
                   help="head dim (default: 64 on a GPU, 32 on the CPU; --decode: 128, a multiple of 8 up to 256; "
                        "--varlen, --mods: 128 on a GPU, 64 on the CPU)")
    p.add_argument("--br", type=int, help="the default run and --sweep: query rows per tile, Br, of versions 1 and 2 "
                   "(default 32, or MINIMAL_FLASH_BR where set)")
    p.add_argument("--bc", type=int, help="the default run and --sweep: keys per tile, Bc, of versions 1 and 2 "
                   "(default 32, or MINIMAL_FLASH_BC where set)")
    p.add_argument("--causal", action="store_true",
                   help="the default run and --sweep (--varlen and --mods are causal always, --decode never)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="fp32 (versions 1 and 2), or bf16 / fp16 (versions 3 and 4, tensor cores); default fp32; "
                        "--decode, --varlen and --mods: bf16 (they take bf16 or fp16 only)")
    p.add_argument("--version", type=int, choices=list(mf.VERSIONS),
                   help="our kernels in the default run and --mods (default: what flash_attention picks for the "
                        "dtype and d: 2 for fp32; 4 on a Hopper GPU up to d = 128, else 3, for bf16 and fp16; --mods: "
                        "3 or 4). --sweep times every version for the dtype (--methods chooses); --decode and --varlen "
                        "run version 3's build. " + ", ".join(
                            f"{n} = {v.name} ({', '.join(v.kernels)})" for n, v in mf.VERSIONS.items()))
    p.add_argument("--warmup", type=at_least(0), help="untimed calls first (default 10 on a GPU, 2 on the CPU)")
    p.add_argument("--repeats", type=positive,
                   help="timed calls per method (default 200 on a GPU, 10 on the CPU, or --min-repeats where that is "
                        "more); in the modes that take --seconds, at most")
    p.add_argument("--no-profile", action="store_true",
                   help="the default run: skip the torch.profiler tables (the other modes never profile)")
    p.add_argument("--cpu", action="store_true",
                   help="use the CPU emulation even if there is a GPU (--replot: ignored, it runs nothing)")
    modes = p.add_mutually_exclusive_group()
    modes.add_argument("--sweep", action="store_true", help="sweep N, with SDPA too; write a table, CSV and plots")
    modes.add_argument("--decode", action="store_true",
                       help="time one decode step over a KV cache (flash_attn_with_kvcache, SDPA, manual); write a "
                            "table and decode.csv. -B (default 1 8 64; 1 2 on the CPU), --context, -H (default 32), "
                            "--heads-k, -d (default 128), --dtype (bf16 or fp16; default bf16), --methods, "
                            "--seconds, --min-repeats, --warmup, --repeats, --out apply")
    p.add_argument("--context", type=positive, nargs="+", action=Distinct,
                   help="--decode: cache lengths, each once (default 1024 to 131072 on a GPU, 64 and 300 on the CPU)")
    p.add_argument("--heads-k", type=positive,
                   help="--decode and --varlen: key/value heads, each shared by -H / --heads-k query heads "
                        "(default 8; --varlen on the CPU: 2)")
    p.add_argument("--out", type=Path,
                   help="where --sweep, --decode, --varlen and --mods write (default bench-results); made before "
                        "anything is measured")
    p.add_argument("--seconds", type=positive_seconds,
                   help="--sweep, --decode, --varlen, --mods: timed seconds per method and pass, at most (default 2); "
                        "fewer repeats for slow ones")
    p.add_argument("--min-repeats", type=positive,
                   help="--sweep, --decode, --varlen, --mods: timed calls per method, at least (default 5, or "
                        "--repeats where that is fewer); at most --repeats")
    p.add_argument("--methods", nargs="+", metavar="NAME",
                   help="only these methods, by their exact names (default: all): --sweep: manual, minimal-flash "
                        "(version 1), minimal-flash2, ... (the versions for the dtype; minimal-flash4-deterministic), "
                        "sdpa (every SDPA backend timed) or one of them, e.g. sdpa-cudnn; --decode: manual, "
                        "minimal-flash, minimal-flash-paged, sdpa-flash, sdpa-cudnn; --varlen: "
                        "minimal-flash3-varlen, minimal-flash3-padded, sdpa or one of its backends; --mods: "
                        "minimal-flash3 or 4 (--version's, with the mod), minimal-flash3-no-mod (or 4), flex-attention")
    modes.add_argument("--replot", type=Path, metavar="CSV",
                       help="only redraw the plots of a sweep.csv (GPU or CPU, as the file says), beside it")
    p.add_argument("--tf32", action="store_true", help="allow TF32 in manual attention's and SDPA's matmuls in fp32 "
                   f"(then held to {TF32_TOLERANCE:g}; our kernels are plain fp32 either way); in bf16 and fp16, and "
                   "so in --decode, --varlen and --mods, it changes nothing")
    modes.add_argument("--varlen", action="store_true",
                       help="time a causal prefill of sequences of different lengths, packed (flash_attn_varlen_func) "
                            "and padded (flash_attention, SDPA), version 3; write a table and varlen.csv. -B: the "
                            "sequences (default 8; 3 on the CPU), --lengths, -H, --heads-k (default 32 and 8; 4 and 2 "
                            "on the CPU), -d (default 128; 64 on the CPU; up to 256), --dtype (bf16 or fp16; default "
                            "bf16), --methods, --seconds, --min-repeats, --warmup, --repeats, --out apply")
    p.add_argument("--lengths", type=positive, nargs=2, metavar=("MIN", "MAX"),
                   help="--varlen: the sequences' lengths are drawn from MIN to MAX (default 512 8192; 1 130 on "
                        "the CPU)")
    modes.add_argument("--mods", action="store_true",
                       help="time chapter 6's mods (causal as a mask_mod, a sliding window, softcap, ALiBi) on version "
                            "3's or 4's kernels (--version; default: the default version), against the same kernels "
                            "without the mod and FlexAttention; write a table and mods.csv. -B, -H, -N (one), -d "
                            "(default 4, 16, 4096, 128; 1, 2, 128, 64 on the CPU), --dtype (bf16 or fp16; default "
                            "bf16), --methods, --seconds, --min-repeats, --warmup, --repeats, --out apply")
    args = p.parse_args(argv)
    mode = next((m for m in MODES if getattr(args, m) not in (None, False)), "default")
    for flag, applies in OPTION_MODES.items():  # each option given only where it is read
        if getattr(args, flag.split("/")[-1][2:].replace("-", "_")) not in (None, False) and mode not in applies:
            p.error(f"{flag} applies to {mf._one_of([mode_name(m) for m in applies])}, not {mode_name(mode)}")
    gpu = torch.cuda.is_available() and not args.cpu
    if args.mods:  # the mods are compiled into the kernels of versions 3 and 4, in half precision
        if args.version not in (None, *MODS_VERSIONS) or args.dtype == "fp32":
            p.error("--mods: the mods are compiled into the kernels of versions 3 and 4, bf16 or fp16; give "
                    "--version 3, 4 or none, and --dtype bf16, fp16 or none")
        sizes = MODS_GPU if gpu else MODS_CPU
        args.heads, args.head_dim = or_default(args.heads, sizes["heads"]), or_default(args.head_dim, sizes["d"])
        args.seq_len = or_default(args.seq_len, [sizes["N"]])
        if len(args.seq_len) > 1:
            p.error("--mods: one sequence length")
    if args.varlen:  # flash_attn_varlen_func runs version 3's kernels, in half precision
        sizes = VARLEN_GPU if gpu else VARLEN_CPU
        args.heads, args.heads_k = or_default(args.heads, sizes["heads"]), or_default(args.heads_k, sizes["heads_k"])
        args.head_dim, args.lengths = or_default(args.head_dim, sizes["d"]), or_default(args.lengths, sizes["lengths"])
        if args.head_dim > max(mf.VERSIONS[3].head_dims):
            p.error(f"--varlen: -d {args.head_dim}: version 3's kernels take d up to {max(mf.VERSIONS[3].head_dims)}")
        if args.heads % args.heads_k:
            p.error("--varlen: -H must be a multiple of --heads-k (each key/value head serves a group of query heads)")
        if not args.lengths[0] <= args.lengths[1]:
            p.error(f"--lengths {args.lengths[0]} {args.lengths[1]}: 1 <= MIN <= MAX")
    if args.decode:  # flash_attn_with_kvcache's kernels, in version 3's build: half precision
        args.head_dim = or_default(args.head_dim, DECODE_HEAD_DIM)
        if not mf.decode_takes_head_dim(args.head_dim):
            p.error(f"--decode: -d {args.head_dim}: the decode kernels take a multiple of 8 up to "
                    f"{max(mf.DECODE_HEAD_DIMS)}")
        if or_default(args.heads, DECODE_HEADS) % or_default(args.heads_k, DECODE_HEADS_K):
            p.error("--decode: -H must be a multiple of --heads-k (each key/value head serves a group of query heads)")
    if args.dtype == "fp32" and (args.decode or args.varlen):
        p.error(f"--{mode}: version 3's kernels take bf16 or fp16; give --dtype bf16, fp16 or none")
    args.dtype = DTYPES[args.dtype or ("fp32" if mode in ("default", "sweep") else "bf16")]
    if args.batch is not None and not args.decode:  # the other modes take one batch size
        if len(args.batch) > 1:
            p.error("-B/--batch: one batch size, except with --decode")
        args.batch = args.batch[0]
    args.device = "cuda" if gpu else "cpu"
    if args.decode or args.varlen:
        args.version = 3  # their kernels are version 3's build
    elif args.version is None:
        args.version = mf.default_version(args.dtype, args.device, args.head_dim)
    elif args.version not in versions_for(args.dtype):
        p.error(f"version {args.version} does not take {args.dtype}: versions {versions_for(args.dtype)} do")
    # The block sizes of each of our versions that will run, checked with its own rule, and kept: in the
    # sweep, those of the methods asked for.
    versions = [args.version] if mode == "default" else [] if not args.sweep else [
        v for v in versions_for(args.dtype) if not args.methods or set(version_methods(v)) & set(args.methods)]
    if not versions and (args.br is not None or args.bc is not None):
        p.error("--br/--bc: none of the methods asked for is one of our versions 1 and 2, which take block sizes")
    try:
        args.block_sizes = {v: mf.block_sizes(v, args.br, args.bc) for v in versions}
    except (ValueError, TypeError) as error:  # TypeError: a MINIMAL_FLASH_BR / _BC that is not a number
        p.error(str(error))
    refusal = version_refusal(args.version, args.device) if mode in ("default", "mods") else None
    if refusal:  # the sweep leaves such a version out instead, and says so
        p.error(f"version {args.version}: {refusal}")
    if args.mods and args.head_dim not in mf.VERSIONS[args.version].head_dims:
        p.error(f"--mods: version {args.version} takes d = {mf._one_of(mf.VERSIONS[args.version].head_dims)}")
    args.head_dim = or_default(args.head_dim, 64 if gpu else 32)
    for v in [args.version] if mode in ("default", "mods") else versions:  # (1 and 2: any d shared memory holds)
        dims = mf.VERSIONS[v].head_dims
        if dims is not None and args.head_dim > max(dims):
            p.error(f"-d {args.head_dim}: version {v} is compiled for d = {mf._one_of(dims)} (a d between them runs "
                    "padded up to the next)")
    args.warmup = or_default(args.warmup, 10 if gpu else 2)
    # --repeats and --min-repeats: both given, they must agree; one given, the other's default yields to it.
    if args.repeats is not None and args.min_repeats is not None and args.repeats < args.min_repeats:
        p.error(f"--repeats {args.repeats} is fewer than --min-repeats {args.min_repeats}")
    args.min_repeats = or_default(args.min_repeats, min(5, or_default(args.repeats, 5)))
    args.repeats = or_default(args.repeats, max(200 if gpu else 10, args.min_repeats))
    args.seconds = or_default(args.seconds, 2.0)
    if mode in TIMED:
        args.out = or_default(args.out, Path("bench-results"))
    return args


def random_inputs(shape, device, sets, dtype=torch.float32):
    """`sets` sets of fresh q, k, v and an output gradient dO, all standard normal."""
    return [[torch.randn(shape, device=device, dtype=dtype) for _ in range(4)] for _ in range(sets)]


def input_sets(shape, device, dtype=torch.float32):
    """How many sets of q, k, v, dO to rotate through: on a GPU, enough to overflow the L2 cache twice."""
    return sets_past_l2(4 * math.prod(shape) * dtype.itemsize, device)


def sets_past_l2(set_bytes, device):
    """How many input sets of set_bytes each to rotate through so that no call finds its inputs
    cached by the previous one: on a GPU, enough to overflow the L2 cache twice (at most 64)."""
    if device != "cuda":
        return 1
    return min(64, math.ceil(2 * torch.cuda.get_device_properties(device).L2_cache_size / set_bytes))


def gradients(fn, q, k, v, dO, causal):
    """Runs fn forward with autograd on and returns a function that runs its backward pass alone:
    dQ, dK, dV of sum(O * dO). The graph is kept, so the backward can be run again and again."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    O = fn(q, k, v, causal)
    return lambda: torch.autograd.grad(O, (q, k, v), dO, retain_graph=True)


def grads_err(grads, refs):
    """Relative error of dQ, dK, dV taken together: ||(dQ, dK, dV) - ref|| / ||ref||. Taken one by
    one, dQ and dK at N = 1 have no relative error: there they are exactly zero."""
    return mf.relative_error(torch.cat([g.flatten() for g in grads]), torch.cat([r.flatten() for r in refs]))


def check(methods, q, k, v, dO, causal, tf32=()):
    """Relative errors of each method's O and dQ, dK, dV against float64 manual attention, printed;
    returns {method: (O error, gradients' error)}. In fp32 a method may be off by 1e-4, one of `tf32`
    (the methods whose matmuls --tf32 lets round to TF32) by TF32_TOLERANCE; in bf16 or fp16 by up to
    twice what manual attention in the same dtype is (the official FlashAttention tests' rule)."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_O = mf.manual_attention(q64, k64, v64, causal=causal)
    ref_grads = gradients(plain_attention, q64, k64, v64, dO.double(), causal)()
    errors = {}
    for name, fn in methods.items():
        err_O = mf.relative_error(fn(q, k, v, causal), ref_O)
        err_grads = grads_err(gradients(fn, q, k, v, dO, causal)(), ref_grads)
        print(f"  {name}: relative error vs float64: O {err_O:.1e}, dQ, dK, dV {err_grads:.1e}")
        errors[name] = (err_O, err_grads)

    def limit(name):
        if q.dtype != torch.float32:
            return 2 * max(errors["manual"])
        return TF32_TOLERANCE if name in tf32 else 1e-4
    assert all(max(e) <= limit(name) for name, e in errors.items()), "the methods disagree with float64 attention"
    return errors


def profile_table(title, call, device):
    """The torch.profiler table of 5 calls of call(), after the warm-up that check() did."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            with record_function(title):  # one row for the whole call, our extension included
                call()
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"\n=== {title} (5 calls) ===")
    sort = "device_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=8))


# Kernel names that are attention's own: ours (flash3_hopper::, flash_decode::, ...) and SDPA's backends'
# (FlashAttention-2's flash_fwd_kernel, cuDNN's ..._native_sdpa_..., the efficient one's fmha_cutlass...)
ATTENTION_KERNELS = ("flash", "sdpa", "fmha")


def busy_ms(intervals):
    """How long the GPU was busy over (start, end) intervals in microseconds, an overlap counted once, in ms."""
    busy, reach = 0.0, -math.inf  # reach: where the intervals so far end
    for start, end in sorted(intervals):
        if end > reach:
            busy += end - max(start, reach)
            reach = end
    return busy / 1e3


def gpu_busy(call):
    """call() once under torch.profiler, on a GPU: (the ms its kernels kept the GPU busy, the ms of those
    among them that are attention's own, by name). Beside the call's own time it says whether the call
    waits for the GPU or for the host that launches its kernels (an eager training step launches hundreds)."""
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        call()
        torch.cuda.synchronize()
    kernels = [(e.time_range.start, e.time_range.end, e.name.lower()) for e in trace.events()
               if str(e.device_type).endswith("CUDA")]
    attention = [(start, end) for start, end, name in kernels if any(word in name for word in ATTENTION_KERNELS)]
    return busy_ms((start, end) for start, end, _ in kernels), busy_ms(attention)


def time_calls(calls, n, device):
    """Times n calls, each the next function of `calls`, round and round (each works on its own
    inputs); returns the n times in ms. On a GPU, CUDA events: the GPU's own clock, start to end."""
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
        for i, (start, end) in enumerate(events):
            start.record()
            calls[i % len(calls)]()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in events]
    times = []
    for i in range(n):
        start = time.perf_counter()
        calls[i % len(calls)]()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def median_ms(calls, warmup, repeats, device, seconds=None, min_repeats=1, warm_seconds=0.2):
    """Median time of one call in ms, and how many calls were timed. Untimed warm-up calls first:
    the first pays for compilation, caches, the allocator; then at least `warmup` calls and at least
    `warm_seconds` of them, because a GPU that was idle starts at a low clock and needs a moment of
    work to reach its full one (seen here: 0.081 ms instead of 0.049 after 10 short calls). With
    `seconds`, a slow method gets only as many calls as fit in that time, but at least min_repeats."""
    return interleaved_ms({None: calls}, warmup, repeats, device, seconds, min_repeats, warm_seconds)[None]


def interleaved_ms(calls, warmup, repeats, device, seconds=None, min_repeats=1, warm_seconds=0.2):
    """median_ms for several methods at once, {name: its calls} -> {name: (median ms, calls timed)}: the
    methods taken in turn, one call each a round, so that whatever drifts during a run (on a lent H100 the
    same call's median moved by 16% between mods timed one after another) falls on all of them alike, and
    their ratios hold. `seconds` bounds the slowest method's timed calls; every method gets as many."""
    names = list(calls)

    def rounds(n, start=0):  # n rounds, each method's calls (its inputs) rotated from the start-th
        return [calls[name][(start + r) % len(calls[name])] for r in range(n) for name in names]

    time_calls(rounds(1), len(names), device)  # the first call of each pays for its compilation
    if seconds is not None:
        slowest = max(time_calls(rounds(1), len(names), device))
        fit = int(seconds * 1e3 / max(slowest, 1e-3))
        warmup, repeats = min(warmup, fit), max(min_repeats, min(repeats, fit))
    warm_until, n = time.perf_counter() + warm_seconds, 0
    while n < warmup or time.perf_counter() < warm_until:
        time_calls(rounds(1, n), len(names), device)  # synchronised: the clock counts finished work
        n += 1
    times = time_calls(rounds(repeats), repeats * len(names), device)
    return {name: (statistics.median(times[i::len(names)]), repeats) for i, name in enumerate(names)}


def run_profile(args):
    """The default run: value check, timing, profiler tables (first N only), then the timing table."""
    device = args.device
    Br, Bc = args.block_sizes[args.version]
    gpu = device == "cuda"
    B, H = or_default(args.batch, 16 if gpu else 2), or_default(args.heads, 12 if gpu else 4)
    methods = {"manual": plain_attention,
               "flash": lambda q, k, v, causal: mf.flash_attention(q, k, v, causal=causal, Br=Br, Bc=Bc,
                                                                    version=args.version)}
    sizes = f" Br={Br} Bc={Bc}" if Br is not None else ""
    print(f"B={B} H={H} d={args.head_dim}{sizes} causal={args.causal} version={args.version} "
          f"dtype={str(args.dtype).removeprefix('torch.')}")
    rows, profiled = [], []  # profiled: (title, call) of the first N, profiled once every N is timed
    seq_lens = or_default(args.seq_len, [64])
    for N in seq_lens:
        shape = (B, H, N, args.head_dim)
        inputs = random_inputs(shape, device, input_sets(shape, device, args.dtype), args.dtype)
        print(f"\nN={N}: {len(inputs)} set(s) of q, k, v, dO, "
              f"{4 * math.prod(shape) * args.dtype.itemsize / 2**20:.1f} MiB each")
        # also compiles the kernels, untimed; under --tf32 manual attention is only TF32-accurate
        errors = check(methods, *inputs[0], args.causal, tf32=("manual",) if args.tf32 else ())
        forward_calls = {name: [lambda fn=fn, q=q, k=k, v=v: fn(q, k, v, args.causal) for q, k, v, _ in inputs]
                         for name, fn in methods.items()}
        backward_calls = {name: [gradients(fn, *qkv_dO, args.causal) for qkv_dO in inputs]
                          for name, fn in methods.items()}
        times = {(name, pass_): median_ms(calls[name], args.warmup, args.repeats, device)[0]
                 for pass_, calls in zip(PASSES, (forward_calls, backward_calls)) for name in methods}
        if not args.no_profile and N == seq_lens[0]:
            profiled = [(title, calls[name][0]) for name in methods
                        for title, calls in ((name, forward_calls), (f"{name} backward", backward_calls))]
        rows.append((N, times, errors["flash"]))
        del backward_calls  # frees the saved graphs before the next N (the one profiled call's excepted)
    # Profiled after every N is timed: the profiler hooks into every launch, and on a GPU its hooks
    # (CUPTI's) stay in the process's later launches, a cost on the host that timed calls must not pay.
    for title, call in profiled:
        profile_table(title, call, device)

    clock = "CUDA events" if device == "cuda" else "CPU clock, emulation"
    print(f"\nMedian of {args.repeats} warm calls ({clock}), in ms; speed-up = manual time / flash time."
          "\nBackward: the backward pass alone, through autograd. err: flash against float64, "
          "O and dQ, dK, dV taken together.")
    print(f"{'N':>6} | {'manual':>8} {'flash':>8} {'speed-up':>8} | {'manual':>8} {'flash':>8} "
          f"{'speed-up':>8} | {'err O':>7} {'err dQKV':>8}")
    print(f"{'':>6} | {'forward':^26} | {'backward':^26} |")
    for N, t, (err_O, err_grads) in rows:
        line = f"{N:>6}"
        for pass_ in PASSES:
            manual, flash = t["manual", pass_], t["flash", pass_]
            line += f" | {manual:>8.4f} {flash:>8.4f} {manual / flash:>7.2f}x"
        print(f"{line} | {err_O:>7.1e} {err_grads:>8.1e}")


# ---------------------------------------------------------------------------------------------
# The sweep


# SDPA's backends in the order it tries them itself.
SDPA_ORDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.MATH)
# In bf16 and fp16 on a GPU the sweep times two of them side by side: FlashAttention-2, what chapter 3
# set out to reach, and cuDNN's, which on Hopper uses the instructions chapter 4 teaches.
SDPA_HALF = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION)


def sdpa_name(backend):
    """The method's name in tables and CSVs: sdpa-flash, sdpa-efficient, sdpa-cudnn, sdpa-math."""
    return "sdpa-" + backend.name.lower().removesuffix("_attention")


def sdpa_refusal(backend, device, causal, dtype, head_dim):
    """Why SDPA pinned to `backend` does not run this attention here, forward and backward; None if it
    does. Tried on a small problem of the same kind; torch gives its reasons as warnings."""
    q = torch.randn(1, 1, 64, head_dim, device=device, dtype=dtype, requires_grad=True)

    def forward_and_backward():
        with sdpa_kernel(backend):
            O = F.scaled_dot_product_attention(q, q, q, is_causal=causal)
        # Outside the pin, as the sweep runs it: the graph holds this backend's own backward.
        torch.autograd.grad(O.sum(), q)
    return sdpa_refusal_of(forward_and_backward)


def sdpa_refusal_of(call):
    """Why call(), of SDPA under a pin, does not run: torch's reasons, which it gives as warnings; None
    if it runs."""
    with warnings.catch_warnings(record=True) as reasons:
        warnings.simplefilter("always")
        try:
            call()
            return None
        except RuntimeError as error:  # "No viable backend": this one does not take this problem here
            said = [str(w.message).split(" (Triggered internally")[0] for w in reasons]
            # torch speaks of every backend: the others, off under the pin, and a heading per backend
            why = [m for m in said if not m.endswith(("has been runtime disabled.", "not used because:"))]
            return " ".join(why or said or [str(error)])


def sdpa_backend(device, causal, dtype, head_dim):
    """The backend SDPA picks for this problem here: the first, in its own order, that runs it. The
    sweep then pins it, so the name we print is certainly what ran."""
    backend = next((b for b in SDPA_ORDER if sdpa_refusal(b, device, causal, dtype, head_dim) is None), None)
    if backend is None:
        raise RuntimeError(f"no SDPA backend runs {dtype} here")
    return backend


def sdpa_backends(device, causal, dtype, head_dim):
    """The SDPA backends the sweep times. In half precision on a GPU, FlashAttention-2's and cuDNN's,
    each where it runs (one that does not is left out, with a line saying why: never another in its
    place, unless neither runs); elsewhere the one SDPA picks, as ever."""
    if device == "cpu" or dtype == torch.float32:
        return [sdpa_backend(device, causal, dtype, head_dim)]
    backends = []
    for backend in SDPA_HALF:
        refusal = sdpa_refusal(backend, device, causal, dtype, head_dim)
        if refusal:
            print(f"{sdpa_name(backend)} left out: SDPA's {backend.name} does not run "
                  f"{str(dtype).removeprefix('torch.')}, causal={causal}, "
                  f"d={head_dim} on this GPU: {refusal}")
        else:
            backends.append(backend)
    if not backends:
        backend = sdpa_backend(device, causal, dtype, head_dim)
        print(f"{sdpa_name(backend)} instead: the backend SDPA picks for this problem here")
        backends.append(backend)
    return backends


def sdpa_pinned(backend, **options):
    """SDPA, called as every method is, on `backend` alone: no other in its place. options: SDPA's
    own (enable_gqa)."""
    def sdpa(q, k, v, causal):
        with sdpa_kernel(backend):  # the backward runs the same backend: the graph records it
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **options)
    return sdpa


def plain_attention(q, k, v, causal):
    """Plain attention, called as every method is: fn(q, k, v, causal)."""
    return mf.manual_attention(q, k, v, causal=causal)


def method_name(version):
    """Our kernels' name in tables and CSVs: minimal-flash (version 1), minimal-flash2, ..."""
    return "minimal-flash" + ("" if version == 1 else str(version))


def version_refusal(version, device):
    """Why our kernels' `version` cannot run on this device ("cuda" or "cpu"), or None: what
    minimal_flash.version_unavailable says, where it has one (a version for one GPU architecture)."""
    unavailable = getattr(mf, "version_unavailable", None)
    return unavailable(version, device) if unavailable else None


def sweep_versions(args):
    """Our versions for the dtype that run on this device; each other one left out with a line saying why."""
    versions = []
    for version in versions_for(args.dtype):
        refusal = version_refusal(version, args.device)
        if refusal:
            print(f"{method_name(version)} left out: {refusal}")
        else:
            versions.append(version)
    return versions


def sweep_methods(args):
    """{name: fn(q, k, v, causal)}: manual attention, our kernels in every version for the dtype that
    runs here (the paper's loop order, FlashAttention-2's, ...; forward and backward), SDPA on each
    backend sdpa_backends gives, pinned."""
    def ours(version, deterministic=False):
        def call(q, k, v, causal):  # the block sizes parse_args checked: only for the versions --methods chose
            Br, Bc = args.block_sizes[version]
            return mf.flash_attention(q, k, v, causal=causal, Br=Br, Bc=Bc, version=version,
                                      deterministic=deterministic)
        return call

    # A version whose deterministic=True is a mode of its own (a different backward) is timed in it too.
    ours_methods = {name: ours(v, name.endswith("-deterministic"))
                    for v in sweep_versions(args) for name in version_methods(v)}
    backends = sdpa_backends(args.device, args.causal, args.dtype, args.head_dim)
    return {"manual": plain_attention, **ours_methods, **{sdpa_name(b): sdpa_pinned(b) for b in backends}}


def chosen_methods(methods, names):
    """The methods named in --methods, all if none is. Names are exact (minimal-flash is not also
    minimal-flash-paged), but for "sdpa": every SDPA backend timed."""
    if not names:
        return methods
    sdpa = [m for m in methods if m.startswith("sdpa-")]
    named = {m for name in names for m in (sdpa if name == "sdpa" else [name])}
    unknown = [name for name in names if name not in methods and not (name == "sdpa" and sdpa)]
    if unknown:
        choices = ", ".join([m for m in methods if m not in sdpa] + ([f"sdpa ({', '.join(sdpa)})"] if sdpa else []))
        sys.exit(f"bench: unknown method {unknown[0]!r}; choose from {choices}")
    return {m: fn for m, fn in methods.items() if m in named}


def flops(B, H, N, d, causal, pass_):
    """The floating-point work the problem needs. Forward: S = Q K^T and P V, 2 N^2 d each. Backward:
    dV = P^T dO, dP = dO V^T, dQ = dS K, dK = dS^T Q, 2 N^2 d each (our kernel also recomputes S,
    a fifth product, which is not counted: it is the kernel's choice, not the problem's). Causal:
    only the N (N + 1) / 2 visible (query, key) pairs count."""
    pairs = N * (N + 1) / 2 if causal else N * N
    return B * H * pairs * d * (4 if pass_ == "forward" else 8)


def manual_fits(shape, device):
    """Manual attention's backward holds about five N x N fp32 matrices per (batch, head) (S, P and
    their gradients, and a temporary); on a GPU it must fit in the free memory."""
    if device != "cuda":
        return True
    B, H, N, _ = shape
    return 5 * B * H * N * N * 4 < torch.cuda.mem_get_info(device)[0]


def extra_peak_mib(call, device):
    """Peak memory call() allocates beyond what is already allocated, in MiB; None on the CPU,
    where torch keeps no such count."""
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    result = call()
    torch.cuda.synchronize()
    del result
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def training_step(fn, q, k, v, dO, causal):
    """Forward with autograd, then backward from fresh inputs: what a training step holds at once."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    return torch.autograd.grad(fn(q, k, v, causal), (q, k, v), dO)


def measure_method(fn, inputs, args):
    """Times one method's forward and backward on the input sets; returns {pass: (ms, repeats)},
    its outputs on set 0 (O and the gradients, for the check) and {pass: extra peak MiB}."""
    causal, timing = args.causal, dict(seconds=args.seconds, min_repeats=args.min_repeats)
    forward_calls = [lambda q=q, k=k, v=v: fn(q, k, v, causal) for q, k, v, _ in inputs]
    times = {"forward": median_ms(forward_calls, args.warmup, args.repeats, args.device, **timing)}
    backward_calls = [gradients(fn, *qkv_dO, causal) for qkv_dO in inputs]
    times["backward"] = median_ms(backward_calls, args.warmup, args.repeats, args.device, **timing)
    q, k, v, dO = inputs[0]
    outputs = (fn(q, k, v, causal), *backward_calls[0]())
    del backward_calls  # their saved graphs would count in the memory below
    # Measured warm, so that one-time allocations (library workspaces) do not count as extra.
    memory = {"forward": extra_peak_mib(lambda: fn(q, k, v, causal), args.device),
              "backward": extra_peak_mib(lambda: training_step(fn, q, k, v, dO, causal), args.device)}
    return times, outputs, memory


def sweep_point(N, B, H, methods, args, progress):
    """All methods at one N. Returns a list of rows (dicts), one per (method, pass)."""
    shape = (B, H, N, args.head_dim)
    inputs = random_inputs(shape, args.device, input_sets(shape, args.device, args.dtype), args.dtype)
    rows, reference = [], None
    ours = {method_name(v): v for v in args.block_sizes}
    for name, fn in methods.items():
        Br, Bc = args.block_sizes[ours[name]] if name in ours else (None, None)  # where block sizes apply
        base = dict(N=N, B=B, H=H, d=args.head_dim, Br=Br, Bc=Bc, causal=args.causal,
                    dtype=str(args.dtype).removeprefix("torch."), method=name)
        if name == "manual" and not manual_fits(shape, args.device):
            note = "skipped: its N x N matrices would not fit in GPU memory"
            rows += [dict(base, **{"pass": p, "note": note}) for p in PASSES]
            progress(f"N={N}: manual {note}")
            continue
        try:
            times, outputs, memory = measure_method(fn, inputs, args)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            rows += [dict(base, **{"pass": p, "note": "skipped: out of GPU memory"}) for p in PASSES]
            progress(f"N={N}: {name} ran out of GPU memory, skipped")
            continue
        # The check: each method against manual attention on the same inputs (or, where manual was
        # skipped, against the first method that ran): O for the forward, dQ, dK, dV for the backward.
        if reference is None:
            reference, check = (name, outputs), {}
        else:
            check = dict(zip(PASSES, (mf.relative_error(outputs[0], reference[1][0]),
                                      grads_err(outputs[1:], reference[1][1:]))))
        for pass_ in PASSES:
            ms, repeats = times[pass_]
            row = dict(base, **{"pass": pass_}, ms=ms, repeats=repeats,
                       tflops=flops(B, H, N, args.head_dim, args.causal, pass_) / ms / 1e9,
                       extra_mib=memory[pass_])
            if check:
                row.update(checked_against=reference[0], rel_err=check[pass_])
            rows.append(row)
            progress(f"N={N} B={B} H={H}: {name} {pass_} {ms:.4f} ms (median of {repeats})"
                     + (f", err vs {reference[0]} {check[pass_]:.1e}" if check else ""))
    for row in rows:  # the ratio to manual: its time over this method's
        manual = next((r for r in rows if r["method"] == "manual" and r["pass"] == row["pass"]), {})
        if "ms" in row and "ms" in manual:
            row["x_manual"] = manual["ms"] / row["ms"]
    return rows


CSV_FIELDS = ["N", "B", "H", "d", "Br", "Bc", "causal", "dtype", "method", "pass", "ms", "repeats", "tflops",
              "x_manual", "extra_mib", "checked_against", "rel_err", "note"]


def write_csv(rows, path, fields=CSV_FIELDS):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fields})


def read_csv(path):
    """The rows of one of bench.py's CSVs (a sweep's, --decode's, --varlen's, --mods'; notebook 7's gpt.csv), as
    it made them: numbers as numbers, empty cells left out."""
    types = dict(N=int, B=int, H=int, d=int, Br=int, Bc=int, repeats=int, ms=float, tflops=float, x_manual=float,
                 extra_mib=float, rel_err=float, causal=lambda s: s == "True", batch=int, context=int,
                 graph_us=float, fraction_of_read=float, ns_per_token=float, x_padded=float, tokens_per_s=float,
                 peak_gib=float, pairs=int, **{f"{key}_{pass_}": float for pass_ in ("fwd", "bwd") for key in (
                     "ms", "tflops", "x_no_mod", "x_flex", "rel_err", "plain_err")}, ms_fwd_bwd=float,
                 repeats_fwd=int, repeats_fwd_bwd=int, nheads=int, nheads_k=int, tokens=int, padded_tokens=int,
                 bytes=int, eager_us=float, host_us=float, gb_per_s=float, fraction_of_copy=float,
                 fraction_of_spec=float, x_best_sdpa=float, max_err=float, plain_err=float, version=int, step=int)
    with open(path, newline="") as f:
        return [{k: types.get(k, str)(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def flop_unit(rows, keys=("tflops",)):
    """TFLOP/s for a GPU's rates; GFLOP/s where every rate (the rows' `keys`, in TFLOP/s) is below 1 TFLOP/s
    (the CPU emulation)."""
    fastest = max((r.get(key, 0) for r in rows for key in keys), default=0)
    return ("TFLOP/s", 1) if fastest >= 1 else ("GFLOP/s", 1e3)


def cell(row, key, fmt, width, factor=1):
    """row[key] formatted to `width` characters, "-" where the row has none."""
    value = row.get(key)
    return f"{'-':>{width}}" if value is None else f"{value * factor:{fmt}}".rjust(width)


def format_table(rows):
    """One line per (N, method): forward and backward side by side."""
    unit, per_tflop = flop_unit(rows)

    lines = [f"{'N':>6} {'B*H':>4}  {'method':<15}|{'ms':>9} {unit:>8} {'x manual':>8} {'MiB':>8}  "
             f"|{'ms':>9} {unit:>8} {'x manual':>8} {'MiB':>8}  | {'err':>7}",
             f"{'':>28}|{'forward (MiB: extra peak)':^37}|{'backward (MiB: whole step)':^37}|"]
    by_method = {}
    for row in rows:
        by_method.setdefault((row["N"], row["method"]), {})[row["pass"]] = row
    for (N, method), passes in by_method.items():
        fwd, bwd = passes["forward"], passes["backward"]
        line = f"{N:>6} {fwd['B'] * fwd['H']:>4}  {method:<15}"
        for row in (fwd, bwd):
            line += (f"|{cell(row, 'ms', '.4f', 9)} {cell(row, 'tflops', '.2f', 8, per_tflop)} "
                     f"{cell(row, 'x_manual', '.2f', 7)}x {cell(row, 'extra_mib', '.1f', 8)}  ")
        errors = [r["rel_err"] for r in (fwd, bwd) if "rel_err" in r]
        line += f"| {max(errors):>7.1e}" if errors else f"| {fwd.get('note', 'ref')}"
        lines.append(line)
    return "\n".join(lines)


def plot(rows, path, key, ylabel, titles, title):
    """Log-log plot of `key` against N, forward and backward side by side, one line per method."""
    import matplotlib
    matplotlib.use("Agg")  # files only, no window: also on machines without a display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    Ns = sorted({r["N"] for r in rows})
    for ax, pass_, label in zip(axes, PASSES, titles):
        for method in dict.fromkeys(r["method"] for r in rows):
            points = [(r["N"], r[key]) for r in rows
                      if r["method"] == method and r["pass"] == pass_ and r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), marker="o", label=method)
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", xticks=Ns, xticklabels=[str(N) for N in Ns], xlabel="sequence length N",
               ylabel=ylabel, title=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(rows, out, gpu):
    """sweep_time.png, and on a GPU sweep_memory.png, in the folder `out`; returns their names."""
    slices = sorted({r["B"] * r["H"] for r in rows})
    shapes = f"B*H = {slices[0]}" if len(slices) == 1 else f"B*H from {slices[-1]} to {slices[0]}: see the table"
    where = "" if gpu else "; CPU emulation: these times say nothing about GPU speed"
    what = f"d = {rows[0]['d']}, {rows[0].get('dtype', 'float32')}"
    plot(rows, out / "sweep_time.png", "ms", "median ms", PASSES, f"Attention time vs N, {what} ({shapes}{where})")
    if not gpu:
        print("No GPU: extra memory is measured on a GPU only (torch.cuda.max_memory_allocated); "
              "no memory plot.")
        return ["sweep_time.png"]
    plot(rows, out / "sweep_memory.png", "extra_mib", "extra peak MiB",
         ("forward", "forward + backward (a training step)"),
         f"Extra peak GPU memory vs N, {what} ({shapes})")
    return ["sweep_time.png", "sweep_memory.png"]


# What plot_sweep reads of each row of a sweep's CSV.
SWEEP_COLUMNS = ("N", "B", "H", "d", "method", "pass", "ms")


def replot(path):
    """--replot: the plots of a sweep's CSV, redrawn beside it, their paths said. A file that is not such a
    CSV (missing, empty, another mode's, cut short) is a one-line error naming the problem."""
    try:
        rows = read_csv(path)
    except OSError as error:
        sys.exit(f"bench: --replot {path}: {error.strerror}")
    except (csv.Error, ValueError) as error:  # ValueError: a number's cell that holds no number
        sys.exit(f"bench: --replot {path}: not readable as a sweep's CSV: {error}")
    except TypeError:  # a missing cell (None) where a number belongs
        sys.exit(f"bench: --replot {path}: a row has fewer cells than the header: cut short?")
    lacking = [column for column in SWEEP_COLUMNS if not any(column in row for row in rows)]
    if not rows or lacking:
        sys.exit(f"bench: --replot {path}: not a sweep's CSV (bench.py --sweep writes one): "
                 + ("no rows" if not rows else f"no column {', '.join(lacking)}"))
    if any(column not in row for row in rows for column in SWEEP_COLUMNS[:-1]):  # ms: not where a method was skipped
        sys.exit(f"bench: --replot {path}: a row lacks one of {', '.join(SWEEP_COLUMNS[:-1])}: cut short?")
    written = plot_sweep(rows, path.parent, gpu=any("extra_mib" in row for row in rows))
    print(f"Wrote {', '.join(str(path.parent / name) for name in written)}")


def run_sweep(args):
    sweep = SWEEP_GPU if args.device == "cuda" else SWEEP_CPU
    points = [(N, *sweep.get(N, (1, 16))) for N in or_default(args.seq_len, sweep)]
    points = [(N, or_default(args.batch, B), or_default(args.heads, H)) for N, B, H in points]
    methods = chosen_methods(sweep_methods(args), args.methods)
    print(f"Sweep: d={args.head_dim}, causal={args.causal}, methods: {', '.join(methods)}; "
          f"at most {args.seconds:g} s of timed calls per method and pass, at least {args.min_repeats} calls")
    rows = []
    for i, (N, B, H) in enumerate(points):
        progress = lambda line, i=i: print(f"[{i + 1}/{len(points)}] {line}", file=sys.stderr, flush=True)
        progress(f"N={N}, B={B}, H={H} (B*H = {B * H})")
        rows += sweep_point(N, B, H, methods, args, progress)
        if args.device == "cuda":
            torch.cuda.empty_cache()  # the next point's memory count starts from a clean slate

    write_csv(rows, args.out / "sweep.csv")
    clock = "CUDA events" if args.device == "cuda" else "CPU clock, emulation"
    print(f"\nMedian ms ({clock}); {flop_unit(rows)[0]} of the work counted in flops(); "
          "x manual = manual's time over this method's; err = the larger relative error, of O and of dQ, dK, "
          "dV, against manual attention (ref) on the same inputs, or, where manual was skipped, against the "
          "first method that ran")
    print(format_table(rows))
    written = plot_sweep(rows, args.out, gpu=args.device == "cuda")
    print(f"Wrote {', '.join(str(args.out / name) for name in ['sweep.csv', *written])}")
    tolerance = TF32_TOLERANCE if args.tf32 and args.dtype == torch.float32 else TOLERANCE[args.dtype]
    bad = [r for r in rows if not r.get("rel_err", 0) <= tolerance]  # NaN fails too
    if bad:
        sys.exit(f"bench: {len(bad)} results disagree with {bad[0]['checked_against']}, e.g. "
                 f"{bad[0]['method']} {bad[0]['pass']} at N={bad[0]['N']}: rel err {bad[0]['rel_err']:.1e}")


# ---------------------------------------------------------------------------------------------
# Decode: one new token's attention over a KV cache


# The issue's grid: batch 1 to 64, context 1k to 128k; on the CPU, tiny sizes (the tests). 32 query
# heads share 8 key/value heads (grouped-query attention), d = 128, bf16: a Llama-style model's layer.
DECODE_GPU = dict(batch=(1, 8, 64), context=(1024, 4096, 16384, 32768, 65536, 131072))
DECODE_CPU = dict(batch=(1, 2), context=(64, 300))
DECODE_HEADS, DECODE_HEADS_K, DECODE_HEAD_DIM = 32, 8, 128
PAGE = 256  # tokens per page of the paged cache
# The share of the free memory a point's tensors may take; the rest is the allocator's and the graphs'.
MEMORY_SHARE = 0.6
H200_GB_PER_S = 4800  # the H200's specified memory bandwidth, 4.8 TB/s
# The bandwidth ceilings' tensor: on a GPU at least 1 GiB, far past the L2 cache, so that the
# reduction reads memory, not cache; on the CPU small, to be quick.
CEILING_BYTES = {"cuda": 2**30, "cpu": 2**26}
GRAPH_STEPS = 20  # steps in one CUDA graph, at least: a replay's own launch is then shared by many
DECODE_FIELDS = ["batch", "context", "nheads", "nheads_k", "d", "dtype", "method", "graph_us", "eager_us", "host_us",
                 "repeats", "bytes", "gb_per_s", "fraction_of_read", "fraction_of_copy", "fraction_of_spec",
                 "x_best_sdpa", "rel_err", "note"]


def paged(cache, table):
    """The cache (B, N, Hk, d) cut into pages of PAGE tokens: page j of sequence b is row table[b, j]
    of the result (pages, PAGE, Hk, d), as flash_attn_with_kvcache's block_table reads it. The last
    page's tail is zeros (cache_seqlens says where each sequence ends). One page column at a time:
    no second copy of the whole cache in between."""
    pages = cache.new_zeros(table.numel(), PAGE, *cache.shape[2:])
    for j in range(table.shape[1]):
        tokens = cache[:, j * PAGE:(j + 1) * PAGE]
        pages[table[:, j].long(), :tokens.shape[1]] = tokens
    return pages


def decode_methods():
    """{name: prepare(q, k_cache, v_cache) -> step}: prepare does, untimed, what a server does once (the
    layouts, the page table); step() is the decode step that is timed. q is (B, 1, H, d), the caches
    (B, N, Hk, d), each full: cache_seqlens = N. A step returns (B, 1, H, d) or SDPA's (B, H, 1, d),
    which, with one query row, hold their elements in the same order."""
    def ours(q, k, v):
        seqlens = torch.full((q.shape[0],), k.shape[1], dtype=torch.int32, device=q.device)
        return lambda: mf.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)

    def ours_paged(q, k, v):
        # The pages in a shuffled order, as a server's allocator leaves them after a while.
        B, pages = q.shape[0], math.ceil(k.shape[1] / PAGE)
        table = torch.randperm(B * pages, device=q.device).view(B, pages).to(torch.int32)
        k_pages, v_pages = paged(k, table), paged(v, table)
        seqlens = torch.full((B,), k.shape[1], dtype=torch.int32, device=q.device)
        return lambda: mf.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens, block_table=table)

    def sdpa(backend):
        fn = sdpa_pinned(backend, enable_gqa=True)

        def prepare(q, k, v):
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # views, made once: (B, H, 1, d), (B, Hk, N, d)
            return lambda: fn(q, k, v, False)
        return prepare

    def manual(q, k, v):
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        group = q.shape[1] // k.shape[1]
        # Plain attention has no grouped heads: k, v are repeated to q's heads in every step, as a
        # model without a GQA kernel does. That copy (group x the cache) is part of its time.
        return lambda: mf.manual_attention(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1))

    return {"minimal-flash": ours, "minimal-flash-paged": ours_paged,
            **{sdpa_name(b): sdpa(b) for b in SDPA_HALF}, "manual": manual}


def decode_reference(q, k, v):
    """Attention of q (B, 1, H, d) over the whole caches (B, N, Hk, d), in float64: each group of
    H / Hk query heads against its key/value head. One sequence at a time, so that only one
    sequence's float64 cache is held at once (1 GiB at N = 128k)."""
    B, _, H, d = q.shape
    Hk = k.shape[2]
    out = torch.empty(q.shape, dtype=torch.float64, device=q.device)
    for b in range(B):
        kb, vb = (t[b].double().transpose(0, 1) for t in (k, v))  # (Hk, N, d)
        out[b, 0] = mf.manual_attention(q[b, 0].double().view(Hk, H // Hk, d), kb, vb).view(H, d)
    return out


def synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def captured(steps):
    """The steps (one per input set, round and round until GRAPH_STEPS) captured in one CUDA graph: the
    graph and the number of steps in it."""
    n = len(steps) * math.ceil(GRAPH_STEPS / len(steps))
    # torch's rule for capture: warm up on a side stream first, so that one-time work (handles,
    # workspaces, our kernels' build) is done before, and not recorded.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for step in steps:
                step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(n):
            steps[i % len(steps)]()
    return graph, n


def graph_ms(steps, args):
    """GPU time of one step in ms, without the host's: the steps captured in one CUDA graph (captured),
    which is replayed; CUDA events around each replay, median, over the steps in it. Between two steps
    of a graph the GPU waits for no Python, as in a server that captures its decode step."""
    graph, n = captured(steps)
    ms, repeats = median_ms([graph.replay], args.warmup, args.repeats, "cuda", args.seconds, args.min_repeats)
    return ms / n, repeats


def host_ms(step, device, rounds=50):
    """Host time of one call in ms: perf_counter around a single call made from an idle, synchronised
    GPU; the median of `rounds` (5 on the CPU). A call only queues its kernels (launches are
    asynchronous), so this is the call's own Python and launch time, and what it waits for itself:
    flash_attn_with_kvcache's host check copies cache_seqlens to the CPU, which, from an idle GPU, is
    one short copy. Calls made back to back would time something else wherever a call waits: each
    would wait for the GPU work of the calls before it. On the CPU a call runs to its end: one call's
    whole time."""
    times = []
    for _ in range(rounds if device == "cuda" else 5):
        synchronize(device)
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    synchronize(device)
    return statistics.median(times)


def step_times(steps, args, note):
    """{graph_us, eager_us, repeats}: on a GPU, in a CUDA graph and eager; on the CPU eager only, by
    perf_counter (note gets to say why, and any graph that could not be captured)."""
    gpu = args.device == "cuda"
    eager, repeats = median_ms(steps, args.warmup, args.repeats, args.device, args.seconds, args.min_repeats)
    times = dict(eager_us=eager * 1e3, repeats=repeats)
    if not gpu:
        note.append("CPU: perf_counter, no CUDA graph")
        return times
    try:
        graph, times["repeats"] = graph_ms(steps, args)
        times["graph_us"] = graph * 1e3
    except RuntimeError as error:  # a call that synchronises, or one that cannot be captured
        note.append(f"not captured in a CUDA graph: {str(error).splitlines()[0]}")
        torch.cuda.synchronize()
    return times


def gb_per_s(row):
    """The bytes a timed row must move over its time: the GPU's, in a graph; on the CPU, the eager time."""
    us = row.get("graph_us", row.get("eager_us"))
    return None if us is None else row["bytes"] / us / 1e3


def bandwidth(rows, read, copy, device):
    """Adds to each timed row its GB/s, and that as a fraction of the ceilings measured in this run
    (read, copy: GB/s) and, on an H200, of its specified 4.8 TB/s."""
    h200 = device == "cuda" and "H200" in torch.cuda.get_device_name()
    for row in rows:
        if gb_per_s(row) is not None:
            row["gb_per_s"] = gb_per_s(row)
            row.update(fraction_of_read=row["gb_per_s"] / read, fraction_of_copy=row["gb_per_s"] / copy)
            if h200:
                row["fraction_of_spec"] = row["gb_per_s"] / H200_GB_PER_S


def ceilings(args):
    """The memory bandwidth of this device, measured now, as two rows: "read", a reduction (x.sum())
    over CEILING_BYTES of bf16, which reads every byte once, as a decode step reads its cache; and
    "copy", y.copy_(x), counted as the bytes read plus those written. A stream that only reads can beat
    the copy's figure: the read is the ceiling a decode step is held to."""
    x = torch.randn(CEILING_BYTES[args.device] // 2, dtype=torch.bfloat16, device=args.device)
    y = torch.empty_like(x)
    rows = []
    for method, step, moved, what in (("read", x.sum, x.nbytes, "x.sum()"),
                                      ("copy", lambda: y.copy_(x), 2 * x.nbytes, "y.copy_(x), read + written")):
        note = [f"{what} over {x.nbytes / 2**30:g} GiB of bf16"]
        rows.append(dict(method=method, bytes=moved, **step_times([step], args, note)))
        rows[-1]["note"] = "; ".join(note)
    del x, y
    return rows


def decode_memory_cap(device):
    """The bytes a decode point's tensors may take: MEMORY_SHARE of the free memory (of the machine's,
    on the CPU, where the system says; else no cap)."""
    if device == "cuda":
        torch.cuda.empty_cache()  # the last point's tensors, freed, are still the allocator's: give them back
        return MEMORY_SHARE * torch.cuda.mem_get_info()[0]
    try:
        return MEMORY_SHARE * os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not Linux: no such count
        return math.inf


def decode_point(B, N, methods, args, progress):
    """All methods at one (batch, context): rows of times, checked against float64; a method or the
    whole point that does not fit, or a backend that refuses, gets a row saying why."""
    H, Hk = or_default(args.heads, DECODE_HEADS), or_default(args.heads_k, DECODE_HEADS_K)
    d, dtype = args.head_dim, args.dtype
    base = dict(batch=B, context=N, nheads=H, nheads_k=Hk, d=d, dtype=str(dtype).removeprefix("torch."))
    cache = 2 * B * N * Hk * d * dtype.itemsize  # k and v: what a step must read
    step_bytes = cache + 2 * B * H * d * dtype.itemsize  # and q, and out written
    # Each set's cache twice at most (contiguous, and paged while that method runs); enough sets to
    # rotate past the L2 cache, as many as fit.
    cap = decode_memory_cap(args.device)
    sets = max(1, min(sets_past_l2(cache, args.device), int(cap // (2 * cache))))
    if 2 * cache > cap:
        note = (f"skipped: its caches, contiguous and paged, {2 * cache / 2**30:.1f} GiB, would not fit in "
                f"{cap / 2**30:.1f} GiB ({MEMORY_SHARE:.0%} of the free memory)")
        progress(f"batch={B} context={N}: {note}")
        return [dict(base, method=name, note=note) for name in methods]
    inputs = [[torch.randn(B, 1, H, d, dtype=dtype, device=args.device),
               *(torch.randn(B, N, Hk, d, dtype=dtype, device=args.device) for _ in range(2))] for _ in range(sets)]
    reference = decode_reference(*inputs[0])
    rows = []
    for name, prepare in methods.items():
        row, note, steps = dict(base, method=name, bytes=step_bytes), [], []
        rows.append(row)
        # Plain attention holds k, v repeated to H heads and its scores (B, H, 1, N), besides the caches.
        manual_bytes = sets * cache + (H // Hk) * cache + 2 * B * H * N * dtype.itemsize
        if name == "manual" and manual_bytes > cap:
            row["note"] = (f"skipped: k, v repeated to {H} heads and the scores, with the caches, "
                           f"{manual_bytes / 2**30:.1f} GiB, would not fit in {cap / 2**30:.1f} GiB")
            progress(f"batch={B} context={N}: manual {row['note']}")
            continue
        try:
            steps = [prepare(*s) for s in inputs]
            refusal = sdpa_refusal_of(steps[0]) if name.startswith("sdpa-") else None
            if refusal:  # this backend does not take these shapes: said, and on to the next method
                row["note"] = f"refused: {refusal}"
                progress(f"batch={B} context={N}: {name} {row['note']}")
                continue
            row["rel_err"] = mf.relative_error(steps[0]().reshape(reference.shape), reference)
            row.update(step_times(steps, args, note))
            row["host_us"] = host_ms(steps[0], args.device) * 1e3
        except torch.cuda.OutOfMemoryError:
            note.append("skipped: out of GPU memory")
        del steps
        synchronize(args.device)
        if args.device == "cuda":
            torch.cuda.empty_cache()
        row["note"] = "; ".join(note)
        progress(f"batch={B} context={N}: {name} " + ", ".join(
            f"{key} {row[key]:.1f}" for key in ("graph_us", "eager_us", "host_us") if key in row)
            + (f", rel err {row['rel_err']:.1e}" if "rel_err" in row else "") + (f" ({row['note']})" if note else ""))
    # The ratio to SDPA's best backend at this point, in the same timing: its time over this method's.
    key = "graph_us" if args.device == "cuda" else "eager_us"
    best = min((r[key] for r in rows if r["method"].startswith("sdpa-") and key in r), default=None)
    for row in rows:
        if best and key in row:
            row["x_best_sdpa"] = best / row[key]
    return rows


def format_decode_table(rows):
    """One line per (batch, context, method) with its times, speed and error or note."""
    lines = [f"{'batch':>5} {'context':>7}  {'method':<20}|{'graph us':>9} {'eager us':>9} {'host us':>8}  |"
             f"{'GB/s':>7} {'read':>5} {'copy':>5} {'x sdpa':>6}  | {'err':>7}"]
    for row in rows:
        where = (f"{row.get('batch', ''):>5} {row.get('context', ''):>7}  {row['method']:<20}|"
                 f"{cell(row, 'graph_us', '.1f', 9)} {cell(row, 'eager_us', '.1f', 9)} "
                 f"{cell(row, 'host_us', '.1f', 8)}  |"
                 f"{cell(row, 'gb_per_s', '.0f', 7)} {cell(row, 'fraction_of_read', '.0%', 5)} "
                 f"{cell(row, 'fraction_of_copy', '.0%', 5)} {cell(row, 'x_best_sdpa', '.2f', 5)}x  | ")
        lines.append(where + (f"{row['rel_err']:>7.1e}" if "rel_err" in row else row.get("note", "")))
    return "\n".join(lines)


def run_decode(args):
    grid = DECODE_GPU if args.device == "cuda" else DECODE_CPU
    points = list(itertools.product(or_default(args.batch, grid["batch"]), or_default(args.context, grid["context"])))
    methods = chosen_methods(decode_methods(), args.methods)
    rows = ceilings(args)
    read, copy = (gb_per_s(r) for r in rows)
    print(f"Decode: one query row per sequence over a full KV cache, {len(points)} points; methods: "
          f"{', '.join(methods)}. Measured ceilings: read {read:.0f} GB/s, copy {copy:.0f} GB/s")
    for i, (B, N) in enumerate(points):
        progress = lambda line, i=i: print(f"[{i + 1}/{len(points)}] {line}", file=sys.stderr, flush=True)
        rows += decode_point(B, N, methods, args, progress)
    bandwidth(rows, read, copy, args.device)
    write_csv(rows, args.out / "decode.csv", DECODE_FIELDS)
    clock = "CUDA events" if args.device == "cuda" else "CPU perf_counter: no graphs, and nothing about a GPU"
    print(f"\nMedian us ({clock}). graph: the step captured in a CUDA graph, GPU time; eager: the plain call; "
          "host: the Python and launch time of one call. GB/s: the bytes a step must move (k, v caches read, q read, "
          "out written) over its graph time (eager without a GPU); read, copy: that over the ceilings measured "
          f"above; the H200's specified {H200_GB_PER_S / 1e3:g} TB/s: fraction_of_spec in the CSV. x sdpa: the best "
          "SDPA backend's time over this method's. err: relative error against float64 on the same inputs. "
          "manual's time includes repeating k, v to the query heads")
    print(format_decode_table(rows))
    print(f"Wrote {args.out / 'decode.csv'}")
    bad = [r for r in rows if "rel_err" in r and not r["rel_err"] <= TOLERANCE[args.dtype]]  # NaN fails too
    if bad:
        sys.exit(f"bench: {len(bad)} results disagree with float64, e.g. {bad[0]['method']} at batch="
                 f"{bad[0]['batch']} context={bad[0]['context']}: rel err {bad[0]['rel_err']:.1e}")


# ---------------------------------------------------------------------------------------------
# Varlen: a prefill of sequences of different lengths, packed without padding or padded to the longest


# The issue's batch: 8 sequences of 512 to 8192 tokens, 32 query heads sharing 8 key/value heads, d = 128,
# bf16, causal (a grouped-query model's prefill); on the CPU, tiny (the tests).
VARLEN_GPU = dict(batch=8, lengths=(512, 8192), heads=32, heads_k=8, d=128)
VARLEN_CPU = dict(batch=3, lengths=(1, 130), heads=4, heads_k=2, d=64)
VARLEN_PASSES = ("forward", "forward+backward")
VARLEN_FIELDS = ["batch", "lengths", "tokens", "padded_tokens", "nheads", "nheads_k", "d", "dtype", "causal", "method",
                 "pass", "ms", "repeats", "ns_per_token", "tflops", "x_padded", "rel_err", "note"]


def varlen_lengths(batch, low, high):
    """The sequences' lengths, drawn from low to high with a fixed seed: every run times the same batch."""
    return torch.randint(low, high + 1, (batch,), generator=torch.Generator().manual_seed(0)).tolist()


def padded(packed, lengths):
    """Packed rows (total, heads, d) as a batch padded to the longest sequence, (B, heads, longest, d),
    zeros after each sequence's end: the layout of flash_attention and SDPA."""
    out = packed.new_zeros(len(lengths), packed.shape[1], max(lengths), packed.shape[2])
    for b, (start, n) in enumerate(zip([0, *itertools.accumulate(lengths)], lengths)):
        out[b, :, :n] = packed[start:start + n].transpose(0, 1)
    return out


def unpadded(batch, lengths):
    """The inverse of padded: each sequence's rows of a (B, heads, longest, d) batch, packed."""
    return torch.cat([batch[b, :, :n].transpose(0, 1) for b, n in enumerate(lengths)])


def varlen_reference(q, k, v, dO, lengths):
    """Causal attention of packed q (total, H, d), k, v (total, Hk, d) in float64, a sequence and a few
    heads at a time (as many heads of k, v as keep a step's scores, L x L per query head, near 2^27
    values, 1 GiB; at least one): out and the gradients dQ, dK, dV of sum(out * dO)."""
    H, Hk = q.shape[1], k.shape[1]
    group = H // Hk
    out, dQ = (torch.empty(q.shape, dtype=torch.float64, device=q.device) for _ in range(2))
    dK, dV = (torch.empty(k.shape, dtype=torch.float64, device=q.device) for _ in range(2))
    for start, n in zip([0, *itertools.accumulate(lengths)], lengths):
        rows, step = slice(start, start + n), max(1, 2 ** 27 // (n * n * group))
        for h in range(0, Hk, step):
            heads, kv_heads = slice(h * group, (h + step) * group), slice(h, h + step)
            qs, ks, vs = (t[rows, hs].double().transpose(0, 1).requires_grad_()
                          for t, hs in ((q, heads), (k, kv_heads), (v, kv_heads)))
            O = mf.manual_attention(qs, ks.repeat_interleave(group, 0), vs.repeat_interleave(group, 0), causal=True)
            grads = torch.autograd.grad(O, (qs, ks, vs), dO[rows, heads].double().transpose(0, 1))
            for to, hs, x in ((out, heads, O), (dQ, heads, grads[0]), (dK, kv_heads, grads[1]),
                              (dV, kv_heads, grads[2])):
                to[rows, hs] = x.detach().transpose(0, 1)
    return out, (dQ, dK, dV)


def varlen_methods(args, cu, longest):
    """{name: (layout, fn(q, k, v, causal))}: ours on the packed sequences, ours and SDPA (each backend
    sdpa_backends gives, pinned, on the grouped heads as they are: enable_gqa) on the padded batch."""
    def packed(q, k, v, causal):
        return mf.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=causal)

    def ours_padded(q, k, v, causal):
        return mf.flash_attention(q, k, v, causal=causal, version=3)

    backends = sdpa_backends(args.device, True, args.dtype, args.head_dim)
    return {"minimal-flash3-varlen": ("packed", packed), "minimal-flash3-padded": ("padded", ours_padded),
            **{sdpa_name(b): ("padded", sdpa_pinned(b, enable_gqa=True)) for b in backends}}


def varlen_flops(lengths, H, d, pass_):
    """The work of a causal prefill: each sequence's L (L + 1) / 2 visible pairs, 4 d flops each forward
    (S and P V), 8 more backward (flops' four products)."""
    pairs = sum(n * (n + 1) / 2 for n in lengths)
    return H * pairs * d * (4 if pass_ == "forward" else 12)


def run_varlen(args):
    device, dtype, H, Hk, d = args.device, args.dtype, args.heads, args.heads_k, args.head_dim
    B = or_default(args.batch, (VARLEN_GPU if device == "cuda" else VARLEN_CPU)["batch"])
    lengths = varlen_lengths(B, *args.lengths)
    tokens, longest = sum(lengths), max(lengths)
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    shapes = ((tokens, H, d), (tokens, Hk, d), (tokens, Hk, d), (tokens, H, d))
    # Input sets past the L2 cache, as the sweep does (each holds the packed and the padded inputs).
    sets = sets_past_l2(2 * sum(math.prod(s) for s in shapes) * dtype.itemsize, device)
    inputs = []
    for _ in range(sets):
        packed_set = [torch.randn(s, device=device, dtype=dtype) for s in shapes]
        inputs.append({"packed": packed_set, "padded": [padded(t, lengths) for t in packed_set]})
    out_ref, grads_ref = varlen_reference(*inputs[0]["packed"], lengths)
    methods = chosen_methods(varlen_methods(args, cu, longest), args.methods)
    print(f"Varlen: {B} sequences of {', '.join(map(str, lengths))} tokens ({tokens} in all; padded to {longest}: "
          f"{B * longest}), H={H}, Hk={Hk}, d={d}, {str(dtype).removeprefix('torch.')}, causal; methods: "
          f"{', '.join(methods)}")
    base = dict(batch=B, lengths=" ".join(map(str, lengths)), tokens=tokens, padded_tokens=B * longest, nheads=H,
                nheads_k=Hk, d=d, dtype=str(dtype).removeprefix("torch."), causal=True)
    timing = dict(seconds=args.seconds, min_repeats=args.min_repeats)
    rows = []
    for name, (layout, fn) in methods.items():
        q, k, v, dO = inputs[0][layout]
        back = (lambda t: t) if layout == "packed" else (lambda t: unpadded(t, lengths))  # to packed rows
        refusal = sdpa_refusal_of(lambda: training_step(fn, q, k, v, dO, True)) if name.startswith("sdpa-") else None
        if refusal:  # this backend does not take these shapes: said, and on to the next method
            rows += [dict(base, method=name, **{"pass": p}, note=f"refused: {refusal}") for p in VARLEN_PASSES]
            print(f"{name} refused: {refusal}", file=sys.stderr)
            continue
        errors = {"forward": mf.relative_error(back(fn(q, k, v, True)), out_ref),
                  "forward+backward": grads_err([back(g) for g in training_step(fn, q, k, v, dO, True)], grads_ref)}
        calls = {"forward": [lambda s=s: fn(*s[layout][:3], True) for s in inputs],
                 "forward+backward": [lambda s=s: training_step(fn, *s[layout], True) for s in inputs]}
        for pass_ in VARLEN_PASSES:
            ms, repeats = median_ms(calls[pass_], args.warmup, args.repeats, device, **timing)
            rows.append(dict(base, method=name, **{"pass": pass_}, ms=ms, repeats=repeats,
                             ns_per_token=ms * 1e6 / tokens, tflops=varlen_flops(lengths, H, d, pass_) / ms / 1e9,
                             rel_err=errors[pass_]))
            print(f"{name} {pass_}: {ms:.4f} ms (median of {repeats}), rel err {errors[pass_]:.1e}", file=sys.stderr)
    for row in rows:  # the padded batch's time on our kernels over this method's
        ours = next((r for r in rows if r["method"] == "minimal-flash3-padded" and r["pass"] == row["pass"]), {})
        if "ms" in row and "ms" in ours:
            row["x_padded"] = ours["ms"] / row["ms"]
    write_csv(rows, args.out / "varlen.csv", VARLEN_FIELDS)
    clock = "CUDA events" if device == "cuda" else "CPU clock, emulation: nothing about a GPU"
    print(f"\nMedian ms ({clock}); ns/token: over the {tokens} real tokens; {flop_unit(rows)[0]} of the real work "
          "(each sequence's causal pairs); x padded: minimal-flash3-padded's time over this method's; err: relative "
          "error against float64 (forward: out; forward+backward: dQ, dK, dV), on the real tokens. "
          "minimal-flash3-varlen's time includes its host check of cu_seqlens (a copy to the host, which waits)")
    print(format_varlen_table(rows))
    print(f"Wrote {args.out / 'varlen.csv'}")
    bad = [r for r in rows if "ms" in r and not r["rel_err"] <= TOLERANCE[dtype]]  # NaN fails too
    if bad:
        sys.exit(f"bench: {len(bad)} results disagree with float64, e.g. {bad[0]['method']} {bad[0]['pass']}: "
                 f"rel err {bad[0]['rel_err']:.1e}")


def format_varlen_table(rows):
    """One line per method: forward and forward+backward side by side, or the note of a method that did not run."""
    unit, per_tflop = flop_unit(rows)
    lines = [f"{'method':<22}|{'ms':>9} {'ns/token':>9} {unit:>8} {'x padded':>8}  |{'ms':>9} {'ns/token':>9} "
             f"{unit:>8} {'x padded':>8}  | {'err':>7}",
             f"{'':<22}|{'forward':^38}|{'forward+backward':^38}|"]
    for method in dict.fromkeys(r["method"] for r in rows):
        passes = [next(r for r in rows if r["method"] == method and r["pass"] == p) for p in VARLEN_PASSES]
        line = f"{method:<22}"
        for row in passes:
            line += (f"|{cell(row, 'ms', '.4f', 9)} {cell(row, 'ns_per_token', '.1f', 9)} "
                     f"{cell(row, 'tflops', '.2f', 8, per_tflop)} {cell(row, 'x_padded', '.2f', 7)}x  ")
        errors = [r["rel_err"] for r in passes if "rel_err" in r]
        lines.append(line + (f"| {max(errors):>7.1e}" if errors else f"| {passes[0].get('note', '')}"))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Mods: chapter 6's score_mod and mask_mod, against the same kernels without them and FlexAttention


# The shape of chapter 6's first H200 timing: B = 4, H = 16, N = 4096, d = 128, bf16; on the CPU, tiny (the tests).
MODS_GPU = dict(batch=4, heads=16, N=4096, d=128)
MODS_CPU = dict(batch=1, heads=2, N=128, d=64)
MODS_WINDOW = 1024  # the sliding window: a query sees itself and the 1024 keys before it; N / 4 for N below 4096
MODS_SOFTCAP = 30.0
MODS_VERSIONS = tuple(n for n, v in mf.VERSIONS.items() if v.mods)  # 3 and 4


def mods_method_names(version):
    """--mods' methods: ours with the mod, ours causal without it, FlexAttention."""
    return f"minimal-flash{version}", f"minimal-flash{version}-no-mod", "flex-attention"
MODS_FIELDS = ["mod", "method", "B", "H", "N", "d", "dtype", "pairs", "ms_fwd", "ms_fwd_bwd", "ms_bwd", "repeats_fwd",
               "repeats_fwd_bwd", "tflops_fwd", "tflops_bwd", "x_no_mod_fwd", "x_no_mod_bwd", "x_flex_fwd",
               "x_flex_bwd", "rel_err_fwd", "rel_err_bwd", "plain_err_fwd", "plain_err_bwd", "note"]


class Mod(NamedTuple):
    """One mod of --mods: its name, flash_attention's options for it, and the same attention as FlexAttention
    takes it, Python functions of torch tensors, which also build the float64 reference: mask(b, h, q_idx,
    kv_idx), true for a key kept, the same for every batch and head here; score(score, b, h, q_idx, kv_idx),
    the new scaled score (None: the score as it is)."""
    name: str
    options: dict
    mask: object
    score: object = None


def causal_mask(b, h, q_idx, kv_idx):
    """Causal attention's mask as FlexAttention takes it: a query sees itself and the keys before it."""
    return q_idx >= kv_idx


# The baseline, causal built in, no mod: what minimal-flash3-no-mod (or 4) computes with every mod.
NO_MOD = Mod("causal", dict(causal=True), causal_mask)


def alibi_slopes(H):
    """ALiBi's slopes, one a head, float32: the paper's geometric sequence 2^(-8 h / H), h = 1 .. H."""
    return 2.0 ** (-8.0 * torch.arange(1, H + 1, dtype=torch.float32) / H)


def mod_cases(N, H, device):
    """The mods timed, every one causal: causal built in (the baseline), causal as a mask_mod, a sliding
    window of MODS_WINDOW keys (N / 4 below N = 4 MODS_WINDOW), softcap 30, ALiBi with a slope per head."""
    W = min(MODS_WINDOW, N // 4)
    slopes = alibi_slopes(H).to(device)

    def window(b, h, q_idx, kv_idx):
        return (q_idx >= kv_idx) & (q_idx - kv_idx <= W)

    def softcap(score, b, h, q_idx, kv_idx):
        return MODS_SOFTCAP * torch.tanh(score / MODS_SOFTCAP)

    def alibi(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    return [NO_MOD, Mod("causal as mask_mod", dict(mask_mod="q_idx >= kv_idx"), causal_mask),
            Mod(f"sliding window {W}", dict(causal=True, window_size=(W, 0)), window),
            Mod(f"softcap {MODS_SOFTCAP:g}", dict(causal=True, softcap=MODS_SOFTCAP), causal_mask, softcap),
            Mod("alibi", dict(causal=True, alibi_slopes=slopes), causal_mask, alibi)]


def positions(N, device):
    """The query and key positions as FlexAttention's functions take them, broadcast: (N, 1) and (1, N)."""
    return torch.arange(N, device=device)[:, None], torch.arange(N, device=device)[None, :]


def mods_dense(q, k, v, dO, mod, dtype):
    """The mod's attention built densely in `dtype` (float64: the reference; q's own: plain attention, the
    yardstick of the official rule): O and dQ, dK, dV of sum(O * dO). A batch and a few heads at a time:
    scores of at most 2^27 values at once (1 GiB in float64). Each mod here keeps a query's own key: no
    row is empty."""
    B, H, N, d = q.shape
    i, j = positions(N, q.device)
    out, dQ, dK, dV = (torch.empty(q.shape, dtype=dtype, device=q.device) for _ in range(4))
    step = max(1, 2 ** 27 // (N * N))
    for b, h in itertools.product(range(B), range(0, H, step)):
        heads = slice(h, h + step)
        qs, ks, vs = (t[b, heads].to(dtype).requires_grad_() for t in (q, k, v))
        hs = torch.arange(H, device=q.device)[heads, None, None]
        S = qs @ ks.transpose(-2, -1) * d ** -0.5
        if mod.score is not None:
            S = mod.score(S, b, hs, i, j).to(dtype)
        O = torch.softmax(S.masked_fill(~mod.mask(b, hs, i, j), -math.inf), dim=-1) @ vs
        grads = torch.autograd.grad(O, (qs, ks, vs), dO[b, heads].to(dtype))
        for to, x in zip((out, dQ, dK, dV), (O, *grads)):
            to[b, heads] = x.detach()
    return out, (dQ, dK, dV)


def mods_methods(mod, N, device, version):
    """{name: (fn(q, k, v), the Mod it computes)}: ours with the mod; ours causal without it (NO_MOD: what
    the mod costs); FlexAttention with the same mask and score_mod, its block mask made once, untimed, as a
    model does. On a GPU FlexAttention runs compiled, as it is meant to: the whole graph (fullgraph), afresh
    for each mod, so that it never falls back to its eager, unfused code unseen. On the CPU it runs
    eagerly: compiling it there costs seconds a mod, and these times say nothing about a GPU."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(mod.mask, None, None, N, N, device=device)
    flex = flex_attention
    if device == "cuda":
        torch._dynamo.reset()  # a graph per grad mode for this mod: far below the recompile limit
        flex = torch.compile(flex_attention, fullgraph=True)
    ours, no_mod, flex_name = mods_method_names(version)
    return {ours: (lambda q, k, v: mf.flash_attention(q, k, v, version=version, **mod.options), mod),
            no_mod: (lambda q, k, v: mf.flash_attention(q, k, v, version=version, **NO_MOD.options), NO_MOD),
            flex_name: (lambda q, k, v: flex(q, k, v, score_mod=mod.score, block_mask=block_mask), mod)}


def mods_point(mod, names, inputs, args, progress):
    """The methods `names` with one mod: each checked once against float64, then timed, forward and
    forward + backward, the methods in turn (interleaved_ms); the backward is their difference. A method
    that disagrees with float64 is not timed; FlexAttention's refusals (on the CPU it has no backward) are
    noted in torch's words. Each method is checked against what it computes, and its work counted as what
    it computes: minimal-flash3-no-mod's (or 4's) is causal attention's."""
    q, k, v, dO = inputs[0]
    B, H, N, d = q.shape
    base = dict(mod=mod.name, B=B, H=H, N=N, d=d, dtype=str(q.dtype).removeprefix("torch."))
    timing = dict(seconds=args.seconds, min_repeats=args.min_repeats)
    rows, references, notes = {}, {}, {}  # by method
    timed = {"fwd": {}, "fwd_bwd": {}}  # each pass's calls of each method
    for name, (fn, computes) in mods_methods(mod, N, args.device, args.version).items():
        if name not in names:
            continue
        if computes.name not in references:  # float64, and plain attention in q's dtype for the rule
            references[computes.name] = [mods_dense(q, k, v, dO, computes, t) for t in (torch.float64, q.dtype)]
        ref, plain = references[computes.name]
        pairs = int(computes.mask(0, 0, *positions(N, q.device)).sum())  # the (query, key) pairs it keeps
        row = rows[name] = dict(base, method=name, pairs=pairs, plain_err_fwd=mf.relative_error(plain[0], ref[0]),
                                plain_err_bwd=grads_err(plain[1], ref[1]))
        note = notes[name] = []
        with_causal = lambda q, k, v, causal, fn=fn: fn(q, k, v)  # noqa: E731 (training_step's signature)
        calls = {"fwd": lambda q, k, v, dO, fn=fn: fn(q, k, v),
                 "fwd_bwd": lambda q, k, v, dO, fn=with_causal: training_step(fn, q, k, v, dO, None)}
        for (pass_, call), checked in zip(calls.items(), ("fwd", "bwd")):
            try:
                result = call(q, k, v, dO)
            except (NotImplementedError, RuntimeError) as error:
                if name != "flex-attention":  # ours: a bug, said at once
                    raise
                note.append(f"{pass_} refused: {str(error).splitlines()[0].split('. ')[0]}")
                continue
            row[f"rel_err_{checked}"] = (mf.relative_error(result, ref[0]) if pass_ == "fwd"
                                         else grads_err(result, ref[1]))
            if checked in mods_wrong(row):
                note.append(f"{pass_}: disagrees with float64, not timed")
                continue
            timed[pass_][name] = [lambda s=s, call=call: call(*s) for s in inputs]
    for pass_, calls in timed.items():  # the methods timed in turn (interleaved_ms): their ratios hold
        if calls:
            for name, (ms, repeats) in interleaved_ms(calls, args.warmup, args.repeats, args.device,
                                                      **timing).items():
                rows[name][f"ms_{pass_}"], rows[name][f"repeats_{pass_}"] = ms, repeats
    for name, row in rows.items():
        note = notes[name]
        if "ms_fwd" in row:
            row["tflops_fwd"] = 4 * B * H * d * row["pairs"] / row["ms_fwd"] / 1e9
        if "ms_fwd" in row and "ms_fwd_bwd" in row:
            if row["ms_fwd_bwd"] > row["ms_fwd"]:
                row["ms_bwd"] = row["ms_fwd_bwd"] - row["ms_fwd"]
                row["tflops_bwd"] = 2.5 * 4 * B * H * d * row["pairs"] / row["ms_bwd"] / 1e9
            else:
                note.append("no backward time: forward + backward was not slower than the forward")
        if name == "flex-attention" and args.device != "cuda":
            note.append("eager (on the CPU: no torch.compile)")
        row["note"] = "; ".join(note)
        progress(f"{mod.name}: {name} " + ", ".join(f"{key} {row[key]:.4f} ms" for key in ("ms_fwd", "ms_bwd")
                                                   if key in row) + (f" ({row['note']})" if note else ""))
    for row in rows.values():  # the same mod's other methods' times over this one's
        for other, key in zip(mods_method_names(args.version)[1:], ("x_no_mod", "x_flex")):
            times = rows.get(other, {})
            for pass_ in ("fwd", "bwd"):
                if f"ms_{pass_}" in row and f"ms_{pass_}" in times:
                    row[f"{key}_{pass_}"] = times[f"ms_{pass_}"] / row[f"ms_{pass_}"]
    return list(rows.values())


def mods_wrong(row):
    """Which of a --mods row's checks, "fwd" (O) and "bwd" (dQ, dK, dV), fail the official rule: an error
    against float64 more than twice plain attention's in the same dtype (NaN fails too)."""
    return [p for p in ("fwd", "bwd") if f"rel_err_{p}" in row and not row[f"rel_err_{p}"] <= 2 * row[f"plain_err_{p}"]]


def format_mods_table(rows):
    """One line per (mod, method): forward and backward side by side, the larger error, and any note."""
    unit, per_tflop = flop_unit(rows, ("tflops_fwd", "tflops_bwd"))
    lines = [f"{'mod':<22} {'method':<22}|{'ms':>9} {unit:>8} {'x no mod':>8} {'x flex':>7}  |{'ms':>9} {unit:>8} "
             f"{'x no mod':>8} {'x flex':>7}  | {'err':>7}",
             f"{'':<45}|{'forward':^38}|{'backward':^38}|"]
    for row in rows:
        line = f"{row['mod']:<22} {row['method']:<22}"
        for pass_ in ("fwd", "bwd"):
            line += (f"|{cell(row, f'ms_{pass_}', '.4f', 9)} {cell(row, f'tflops_{pass_}', '.2f', 8, per_tflop)} "
                     f"{cell(row, f'x_no_mod_{pass_}', '.2f', 7)}x {cell(row, f'x_flex_{pass_}', '.2f', 6)}x  ")
        errors = [row[key] for key in ("rel_err_fwd", "rel_err_bwd") if key in row]
        line += f"| {max(errors):>7.1e}" if errors else "| -"
        lines.append(line + (f"  {row['note']}" if row["note"] else ""))
    return "\n".join(lines)


def run_mods(args):
    device, dtype, H, d, N = args.device, args.dtype, args.heads, args.head_dim, args.seq_len[0]
    B = or_default(args.batch, (MODS_GPU if device == "cuda" else MODS_CPU)["batch"])
    shape = (B, H, N, d)
    inputs = random_inputs(shape, device, input_sets(shape, device, dtype), dtype)
    cases = mod_cases(N, H, device)
    names = list(chosen_methods(dict.fromkeys(mods_method_names(args.version)), args.methods))
    print(f"Mods: B={B} H={H} N={N} d={d} {str(dtype).removeprefix('torch.')}, version {args.version}'s kernels; mods: "
          f"{', '.join(m.name for m in cases)}; methods: {', '.join(names)}; at most {args.seconds:g} s of timed "
          f"calls per method and pass, at least {args.min_repeats} calls")
    if device != "cuda" and "flex-attention" in names:
        print("flex-attention runs eagerly on the CPU (torch.compile of it costs seconds a mod here, and these "
              "times say nothing about a GPU); where torch refuses a pass, the note says so in its words")
    rows = []
    # Past torch.compile's recompile limit FlexAttention would run its eager code: where torch can, that fails.
    strict = {key: True for key in ["fail_on_recompile_limit_hit"] if hasattr(torch._dynamo.config, key)}
    with warnings.catch_warnings(), torch._dynamo.config.patch(**strict):
        warnings.filterwarnings("ignore", message="flex_attention called without torch.compile")  # said above
        for i, mod in enumerate(cases):
            progress = lambda line, i=i: print(f"[{i + 1}/{len(cases)}] {line}", file=sys.stderr, flush=True)
            rows += mods_point(mod, names, inputs, args, progress)
            if device == "cuda":
                torch.cuda.empty_cache()
    write_csv(rows, args.out / "mods.csv", MODS_FIELDS)
    clock = "CUDA events" if device == "cuda" else "CPU clock, emulation: nothing about a GPU"
    unit = flop_unit(rows, ("tflops_fwd", "tflops_bwd"))[0]
    print(f"\nMedian ms ({clock}); backward: forward + backward's median less the forward's. {unit} of the work the "
          "mask keeps: forward 4 B H d a kept (query, key) pair, backward 2.5 times that. x no mod: "
          f"{mods_method_names(args.version)[1]}'s time (causal built in, no mod) over this method's; x flex: "
          "flex-attention's over "
          "this method's, the same mod, in this run. err: the larger relative error against float64 attention with "
          f"the mod built densely (O; dQ, dK, dV), each at most twice plain {str(dtype).removeprefix('torch.')} "
          "attention's (the official rule)")
    print(format_mods_table(rows))
    print(f"Wrote {args.out / 'mods.csv'}")
    bad = [r for r in rows if mods_wrong(r)]
    if bad:
        pass_ = mods_wrong(bad[0])[0]
        sys.exit(f"bench: {len(bad)} results disagree with float64, e.g. {bad[0]['method']} with {bad[0]['mod']}: "
                 f"{pass_} rel err {bad[0][f'rel_err_{pass_}']:.1e}, plain {str(args.dtype).removeprefix('torch.')} "
                 f"attention's {bad[0][f'plain_err_{pass_}']:.1e}")


def main(argv=None):
    args = parse_args(argv)
    if args.out is not None:  # made first: a folder that cannot be made would lose a long run's results at its end
        if args.out.exists() and not args.out.is_dir():
            sys.exit(f"bench: --out {args.out} is not a folder")
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            sys.exit(f"bench: --out {args.out}: cannot make this folder: {error.strerror}")
    if args.replot:
        replot(args.replot)
        return
    # An fp32 comparison: no TF32 in manual's and SDPA's matmuls unless asked for.
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        precision = (f"fp32, TF32 {'on for manual and SDPA' if args.tf32 else 'off'}" if args.dtype == torch.float32
                     else str(args.dtype).removeprefix("torch."))
        print(f"GPU: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}; {precision}")
    else:
        print(f"No GPU: CPU emulation of the kernels, torch {torch.__version__}. These times say "
              "nothing about GPU speed; run on a GPU for real numbers.")
    run = run_mods if args.mods else run_varlen if args.varlen else run_decode if args.decode else \
        run_sweep if args.sweep else run_profile
    run(args)


if __name__ == "__main__":
    main()

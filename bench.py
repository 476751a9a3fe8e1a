"""Profile and time minimal FlashAttention against plain ("manual") attention.

    python bench.py                      # B=16, H=12, N=64, d=64 on a GPU; smaller on the CPU
    python bench.py --seq-len 64 128 512 1024 --no-profile
    python bench.py --br 64 --bc 16      # other block sizes: compiled once, then cached

First the values are checked: both methods against float64 attention on the same inputs. Then a
torch.profiler table for each method (after a warm-up), as the reference project prints. Then the
timing that counts: on a GPU, CUDA events around each call, warm, median of many calls, fp32 with
TF32 off, inputs rotated through more memory than the L2 cache holds so that no call finds its
inputs already cached by the previous one. Without a GPU the same code runs on the CPU emulation
of the kernels; those times say nothing about GPU speed.
"""

import argparse
import math
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import minimal_flash as mf


def parse_args():
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-B", "--batch", type=int, default=16 if gpu else 2)
    p.add_argument("-H", "--heads", type=int, default=12 if gpu else 4)
    p.add_argument("-N", "--seq-len", type=int, nargs="+", default=[64], help="one or more sequence lengths")
    p.add_argument("-d", "--head-dim", type=int, default=64 if gpu else 32)
    p.add_argument("--br", type=int, default=None, help="query rows per block, Br (default 32)")
    p.add_argument("--bc", type=int, default=None, help="key rows per tile, Bc (default 32)")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--warmup", type=int, default=10 if gpu else 2)
    p.add_argument("--repeats", type=int, default=200 if gpu else 10, help="timed calls per method")
    p.add_argument("--no-profile", action="store_true", help="skip the torch.profiler tables")
    p.add_argument("--cpu", action="store_true", help="use the CPU emulation even if there is a GPU")
    return p.parse_args()


def random_inputs(shape, device, sets):
    return [[torch.randn(shape, device=device) for _ in range(3)] for _ in range(sets)]


def check(methods, q, k, v, causal):
    """Relative error of each method against float64 manual attention, printed and returned."""
    ref = mf.manual_attention(q.double(), k.double(), v.double(), causal)
    errors = {name: ((fn(q, k, v, causal) - ref).norm() / ref.norm()).item() for name, fn in methods.items()}
    print("  relative error vs float64: " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()))
    assert all(e < 1e-4 for e in errors.values()), "the methods disagree with float64 attention"
    return errors


def profile_table(name, fn, q, k, v, causal, device):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            with record_function(name):  # one row for the whole call, our extension included
                fn(q, k, v, causal)
        if device == "cuda":
            torch.cuda.synchronize()
    print(f"\n=== {name} (5 calls) ===")
    sort = "device_time_total" if device == "cuda" else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=8))


def median_ms(fn, inputs, causal, warmup, repeats, device):
    """Median time of one call in milliseconds, after `warmup` untimed calls."""
    for n in range(warmup):
        fn(*inputs[n % len(inputs)], causal)
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for n, (start, end) in enumerate(events):
            start.record()
            fn(*inputs[n % len(inputs)], causal)
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for n in range(repeats):
            start = time.perf_counter()
            fn(*inputs[n % len(inputs)], causal)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    args = parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.cpu else "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False  # an fp32 comparison: no TF32 in manual's matmuls
    Br, Bc = mf.block_sizes(args.br, args.bc)
    methods = {"manual": mf.manual_attention,
               "flash": lambda q, k, v, causal: mf.flash_attention(q, k, v, causal, Br=Br, Bc=Bc)}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        print(f"GPU: {props.name}, torch {torch.__version__}, CUDA {torch.version.cuda}; fp32, TF32 off")
    else:
        print(f"No GPU: CPU emulation of the kernels, torch {torch.__version__}. These times say "
              "nothing about GPU speed; run on a GPU for real numbers.")
    print(f"B={args.batch} H={args.heads} d={args.head_dim} Br={Br} Bc={Bc} causal={args.causal}")

    rows = []
    for N in args.seq_len:
        shape = (args.batch, args.heads, N, args.head_dim)
        set_bytes = 3 * math.prod(shape) * 4
        sets = min(64, math.ceil(2 * props.L2_cache_size / set_bytes)) if device == "cuda" else 1
        inputs = random_inputs(shape, device, sets)
        print(f"\nN={N}: {sets} input set(s) of {set_bytes / 2**20:.1f} MiB")
        errors = check(methods, *inputs[0], args.causal)  # also compiles the kernels, untimed
        if not args.no_profile and N == args.seq_len[0]:
            for name, fn in methods.items():
                profile_table(name, fn, *inputs[0], args.causal, device)
        times = {name: median_ms(fn, inputs, args.causal, args.warmup, args.repeats, device)
                 for name, fn in methods.items()}
        rows.append((N, times["manual"], times["flash"], errors["flash"]))

    clock = "CUDA events" if device == "cuda" else "CPU clock, emulation"
    print(f"\nMedian of {args.repeats} warm calls ({clock}); speed-up = manual time / flash time")
    print(f"{'N':>6} {'manual ms':>10} {'flash ms':>10} {'speed-up':>9} {'flash err':>10}")
    for N, manual, flash, err in rows:
        print(f"{N:>6} {manual:>10.4f} {flash:>10.4f} {manual / flash:>8.2f}x {err:>10.1e}")


if __name__ == "__main__":
    main()

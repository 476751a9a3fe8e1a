"""Profile and time minimal FlashAttention against plain ("manual") attention.

    python bench.py                      # B=16, H=12, N=64, d=64 on a GPU; smaller on the CPU
    python bench.py --seq-len 64 128 512 1024 --no-profile
    python bench.py --br 64 --bc 16      # other block sizes: compiled once, then cached

First the values are checked: both methods' O and dQ, dK, dV (for a random output gradient dO)
against float64 attention on the same inputs. Then a torch.profiler table for each method's forward
and backward pass (after a warm-up), as the reference project prints. Then the timing that counts:
on a GPU, CUDA events around each call, warm, median of many calls, fp32 with TF32 off, inputs
rotated through more memory than the L2 cache holds so that no call finds its inputs already cached
by the previous one. The backward is timed alone: the forward graph is built once and kept.
Without a GPU the same code runs on the CPU emulation of the kernels; those times say nothing about
GPU speed.
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
    """`sets` sets of fresh q, k, v and an output gradient dO, all standard normal."""
    return [[torch.randn(shape, device=device) for _ in range(4)] for _ in range(sets)]


def gradients(fn, q, k, v, dO, causal):
    """Runs fn forward with autograd on and returns a function that runs its backward pass alone:
    dQ, dK, dV of sum(O * dO). The graph is kept, so the backward can be run again and again."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    O = fn(q, k, v, causal)
    return lambda: torch.autograd.grad(O, (q, k, v), dO, retain_graph=True)


def check(methods, q, k, v, dO, causal):
    """Relative errors of each method's O and dQ, dK, dV against float64 manual attention, printed;
    returns {method: (O error, worst gradient error)}."""
    q64, k64, v64 = (t.double() for t in (q, k, v))
    ref_O = mf.manual_attention(q64, k64, v64, causal)
    ref_grads = gradients(mf.manual_attention, q64, k64, v64, dO.double(), causal)()
    errors = {}
    for name, fn in methods.items():
        err_O = rel((fn(q, k, v, causal)), ref_O)
        err_grads = [rel(g, r) for g, r in zip(gradients(fn, q, k, v, dO, causal)(), ref_grads)]
        print(f"  {name}: relative error vs float64: O {err_O:.1e}, dQ {err_grads[0]:.1e}, "
              f"dK {err_grads[1]:.1e}, dV {err_grads[2]:.1e}")
        errors[name] = (err_O, max(err_grads))
    assert all(max(e) < 1e-4 for e in errors.values()), "the methods disagree with float64 attention"
    return errors


def rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


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


def median_ms(calls, warmup, repeats, device):
    """Median time of one call in milliseconds, after `warmup` untimed calls. Each call takes the
    next function of `calls`, round and round: each works on its own inputs."""
    for n in range(warmup):
        calls[n % len(calls)]()
    if device == "cuda":
        torch.cuda.synchronize()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for n, (start, end) in enumerate(events):
            start.record()
            calls[n % len(calls)]()
            end.record()
        torch.cuda.synchronize()
        times = [start.elapsed_time(end) for start, end in events]
    else:
        times = []
        for n in range(repeats):
            start = time.perf_counter()
            calls[n % len(calls)]()
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
        set_bytes = 4 * math.prod(shape) * 4
        sets = min(64, math.ceil(2 * props.L2_cache_size / set_bytes)) if device == "cuda" else 1
        inputs = random_inputs(shape, device, sets)
        print(f"\nN={N}: {sets} set(s) of q, k, v, dO, {set_bytes / 2**20:.1f} MiB each")
        errors = check(methods, *inputs[0], args.causal)  # also compiles the kernels, untimed
        forward_calls = {name: [lambda fn=fn, q=q, k=k, v=v: fn(q, k, v, args.causal) for q, k, v, _ in inputs]
                         for name, fn in methods.items()}
        backward_calls = {name: [gradients(fn, *qkv_dO, args.causal) for qkv_dO in inputs]
                          for name, fn in methods.items()}
        if not args.no_profile and N == args.seq_len[0]:
            for name in methods:
                profile_table(name, forward_calls[name][0], device)
                profile_table(f"{name} backward", backward_calls[name][0], device)
        times = {(name, pass_): median_ms(calls[name], args.warmup, args.repeats, device)
                 for pass_, calls in (("forward", forward_calls), ("backward", backward_calls))
                 for name in methods}
        rows.append((N, times, errors["flash"]))
        del backward_calls  # frees the saved graphs before the next N

    clock = "CUDA events" if device == "cuda" else "CPU clock, emulation"
    print(f"\nMedian of {args.repeats} warm calls ({clock}), in ms; speed-up = manual time / flash time."
          "\nBackward: the backward pass alone, through autograd. err: flash against float64, "
          "O and the worst of dQ, dK, dV.")
    print(f"{'N':>6} | {'manual':>8} {'flash':>8} {'speed-up':>8} | {'manual':>8} {'flash':>8} "
          f"{'speed-up':>8} | {'err O':>7} {'err dQKV':>8}")
    print(f"{'':>6} | {'forward':^26} | {'backward':^26} |")
    for N, t, (err_O, err_grads) in rows:
        line = f"{N:>6}"
        for pass_ in ("forward", "backward"):
            manual, flash = t["manual", pass_], t["flash", pass_]
            line += f" | {manual:>8.4f} {flash:>8.4f} {manual / flash:>7.2f}x"
        print(f"{line} | {err_O:>7.1e} {err_grads:>8.1e}")


if __name__ == "__main__":
    main()

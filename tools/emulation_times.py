"""Seconds per call of the CPU emulation (kernels/cpu_cuda.h), per version and pass, at
(B, H, N, d) = (1, 2, N, 64) for N = 128 and 1024: the table of issue 23.

    python tools/emulation_times.py [--repeat R] [--sizes 128 1024] [--versions 1 2 3]

Each version runs in the first dtype it takes: versions 1 and 2 in float32, 3 and 4 in bfloat16. Each
(version, N) is called once first, so compile time and first-call costs are excluded; then each pass
is timed R times and the best and the median are printed. Also prints version 2's forward + backward
time over version 1's at N = 128 (issue 23's goal: at most 3x).
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bench  # noqa: E402
import minimal_flash as mf  # noqa: E402


def timed(function, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times), statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=bench.at_least(1), default=3)
    parser.add_argument("--sizes", type=bench.at_least(1), nargs="+", default=[128, 1024])
    parser.add_argument("--versions", type=int, nargs="+", choices=list(mf.VERSIONS), default=[1, 2, 3])
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}; seconds per call, best / median of {args.repeat}")
    print(f"{'version':>7} {'N':>5} {'pass':>8} {'best':>9} {'median':>9}")
    best = {}
    for N in args.sizes:
        for version in args.versions:
            dtype = mf.VERSIONS[version].dtypes[0]  # float32 for 1 and 2; bfloat16 for 3 and 4
            q, k, v, dO = (torch.randn(1, 2, N, 64).to(dtype) for _ in range(4))
            O, L = mf.forward(q, k, v, version=version)  # warm-up: builds and loads the kernels
            mf.backward(dO, q, k, v, O, L, version=version)
            for pass_, call in (("forward", lambda: mf.forward(q, k, v, version=version)),
                                ("backward", lambda: mf.backward(dO, q, k, v, O, L, version=version))):
                low, median = timed(call, args.repeat)
                best[version, N, pass_] = low
                print(f"{version:>7} {N:>5} {pass_:>8} {low:9.4f} {median:9.4f}", flush=True)
    if all((v, 128, p) in best for v in (1, 2) for p in mf.PASSES):
        ratio = sum(best[2, 128, p] for p in mf.PASSES) / sum(best[1, 128, p] for p in mf.PASSES)
        print(f"version 2 / version 1, forward + backward at N = 128: {ratio:.2f}x")


if __name__ == "__main__":
    main()

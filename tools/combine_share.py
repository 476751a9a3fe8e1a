"""The combine kernel's share of a decode step (issue 26's goal: under 5% at context 32k), on a GPU:

    python tools/combine_share.py            # batch 1, 8 and 64 at context 32768
    python tools/combine_share.py 1 --context 131072

flash_attn_with_kvcache (nheads 32, nheads_k 8, d = 128, bf16, num_splits chosen) runs 20 steps under
torch.profiler. The decode kernel launches combine early (programmatic dependent launch), and combine
waits at its start for decode's end, so combine's profiled duration includes that wait: its own time is
from decode's end to its own end. Medians over the 20 steps; a step is decode's start to combine's end.
With one split (large batches) combine does not run."""
import argparse
import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import minimal_flash as mf  # noqa: E402

STEPS = 20


def share(batch, context):
    q = torch.randn(batch, 1, 32, 128, dtype=torch.bfloat16, device="cuda")
    k, v = (torch.randn(batch, context, 8, 128, dtype=torch.bfloat16, device="cuda") for _ in range(2))
    seqlens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    for _ in range(5):  # compiled, warm
        mf.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as trace:
        for _ in range(STEPS):
            mf.flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
        torch.cuda.synchronize()
    kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in trace.events()
                     if str(e.device_type).endswith("CUDA") and "flash_decode::" in e.name)
    decode = [(start, end) for start, end, name in kernels if "flash_decode::decode" in name]
    combine = [(start, end) for start, end, name in kernels if "flash_decode::combine" in name]
    line = f"batch {batch}, context {context}: decode {statistics.median(e - s for s, e in decode):.1f} us"
    if not combine:
        return line + ", one split: no combine"
    own = statistics.median(c_end - max(c_start, d_end) for (_, d_end), (c_start, c_end) in zip(decode, combine))
    step = statistics.median(c_end - d_start for (d_start, _), (_, c_end) in zip(decode, combine))
    return (f"{line}, combine after decode's end {own:.1f} us, step {step:.1f} us: "
            f"combine's share {own / step:.1%}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("batch", type=int, nargs="*", default=[1, 8, 64])
    parser.add_argument("--context", type=int, default=32768)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("combine_share.py times CUDA kernels: it needs a GPU")
    for b in args.batch:
        print(share(b, args.context))

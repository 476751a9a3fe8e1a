"""Temporary probe (not for main): one forward and backward of version 4 per mod at bench.py --mods' shape
(B4 H16 N4096 d128 bf16), between cudaProfilerStart/Stop, for ncu to compare the kernels. Usage:
  ncu --profile-from-start off --kernel-name-base demangled --kernel-name regex:"flash3_hopper" \
      --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
      --csv --page details python3 tools/_ncu_mods.py [causal mask window softcap] > $OUT/ncu.csv
and without ncu, it prints each pass's time (CUDA events, median of 20) as a check."""
import sys

import torch

import minimal_flash as mf

B, H, N, d = 4, 16, 4096, 128
CASES = {"causal": dict(causal=True), "mask": dict(mask_mod="q_idx >= kv_idx"),
         "window": dict(causal=True, window_size=(1024, 0)), "softcap": dict(causal=True, softcap=30.0)}
torch.manual_seed(0)
q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dO = torch.randn_like(q)
names = sys.argv[1:] or list(CASES)


def step(name):
    o = mf.flash_attention(q, k, v, version=4, **CASES[name])
    o.backward(dO)


def ms(fn, n=20):
    times = []
    for _ in range(n):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(); fn(); end.record(); torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[n // 2]


for name in names:  # builds, warm-up, and the times
    step(name)
    fwd = ms(lambda: mf.flash_attention(q.detach(), k.detach(), v.detach(), version=4, **CASES[name]))
    print(f"{name:8s} forward {fwd:.3f} ms, forward + backward {ms(lambda: step(name)):.3f} ms", file=sys.stderr)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
for name in names:
    step(name)
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()

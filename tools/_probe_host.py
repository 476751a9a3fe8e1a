"""Temporary probe (not committed): host cost per attention call at notebook 7's bf16 GPT shapes."""
import time
import torch
import minimal_flash as mf
import bench

B, H, T, d = 4, 8, 4096, 64
qkv = torch.randn(B, T, 3, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ours = lambda q, k, v: mf.flash_attention(q, k, v, causal=True)
fns = {"ours": ours}
for backend in bench.sdpa_backends("cuda", causal=True, dtype=torch.bfloat16, head_dim=64):
    fns[bench.sdpa_name(backend)] = lambda q, k, v, b=backend: bench.sdpa_pinned(b)(q, k, v, causal=True)
dO = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16)


def host(fn, sleep):
    fwd, bwd = [], []
    for i in range(23):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        torch.cuda.synchronize()
        if sleep:
            torch.cuda._sleep(50_000_000)  # ~25 ms of GPU busy ahead of the call: a sync would wait for it
        t0 = time.perf_counter(); o = fn(q, k, v); t1 = time.perf_counter()
        o.backward(dO); t2 = time.perf_counter()
        if i >= 3:
            fwd.append(t1 - t0); bwd.append(t2 - t1)
    torch.cuda.synchronize()
    fwd.sort(); bwd.sort()
    return fwd[10] * 1e6, bwd[10] * 1e6


for name, fn in fns.items():
    for sleep in (False, True):
        f, b = host(fn, sleep)
        print(f"{name:>12} {'GPU busy ahead' if sleep else 'GPU idle      '}: host us per call, median: "
              f"forward {f:8.1f}, backward {b:8.1f}", flush=True)
real = mf.Kernels.call
mf.Kernels.call = lambda self, *a, **k: ""
f, b = host(ours, True)
print(f"ours, kernels.call stubbed: forward {f:8.1f}, backward {b:8.1f}", flush=True)
mf.Kernels.call = real
import cProfile, pstats
torch.cuda._sleep(2_000_000_000)
q, k, v = qkv.permute(2, 0, 3, 1, 4)
cProfile.run("for _ in range(20): o = ours(q, k, v); o.backward(dO)", "/tmp/prof.out")
pstats.Stats("/tmp/prof.out").sort_stats("tottime").print_stats(18)
torch.cuda.synchronize()

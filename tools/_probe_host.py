"""Temporary probe (not for main): host time per attention call at notebook 7's bf16 GPT shapes (ours,
SDPA FA2, cuDNN), with the GPU idle, and ours taken apart: each helper on CUDA tensors, by timeit."""
import timeit
import time
import torch
import minimal_flash as mf
import bench

B, H, T, d = 4, 8, 4096, 64
qkv = torch.randn(B, T, 3, H, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
ours = lambda q, k, v: mf.flash_attention(q, k, v, causal=True)  # noqa: E731
fns = {"ours": ours}
for backend in bench.sdpa_backends("cuda", causal=True, dtype=torch.bfloat16, head_dim=64):
    fns[bench.sdpa_name(backend)] = lambda q, k, v, b=backend: bench.sdpa_pinned(b)(q, k, v, causal=True)
fns["sdpa default (no context manager)"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
    q, k, v, is_causal=True)
dO = torch.randn(B, H, T, d, device="cuda", dtype=torch.bfloat16)


def host(fn, n=43):
    fwd, bwd = [], []
    for i in range(n):
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        torch.cuda.synchronize()
        t0 = time.perf_counter(); o = fn(q, k, v); t1 = time.perf_counter()
        o.backward(dO); t2 = time.perf_counter()
        if i >= 3:
            fwd.append(t1 - t0); bwd.append(t2 - t1)
    torch.cuda.synchronize()
    fwd.sort(); bwd.sort()
    return fwd[len(fwd) // 2] * 1e6, bwd[len(bwd) // 2] * 1e6


for name, fn in fns.items():
    f, b = host(fn)
    print(f"{name:>34}: host us per call (GPU idle before it), median: forward {f:7.1f}, backward {b:7.1f}")
real = mf.Kernels.call
mf.Kernels.call = lambda self, *a, **k: ""
f, b = host(ours)
print(f"{'ours, kernels.call stubbed':>34}: forward {f:7.1f}, backward {b:7.1f}")
q, k, v = (t.detach() for t in qkv.permute(2, 0, 3, 1, 4))
qg, kg, vg = qkv.permute(2, 0, 3, 1, 4)


def t(name, stmt, n=2000):
    s = min(timeit.repeat(stmt, number=n, repeat=3, globals=globals())) / n * 1e6
    print(f"  {name:44s} {s:8.2f} us")


t("flash_attention, no grad (stub)", "mf.flash_attention(q, k, v, causal=True)")
t("flash_attention, grad (stub)", "mf.flash_attention(qg, kg, vg, causal=True)")
t("_check_call", "mf._check_call(q, k, v, True, None, None, None, 4)")
t("_check_inputs", "mf._check_inputs(q, k, v, 4)")
t("_check_mods", "mf._check_mods(q, None, None, None, (-1, -1), 0.0, None, 0.0)")
t("_mods_version", "mf._mods_version(None, False, q)")
t("version_unavailable", "mf.version_unavailable(4, q.device)")
t("default_version", "mf.default_version(q.dtype, q.device)")
t("get_device_capability", "torch.cuda.get_device_capability(q.device)")
t("_attention (stub)", "mf._attention(q, k, v, True, 0.125, None, None, 4)")
t("FlashAttention.apply (stub)", "mf.FlashAttention.apply(qg, kg, vg, True, 0.125, None, None, 4, False, None, False)")
t("_check_shared_memory", "mf._check_shared_memory(mf.load_kernels('cuda', 4), q, 'backward', 4)")
t("new_empty", "q.new_empty(q.shape)")
t("_getCurrentRawStream", "torch._C._cuda_getCurrentRawStream(0)")
mf.Kernels.call = real
O, L = mf.forward(q, k, v, causal=True)
kern = mf.load_kernels("cuda", 4)
t("Kernels.call forward (real launch)", "kern.call('forward', True, 0.125, q, k, v, O, L)", 200)
torch.cuda.synchronize()
t("mf_run through ctypes, returning at once (no pass 7)",
  "kern._c.mf_run(7, *[None] * 10, 1, 1, 1, 64, 1, None, 0.1, True, False, None, 1, 0, None)")


class Bare(torch.autograd.Function):  # the floor: an autograd Function that only allocates, each way
    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return q.new_empty(q.shape)

    @staticmethod
    def backward(ctx, dO):
        q, k, v = ctx.saved_tensors
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


f, b = host(lambda q, k, v: Bare.apply(q, k, v))
print(f"{'floor: a Function that allocates':>34}: forward {f:7.1f}, backward {b:7.1f}")
import cProfile, pstats  # noqa: E401,E402
cProfile.run("host(ours, 103)", "/tmp/probe.prof")
pstats.Stats("/tmp/probe.prof").sort_stats("tottime").print_stats(25)

# The GPT step of notebook 7's measure() (context 4096, width 512, 8 heads, 4 layers, batch 4, bf16 autocast):
# its wall time, the host's time to issue it (no sync inside), and where ours spends its Python.
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


class Block(nn.Module):
    def __init__(self, width, heads, attention):
        super().__init__()
        self.heads, self.attention = heads, attention
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv, self.out = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        x = x + self.out(self.attention(q, k, v).transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.norm2(x))


def gpt_step_times(attention, steps=12):
    torch.manual_seed(0)
    blocks = nn.Sequential(*(Block(512, 8, attention) for _ in range(4))).cuda()
    head = nn.Linear(512, 96).cuda()
    opt = torch.optim.AdamW(list(blocks.parameters()) + list(head.parameters()), lr=3e-4)
    x = torch.randn(4, 4096, 512, device="cuda")
    y = torch.randint(0, 96, (4 * 4096,), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(head(blocks(x)).flatten(0, 1), y)
        loss.backward()
        opt.step(); opt.zero_grad()

    walls, issue = [], []
    for i in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter(); step(); t1 = time.perf_counter(); torch.cuda.synchronize(); t2 = time.perf_counter()
        if i >= 2:
            issue.append((t1 - t0) * 1e3); walls.append((t2 - t0) * 1e3)
    return sorted(walls)[len(walls) // 2], sorted(issue)[len(issue) // 2], step


for name, fn in fns.items():
    wall, issue, step = gpt_step_times(lambda q, k, v, fn=fn: fn(q, k, v))
    print(f"GPT step, {name:>34}: wall {wall:6.2f} ms, host issuing it {issue:6.2f} ms")
    if name == "ours":
        cProfile.run("for _ in range(5): step()", "/tmp/step.prof")
        torch.cuda.synchronize()
        pstats.Stats("/tmp/step.prof").sort_stats("cumulative").print_stats(30)

"""Chapter 4's steps, each its own build of version 4 (-DHOPPER_STEP=n, kernels/flash3_hopper.cu),
timed in one process beside SDPA's FlashAttention-2 and cuDNN backends; each output checked against
float64 first. H200 only (sm_90a).

    python tools/hopper_steps.py [--steps 1 2 3 4 5 6] [--dims 64 128] [--seq-len 1024 4096 16384] [--csv steps.csv]

Prints one line per point; --csv also writes them as rows: d, N, B, H, causal, dtype, method (sdpa-flash,
sdpa-cudnn, step1 ..), ms, tflops, max_err (the largest error of O against float64 over two heads) and
plain_err (the same of plain attention in the same dtype: the official tests allow 2x that).
"""
import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import bench  # noqa: E402
import minimal_flash as mf  # noqa: E402

# (B, H) at each N: about the same work per point as the sweep's
SHAPES = {512: (16, 16), 1024: (8, 16), 2048: (4, 16), 4096: (4, 16), 8192: (2, 16), 16384: (1, 16)}


def time_ms(fn):
    """bench.py's median: warm-up, CUDA events, median of up to 100 calls within 0.4 s."""
    return bench.median_ms([fn], warmup=10, repeats=100, device="cuda", seconds=0.4, min_repeats=5)[0]


def step_kernels(step):
    """Version 4 built with -DHOPPER_STEP=step (a folder of its own)."""
    return mf.VERSIONS[4].flagged_kernels(f"-DHOPPER_STEP={step}")


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, nargs="+", choices=[1, 2, 3, 4, 5, 6], default=[1, 2, 3, 4, 5, 6])
    p.add_argument("--dims", type=int, nargs="+", choices=mf.VERSIONS[4].head_dims, default=[64, 128])
    p.add_argument("--seq-len", type=bench.at_least(1), nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")  # version 4's, as bench.py names them
    p.add_argument("--csv", type=Path, help="also write the points to this CSV")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("hopper_steps.py times version 4's CUDA kernels: it needs a Hopper GPU")
    refusal = mf.version_unavailable(4, "cuda")
    if refusal:
        sys.exit(f"hopper_steps.py: {refusal}")
    dtype = bench.DTYPES[args.dtype]
    kernels = {step: step_kernels(step) for step in args.steps}
    rows = []
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.dtype}; TFLOP/s = 4 N^2 d B H "
          f"(causal: half) / median time; ratio = SDPA's time / ours")
    for d in args.dims:
        for causal in (False, True):
            for N in args.seq_len:
                B, H = SHAPES.get(N, (1, 16))
                q, k, v = (torch.randn(B, H, N, d, device="cuda", dtype=dtype) for _ in range(3))
                ref = mf.manual_attention(q[:1, :2].double(), k[:1, :2].double(), v[:1, :2].double(), causal=causal)
                work = bench.flops(B, H, N, d, causal, "forward")
                plain = mf.manual_attention(q[:1, :2], k[:1, :2], v[:1, :2], causal=causal)  # in bf16 / fp16
                plain_err = (plain.double() - ref).abs().max().item()
                line = f"d={d:>3} N={N:>5} causal={causal!s:<5}"
                times, errors = {}, {}
                for name, backend in (("sdpa-flash", SDPBackend.FLASH_ATTENTION),
                                      ("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION)):
                    with sdpa_kernel(backend):
                        fn = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
                        times[name] = time_ms(fn)
                        errors[name] = (fn()[:1, :2].double() - ref).abs().max().item()
                for step, kern in kernels.items():
                    O, L = torch.full_like(q, float("nan")), q.new_empty(q.shape[:-1], dtype=torch.float32)
                    fn = lambda: kern.call("forward", causal, d ** -0.5, q, k, v, O, L)  # noqa: E731
                    error = fn()
                    torch.cuda.synchronize()
                    err = ((O[:1, :2].double() - ref).abs().max().item()) if not error else float("nan")
                    times[f"step{step}"] = time_ms(fn) if not error else float("nan")
                    errors[f"step{step}"] = err
                    line += f"  [step{step} err {err:.1e}{' ' + error if error else ''}]"
                for name, ms in times.items():
                    rows.append(dict(d=d, N=N, B=B, H=H, causal=causal, dtype=args.dtype, method=name, ms=ms,
                                     tflops=work / ms / 1e9, max_err=errors[name], plain_err=plain_err))
                    ratio = "" if name.startswith("sdpa") else \
                        f", {times['sdpa-flash'] / ms:.2f}x fa2, {times['sdpa-cudnn'] / ms:.2f}x cudnn"
                    line += f"  {name} {ms:.4f} ({work / ms / 1e9:.0f} TF{ratio})"
                print(line, flush=True)
    if args.csv:
        bench.write_csv(rows, args.csv, fields=list(rows[0]))


if __name__ == "__main__":
    main()

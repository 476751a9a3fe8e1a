"""Runs the CUDA kernels (versions 1, 2 and 3, forward and backward) at partial-tile sizes, causal
and not, for compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tests/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tests/sanitize.py 3   # version 3 only

Each run is also checked against float64, so a clean sanitizer report on a wrong answer fails too."""
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
import minimal_flash as mf  # noqa: E402  (conftest-free: this file is run as a script)
from helpers import half_precision_grads, poisoned_outputs, reference, reference_grads, rel_err  # noqa: E402

generator = torch.Generator().manual_seed(0)


def fp32_cases():
    """Versions 1 and 2, forward and backward."""
    for Br, Bc in [(32, 32), (64, 16)]:
        # Partial last tiles; d = 128 uses the >48 KB opt-in; N = 300 spans several version-2 blocks;
        # d = 3 leaves most of a row of version 2's backward tiles to its zero padding.
        for N, d in [(100, 64), (17, 128), (300, 32), (77, 3)]:
            for causal in (False, True):
                q, k, v = [torch.randn(2, 3, N, d, generator=generator).cuda() for _ in range(3)]
                for version in (2, 1):  # version 1's O and L feed both backwards below
                    O, L = poisoned_outputs(q)
                    mf.forward(q, k, v, causal, out=(O, L), Br=Br, Bc=Bc, version=version)
                    err = rel_err(O, reference(q, k, v, causal)[0])
                    print(f"forward v{version} Br={Br} Bc={Bc} N={N} d={d} causal={causal}: rel err {err:.1e}")
                    assert err < 1e-5
                dO = torch.randn(q.shape, generator=generator).cuda()
                refs = reference_grads(q, k, v, dO, causal)
                for version in (1, 2):
                    grads = [torch.full_like(q, float("nan")) for _ in range(3)]
                    mf.backward(dO, q, k, v, O, L, causal, out=grads, Br=Br, Bc=Bc, version=version)
                    errs = [rel_err(g, r) for g, r in zip(grads, refs)]
                    print(f"backward v{version} Br={Br} Bc={Bc} N={N} d={d} causal={causal}: rel err dQ, dK, dV "
                          + ", ".join(f"{e:.1e}" for e in errs))
                    assert max(errs) < 1e-5


def half_cases():
    """Version 3 (tensor cores): bf16 and fp16, partial tiles of 64 rows and keys, d = 64 and 128; the
    official FlashAttention tests' bound against float64, for O and for each of dQ, dK, dV."""
    for dtype in (torch.bfloat16, torch.float16):
        for N, d in [(100, 64), (17, 128), (130, 64)]:
            for causal in (False, True):
                q, k, v = [torch.randn(2, 3, N, d, generator=generator).to("cuda", dtype) for _ in range(3)]
                O, L = torch.full_like(q, float("nan")), q.new_full(q.shape[:-1], float("nan"), dtype=torch.float32)
                mf.forward(q, k, v, causal, out=(O, L), version=3)
                O_ref = reference(q, k, v, causal)[0]
                err, plain_err = ((x.double() - O_ref).abs().max().item() for x in (O, mf.manual_attention(q, k, v, causal)))
                print(f"forward v3 {dtype} N={N} d={d} causal={causal}: max error {err:.1e}, plain attention's {plain_err:.1e}")
                assert err <= 2 * plain_err and torch.isfinite(L).all()
                dO = torch.randn(q.shape, generator=generator).to("cuda", dtype)
                grads = [torch.full_like(q, float("nan")) for _ in range(3)]
                mf.backward(dO, q, k, v, O, L, causal, out=grads, version=3)
                refs, plains = reference_grads(q, k, v, dO, causal), half_precision_grads(q, k, v, dO, causal)
                errs = [((g.double() - r).abs().max().item(), (p.double() - r).abs().max().item())
                        for g, p, r in zip(grads, plains, refs)]
                print(f"backward v3 {dtype} N={N} d={d} causal={causal}: max error, plain attention's: dQ, dK, dV "
                      + ", ".join(f"{e:.1e} {p:.1e}" for e, p in errs))
                assert all(e <= 2 * p for e, p in errs)


chosen = set(sys.argv[1:]) or {"1", "2", "3"}
if chosen & {"1", "2"}:
    fp32_cases()
if "3" in chosen:
    half_cases()

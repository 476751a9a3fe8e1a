"""Runs every version's CUDA kernels, forward and backward, at partial-tile sizes, causal and not, for
compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python tools/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python tools/sanitize.py 3   # version 3 only

Each run is also checked against float64 (tests/helpers.py's checks: fp32 within 1e-5, half precision
within twice plain attention's error), so a clean sanitizer report on a wrong answer fails too. Versions
that take grouped heads also run each forward with k, v of one head shared by q's three."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]
import minimal_flash as mf  # noqa: E402  (conftest-free: this file is run as a script)
from helpers import assert_close, assert_gradients, poisoned_outputs, reference  # noqa: E402

generator = torch.Generator().manual_seed(0)


def cases(version):
    """(block sizes, N, d) to run: partial last tiles; d = 128 uses the >48 KB opt-in; N = 300 spans
    several version-2 blocks; d = 3 leaves most of a row of version 2's backward tiles to its zero
    padding; N = 130 spans two of version 3's blocks; N = 300, three of version 4's key tiles, so its
    2-stage ring refills a stage."""
    if mf.VERSIONS[version].head_dims is None:
        return [(sizes, N, d) for sizes in ((32, 32), (64, 16)) for N, d in ((100, 64), (17, 128), (300, 32), (77, 3))]
    return [((None, None), N, d) for N, d in ((100, 64), (17, 128), (130, 64), (300, 128))]


def run(version, dtype, causal, Br, Bc, N, d):
    q, k, v = [torch.randn(2, 3, N, d, generator=generator).to("cuda", dtype) for _ in range(3)]
    O, L = poisoned_outputs(q)
    options = dict(causal=causal, Br=Br, Bc=Bc, version=version)
    mf.forward(q, k, v, out=(O, L), **options)
    plain = mf.manual_attention(q, k, v, causal=causal) if dtype != torch.float32 else None
    assert_close("O", O, reference(q, k, v, causal)[0], plain)
    dO = torch.randn(q.shape, generator=generator).to("cuda", dtype)
    grads = [torch.full_like(q, float("nan")) for _ in range(3)]
    mf.backward(dO, q, k, v, O, L, out=grads, **options)
    assert_gradients(grads, q, k, v, dO, causal)
    if mf.VERSIONS[version].deterministic_mode:  # its other dQ path: shares added in turn
        grads = [torch.full_like(q, float("nan")) for _ in range(3)]
        mf.backward(dO, q, k, v, O, L, out=grads, deterministic=True, **options)
        assert_gradients(grads, q, k, v, dO, causal)
    print(f"v{version} {str(dtype)[6:]} Br={Br} Bc={Bc} N={N} d={d} causal={causal}: forward and backward checked")


def run_grouped(version, dtype, causal, N, d):
    """The forward with k, v of one head shared by q's three (it reads K, V's slice bh / 3); the
    backward of grouped heads runs the kernels above on k, v repeated to q's heads."""
    q = torch.randn(2, 3, N, d, generator=generator).to("cuda", dtype)
    k, v = [torch.randn(2, 1, N, d, generator=generator).to("cuda", dtype) for _ in range(2)]
    O, L = poisoned_outputs(q)
    mf.forward(q, k, v, out=(O, L), causal=causal, version=version)
    k, v = (t.expand(q.shape) for t in (k, v))
    assert_close("O", O, reference(q, k, v, causal)[0], mf.manual_attention(q, k, v, causal=causal))
    print(f"v{version} {str(dtype)[6:]} N={N} d={d} causal={causal}, k and v of 1 head for 3: forward checked")


chosen = {int(a) for a in sys.argv[1:]} or set(mf.VERSIONS)
for version in sorted(chosen):
    for dtype in mf.VERSIONS[version].dtypes:
        for (Br, Bc), N, d in cases(version):
            for causal in (False, True):
                run(version, dtype, causal, Br, Bc, N, d)
                if mf.VERSIONS[version].grouped_heads:
                    run_grouped(version, dtype, causal, N, d)

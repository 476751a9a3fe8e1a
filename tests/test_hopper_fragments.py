"""The emulation of Hopper's instructions (kernels/cpu_cuda.h, used through kernels/hopper.cuh) on one
warpgroup (tools/hopper_fragments.cu): TMA boxes with the 128-byte swizzle and zero fill, wgmma with A
and B K-major from shared memory, wgmma with A from registers and B MN-major (SBO between groups of 8
rows of k, LBO between 64-column tiles), wgmma with A M-major and/or B N-major from shared memory
(the backward's dQ = dS K), blocks' bulk reduces into one buffer, and boxes through a 4-D tensor map
of a strided view (version 4's q, k, v as a model hands them), and rows moved by plain bulk copies
(chapter 5's decode kernel); against torch in float64 and,
on an H100 or H200, against the hardware running the same source (`-k cuda`)."""
import sys

import pytest
import torch

import minimal_flash as mf

sys.path.insert(0, str(mf.KERNELS.parent / "tools"))
from fragments import (HOPPER_PRODUCTS, build_fragments, run_bulk_load_program, run_bulk_program,  # noqa: E402
                       run_hopper_program, run_tickets_program, run_tma4_program)

HALVES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(
    not HOPPER, reason="no CUDA GPU of compute capability 9.0 (sm_90a: H100, H200) on this machine"))
ROWS = 160  # X is (2, 160, 128): the box at rows 128-191 is half past the end


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(device): the program for that device type, built once per module."""
    libraries = {}

    def build_for(device):
        if device not in libraries:
            libraries[device] = build_fragments(device, tmp_path_factory.mktemp(f"hopper_{device}"),
                                                program="hopper_fragments")
        return libraries[device]

    return build_for


def inputs(seed, dtype):
    generator = torch.Generator().manual_seed(seed)
    X, P = torch.randn(2, ROWS, 128, generator=generator), torch.randn(64, 64, generator=generator)
    return X.to(dtype), P.to(dtype)


def swizzled(tile):
    """A 64 x 64 tile of 16-bit values as the 128-byte swizzle stores it: the 16-byte chunk c of row
    r at chunk c ^ (r % 8)."""
    chunks = tile.reshape(64, 8, 8)
    out = torch.empty_like(chunks)
    for r in range(64):
        out[r, torch.arange(8) ^ (r % 8)] = chunks[r]
    return out.reshape(64, 64)


@HALVES
def test_program_against_torch(build, dtype):
    X, P = inputs(0, dtype)
    boxes, *products, raw = run_hopper_program(build("cpu"), "cpu", dtype, X, P)
    padded = torch.cat([X, torch.zeros(2, 64, 128, dtype=dtype)], dim=1)  # rows past the end: zeros
    expected = [padded[0, 0:64, 0:64], padded[0, 0:64, 64:128], padded[1, 0:64, 0:64], padded[1, 64:128, 0:64],
                padded[1, 128:192, 64:128]]
    for i, tile in enumerate(expected):
        assert torch.equal(boxes[i], swizzled(tile.view(torch.int16))), f"box {i}"
    A, B, V, P = X[0, :64, :64].double(), X[1, :128, :64].double(), X[0, :64, :].double(), P.double()
    # (d): A M-major is the box of X[0, 0:64, 0:64] with k along its rows: A^T here; B N-major, B[:64].T.
    references = {"ss128": A @ B.T, "ss64": A @ B[:64].T, "rs64": P @ V[:, :64], "rs128": P @ V,
                  "mm128": A.T @ V, "mm64": A.T @ B[:64], "mk128": A.T @ B.T, "km64": A @ B[:64],
                  "mm32": A.T @ B[:64, 32:]}
    for name, D in zip(HOPPER_PRODUCTS, products):
        assert torch.allclose(D.double(), references[name], rtol=1e-5, atol=1e-4), name
    # Each thread's accumulators hold the product's elements of the layout in kernels/hopper.cuh: against
    # float64, not against D (which the program writes from these same registers by that layout)
    t = torch.arange(128)
    w, g, q = t // 32, t % 32 // 4, t % 4
    start = 0
    for name, N in HOPPER_PRODUCTS.items():
        i = torch.arange(N // 2)
        rows = 16 * w[:, None] + g[:, None] + 8 * (i % 4 // 2)
        cols = 8 * (i // 4) + 2 * q[:, None] + i % 2
        assert torch.allclose(raw[:, start:start + N // 2].double(), references[name][rows, cols], rtol=1e-5,
                              atol=1e-4), name
        start += N // 2


BLOCKS = 16


def bulk_sums(blocks):
    """What run_bulk_program's blocks add up to: element i < 256, the sum of i % 7 + b; the others, of b + 1."""
    b = torch.arange(blocks, dtype=torch.float32)
    return torch.cat([(torch.arange(256)[:, None] % 7 + b).sum(dim=1), torch.full((256,), (b + 1).sum().item())])


def test_bulk_reduce_against_torch(build):
    """Blocks add into one buffer by the copy engine, each overwriting its shared memory only after the
    wait that retires the request: exact sums of small integers."""
    assert torch.equal(run_bulk_program(build("cpu"), "cpu", BLOCKS), bulk_sums(BLOCKS))


@pytest.mark.parametrize("device", [CUDA])
@HALVES
def test_emulation_gives_the_hardwares_answer(build, device, dtype):
    """The same source and inputs on the GPU and in the emulation: the boxes' bytes exactly (TMA's
    swizzle and zero fill), the products and each thread's accumulators within fp32 rounding (the
    order of the hardware's sums is its own)."""
    for seed in range(3):
        X, P = inputs(seed, dtype)
        on_gpu, emulated = (run_hopper_program(build(d), d, dtype, X, P) for d in (device, "cpu"))
        assert torch.equal(on_gpu[0], emulated[0]), "TMA boxes"
        for name, x, y in zip((*HOPPER_PRODUCTS, "accumulators"), on_gpu[1:], emulated[1:]):
            print(f"{dtype} seed {seed} {name}: max |gpu - emulation| = {(x - y).abs().max().item():.3g}, "
                  f"equal: {torch.equal(x, y)}")
            assert torch.allclose(x, y, rtol=1e-5, atol=1e-4), name


@pytest.mark.parametrize("device", [CUDA])
def test_bulk_reduce_on_the_hardware(build, device):
    """The same bulk reduces on the GPU: the same exact sums (the hardware adds in its own order, and
    small integers make the order not matter)."""
    for blocks in (1, BLOCKS, 132):
        assert torch.equal(run_bulk_program(build(device), device, blocks), bulk_sums(blocks)), blocks


TMA4_ROWS = 100  # K (2, 100, 2, 64): the box at rows 64-127 is partly past the end


def tma4_expected(Y):
    """The 3 boxes run_tma4_program loads from K = Y[:, :, 1], swizzled, rows past the end zeros."""
    K = torch.cat([Y[:, :, 1], torch.zeros(2, 128 - TMA4_ROWS, *Y.shape[3:], dtype=Y.dtype)], dim=1)
    return torch.stack([swizzled(K[b, r:r + 64, h].contiguous().view(torch.int16))
                        for b, r, h in ((0, 0, 1), (1, 64, 0), (1, 0, 1))])


@pytest.mark.parametrize("device", ["cpu", CUDA])
@HALVES
def test_tma_4d_boxes_of_a_strided_view(build, device, dtype):
    """A 4-D tensor map (columns, rows, heads, batch) with the view's own strides: each box is the
    (batch, head)'s rows, swizzled, zeros past the last row, bit for bit on the GPU and in the emulation."""
    for seed in range(2):
        Y = torch.randn(2, TMA4_ROWS, 3, 2, 64, generator=torch.Generator().manual_seed(seed)).to(dtype)
        assert torch.equal(run_tma4_program(build(device), device, Y), tma4_expected(Y)), seed


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("bytes", [256, 128, 48])
def test_bulk_copies_of_rows(build, device, bytes):
    """Bulk copies of rows in a shuffled order into padded rows of shared memory, counted on one
    mbarrier: each row's first `bytes` bytes where it was asked for, the rest of its 272 bytes as
    before (zeros), bit for bit on the GPU and in the emulation."""
    generator = torch.Generator().manual_seed(bytes)
    X = torch.randint(0, 256, (40, 256), dtype=torch.uint8, generator=generator)
    order = torch.randperm(40, generator=generator)[:16].tolist()
    expected = torch.zeros(16, 272, dtype=torch.uint8)
    expected[:, :bytes] = X[order, :bytes]
    assert torch.equal(run_bulk_load_program(build(device), device, X, order, bytes), expected)


@pytest.mark.parametrize("device", ["cpu", CUDA])
@pytest.mark.parametrize("blocks", [1, 132])
def test_tickets_of_one_counter(build, device, blocks):
    """The int atomicAdd that hands version 4's persistent blocks their work tiles returns the value
    before its addition: blocks of 384 threads taking 3 tickets each get every ticket from 0 on exactly
    once, each thread's in increasing order, and the counter ends past the last, on the GPU and in the
    emulation (whose threads interleave otherwise)."""
    takes = 3
    taken, tickets = run_tickets_program(build(device), device, blocks, takes)
    total = blocks * 384 * takes
    assert taken == total
    assert torch.equal(tickets.flatten().sort().values, torch.arange(total, dtype=torch.int32))
    assert bool((tickets.diff(dim=2) > 0).all()), "a thread's later ticket is not past its earlier one"

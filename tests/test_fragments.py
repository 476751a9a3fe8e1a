"""The CPU emulation of the tensor-core building blocks (kernels/cpu_cuda.h, used through
kernels/mma.cuh): bf16 and fp16 rounding against torch's, one fragment-level program
(tools/fragments.cu: ldmatrix, mma.sync m16n8k16, warp shuffles), fast_tanh and fast_exp2 against
float64 and, on a GPU, against the hardware running the same source. tools/fragments.py builds and runs the
program (notebook 6 uses it too)."""
import sys

import pytest
import torch

import minimal_flash as mf

sys.path.insert(0, str(mf.KERNELS.parent / "tools"))
from fragments import build_fragments, run_accumulate, run_program, run_special  # noqa: E402

HALVES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
CUDA = pytest.param("cuda", 
                    marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine"))


@pytest.fixture(scope="module")
def build(tmp_path_factory):
    """build(device): the fragment program for that device type, built once per module."""
    libraries = {}

    def build_for(device):
        if device not in libraries:
            libraries[device] = build_fragments(device, tmp_path_factory.mktemp(f"fragments_{device}"))
        return libraries[device]

    return build_for


def floats_of_bits(bits):
    """float32 values from their bit patterns (unsigned 32-bit integers), as a tensor."""
    return torch.tensor(bits, dtype=torch.int64).to(torch.int32).view(torch.float32)


def edge_values():
    """Floats where rounding to 16 bits is hard: ties (even and odd), the largest values, the
    subnormal range of fp16 and its boundaries, zeros, infinities, NaN; then random ones."""
    bits = [0x3F808000, 0x3F818000, 0x3F808001, 0x3F807FFF, 0x477FEFFF, 0x477FF000, 0x477FF001,
            0x33000000, 0x33000001, 0x33800000, 0x387FE000, 0x387FF000, 0x38800000, 0x387FFFFF,
            0x80000000, 0x00000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0x00000001, 0x007FFFFF,
            0x7FC00000, 0xFFC00001, 0x7F800001]
    special = floats_of_bits(bits)
    values = torch.tensor([65504.0, -65519.0, 65520.0, 1e5, 6e-8, 3e-8, 2.98e-8, 1 / 3, -2.5e-6, 1e-40])
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-9, 6, (4000,), generator=generator)
    return torch.cat([special, values, torch.randn(4000, generator=generator) * scales])


@HALVES
def test_rounding_matches_torch(build, dtype):
    """__float2bfloat16 / __float2half round to nearest, ties to even, as torch's .to() does, and
    convert back exactly; NaN stays NaN."""
    x = edge_values()
    bits, back = torch.empty(len(x), dtype=torch.int16), torch.empty_like(x)
    build("cpu").round_to_half(int(dtype == torch.bfloat16), x.data_ptr(), bits.data_ptr(), back.data_ptr(), len(x))
    expected = x.to(dtype)
    nan = torch.isnan(x)
    assert torch.equal(bits[~nan], expected.view(torch.int16)[~nan])
    assert torch.equal(back[~nan], expected.float()[~nan])
    assert torch.isnan(back[nan]).all() and nan.any()


def random_tiles(seed):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 16, generator=generator) for _ in range(3)]


@HALVES
def test_program_computes_attentions_steps(build, dtype):
    """On the emulation: S = A K^T and O = A V, against float64 products of the same 16-bit
    values (their products are exact in fp32, so only the fp32 sums round), and each row's max of
    S, found by shuffles across the row's 4 lanes."""
    A, K, V = (t.to(dtype).double() for t in random_tiles(1))
    S, O, row_max, _, _ = run_program(build("cpu"), "cpu", dtype, A, K, V)
    assert torch.allclose(S.double(), A @ K.T, rtol=1e-6, atol=1e-5)
    assert torch.allclose(O.double(), A @ V, rtol=1e-6, atol=1e-5)
    assert torch.equal(row_max, S.amax(dim=1))


@HALVES
def test_fragment_registers_have_ptx_layout(build, dtype):
    """ldmatrix's A fragment in lane (g, q)'s registers as PTX lays it out: register i holds
    A[g + 8 (i % 2)][8 (i // 2) + 2q] in its low half and the next column in its high half (a layout
    with both halves swapped in ldmatrix and mma alike gives the same products: this tells them apart)."""
    A, K, V = random_tiles(1)
    registers = run_program(build("cpu"), "cpu", dtype, A, K, V)[3]
    bits = A.to(dtype).view(torch.int16).long() & 0xFFFF
    g, q = torch.arange(32) // 4, torch.arange(32) % 4
    for i in range(4):
        r, c = g + 8 * (i % 2), 8 * (i // 2) + 2 * q
        assert torch.equal(registers[:, i].long() & 0xFFFFFFFF, bits[r, c] | bits[r, c + 1] << 16), i


@pytest.mark.parametrize("device", [CUDA])
@HALVES
def test_emulation_gives_the_hardwares_answer(build, device, dtype):
    """The same source, the same inputs, on the GPU and in the emulation: if the emulation's lane
    layouts of ldmatrix, mma or the shuffles differed from the hardware's, the tiles would differ,
    and so would the registers and accumulators that each lane wrote out."""
    for seed in range(5):
        A, K, V = random_tiles(seed)
        on_gpu, emulated = (run_program(build(d), d, dtype, A, K, V) for d in (device, "cpu"))
        for name, x, y in zip(("S", "O", "row max", "registers", "accumulators"), on_gpu, emulated):
            assert torch.allclose(x, y, rtol=1e-6, atol=1e-5) if x.is_floating_point() else torch.equal(x, y), name


@pytest.mark.parametrize("device", ["cpu", CUDA])
@HALVES
def test_mma_adds_its_accumulator(build, device, dtype):
    """mma.sync's D = A V + C with C not zero, as the kernels' O += P V has it: against float64 (the
    products of 16-bit values are exact in fp32, so only the sums round), and on a GPU against the
    emulation too. A C left out, or read in another lane layout than D's, would show."""
    for seed in range(3):
        A, V, C = random_tiles(10 + seed)
        D = run_accumulate(build(device), device, dtype, A, V, C)
        expected = A.to(dtype).double() @ V.to(dtype).double() + C.double()
        assert torch.allclose(D.double(), expected, rtol=1e-6, atol=1e-5)
        if device != "cpu":
            assert torch.allclose(D, run_accumulate(build("cpu"), "cpu", dtype, A, V, C), rtol=1e-6, atol=1e-5)


# tanh.approx.f32's largest relative error over all floats (PTX ISA), kernels/mma.cuh's fast_tanh.
TANH_ERROR = 2.0**-11


def tanh_inputs():
    """+-0, subnormals, the largest floats, +-inf, NaN; small, moderate and large values of both
    signs (+-20: tanh is 1 in float32); a sweep over [-10, 10]; random values of every scale."""
    bits = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000,
            0x7FC00000]
    special = floats_of_bits(bits)
    values = torch.tensor([1e-30, -1e-30, 1e-6, -1e-6, 1e-3, -1e-3, 0.5, -0.5, 1.0, -1.0, 3.0, -3.0, 9.0, -9.0,
                           20.0, -20.0, 88.0, -88.0])
    generator = torch.Generator().manual_seed(0)
    scales = 10.0 ** torch.randint(-8, 3, (4000,), generator=generator)
    return torch.cat([special, values, torch.linspace(-10, 10, 4001), torch.randn(4000, generator=generator) * scales])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fast_tanh_within_its_documented_error(build, device):
    """fast_tanh within 2^-11 (relative) of float64 tanh, as the PTX ISA promises tanh.approx.f32 to
    be, and exact where it says so: +-0 keep their sign, +-inf give +-1, NaN stays NaN, subnormals
    pass through. The emulation (std::tanh) must keep the same promises as the GPU."""
    x = tanh_inputs()
    y = run_special(build(device), device, "tanh", x)
    nan = torch.isnan(x)
    assert torch.isnan(y[nan]).all() and not torch.isnan(y[~nan]).any()
    reference = torch.tanh(x[~nan].double())
    assert ((y[~nan].double() - reference).abs() <= TANH_ERROR * reference.abs()).all()
    zero, inf = x == 0, torch.isinf(x)
    assert torch.equal(torch.signbit(y[zero]), torch.signbit(x[zero]))
    assert torch.equal(y[inf], torch.sign(x[inf]))
    subnormal = (x != 0) & (x.abs() < torch.finfo(torch.float32).tiny)
    assert subnormal.any() and torch.equal(y[subnormal], x[subnormal])


@pytest.mark.parametrize("device", [CUDA])
def test_fast_tanh_emulation_within_the_hardwares_error(build, device):
    """The GPU's one instruction and the emulation's std::tanh on the same values: apart by at most
    the instruction's 2^-11 (and the emulation's own rounding, 2^-24), NaN in the same places."""
    x = tanh_inputs()
    on_gpu, emulated = (run_special(build(d), d, "tanh", x) for d in (device, "cpu"))
    assert torch.equal(torch.isnan(on_gpu), torch.isnan(emulated))
    assert torch.allclose(on_gpu, emulated, rtol=TANH_ERROR + 2.0**-23, atol=0.0, equal_nan=True)


def ulps(reference):
    """The unit in the last place of float32 values near the float64 reference (normal ones)."""
    return 2.0 ** (torch.floor(torch.log2(reference.abs())) - 23)


# ex2.approx.ftz.f32, kernels/mma.cuh's fast_exp2 (every softmax's exponential): 2 units in the last place
# from the correctly rounded result (PTX ISA), so 2.5 from the exact one.
EXP2_ULPS = 2.5


def exp2_inputs():
    """+-0, subnormals, +-inf, NaN; exponents whose 2^x is normal (a sweep and random values), subnormal
    (flushed), or past the largest float; none within 0.01 of -126, where the result crosses into the
    subnormals and either side of the flush may be right."""
    bits = [0x00000000, 0x80000000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000]
    special = floats_of_bits(bits)
    generator = torch.Generator().manual_seed(0)
    values = torch.cat([torch.linspace(-125.99, 127.99, 8001), torch.rand(4000, generator=generator) * -30,
                        torch.linspace(-160, -126.01, 300), torch.tensor([128.0, 200.0, 1e30])])
    return torch.cat([special, values])


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_fast_exp2_within_its_documented_error(build, device):
    """fast_exp2 within 2.5 ulp of float64 2^x where that is a normal float, 0 where it is subnormal (ftz),
    +inf past the largest float; 1 at +-0 and at subnormal inputs (flushed to 0), +0 at -inf, NaN at NaN (the
    PTX ISA's table). The emulation must keep the same promises as the GPU."""
    x = exp2_inputs()
    y = run_special(build(device), device, "exp2", x)
    reference = torch.exp2(x.double())
    tiny, largest = torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max
    normal = (reference >= tiny) & (reference <= largest) & (x.abs() >= tiny)
    assert normal.sum() > 12000
    assert ((y[normal].double() - reference[normal]).abs() <= EXP2_ULPS * ulps(reference[normal])).all()
    flushed = (reference < tiny) & ~torch.isnan(x)
    assert flushed.sum() > 300 and (y[flushed] == 0).all() and not torch.signbit(y[flushed]).any()
    assert (y[(reference > largest) & ~torch.isnan(x)] == float("inf")).all()
    one = x.abs() < tiny
    assert one.sum() == 4 and (y[one] == 1).all()
    assert torch.isnan(y[torch.isnan(x)]).all() and torch.isnan(y).sum() == 1


@pytest.mark.parametrize("device", [CUDA])
def test_fast_exp2_emulation_within_the_hardwares_error(build, device):
    """The GPU's one instruction and the emulation's std::exp2 (subnormal results flushed) on the same
    values: 0, 1, +inf and NaN in the same places, elsewhere at most 3 ulp apart (the instruction's 2.5 and
    the emulation's half)."""
    x = exp2_inputs()
    on_gpu, emulated = (run_special(build(d), d, "exp2", x) for d in (device, "cpu"))
    assert torch.equal(torch.isnan(on_gpu), torch.isnan(emulated))
    exact = torch.isnan(on_gpu) | torch.isinf(on_gpu) | (on_gpu == 0) | (x.abs() < torch.finfo(torch.float32).tiny)
    assert torch.equal(on_gpu[exact & ~torch.isnan(on_gpu)], emulated[exact & ~torch.isnan(on_gpu)])
    assert torch.allclose(on_gpu[~exact], emulated[~exact], rtol=3 * 2.0**-23, atol=0.0)

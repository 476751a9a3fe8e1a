"""The CPU emulation itself (kernels/cpu_cuda.h): barriers that block, barriers that can never
complete, warp collectives, shared memory per block, atomics across cores, cp.async, Hopper's
mbarrier, TMA, named barriers, wgmma (A and B K-major or MN-major), setmaxnreg and the bulk reduce,
launch errors, and Ctrl-C. The small kernels are in tests/emulation_cases.cpp; the Ctrl-C tests run
minimal_flash in a subprocess (and in a Jupyter kernel) and interrupt it."""
import contextlib
import ctypes
import math
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
import torch.utils.cpp_extension

import minimal_flash as mf

ROOT = mf.KERNELS.parent
CASES = ROOT / "tests" / "emulation_cases.cpp"


def line_of(marker):
    """The line of tests/emulation_cases.cpp that carries `// line: marker`."""
    for number, text in enumerate(CASES.read_text().splitlines(), start=1):
        if text.rstrip().endswith(f"// line: {marker}"):
            return f"tests/emulation_cases.cpp:{number}"
    raise AssertionError(f"no line marked {marker}")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """run(name, n=1, out=None, inp=None) -> the launch's error message ("" on success)."""
    mf._use_this_pythons_ninja()
    path = torch.utils.cpp_extension.load(
        name="emulation_cases", sources=[str(CASES)], build_directory=str(tmp_path_factory.mktemp("emulation")),
        extra_include_paths=[str(mf.KERNELS)], extra_cflags=["-O2", "-fno-strict-aliasing"], is_python_module=False)
    library = ctypes.CDLL(path)
    library.run_case.restype = ctypes.c_char_p
    library.run_case.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    library.set_workers.argtypes = [ctypes.c_int]

    def run(name, n=1, out=None, inp=None):
        out = out if out is not None else torch.zeros(1)
        inp = inp if inp is not None else torch.zeros(4)
        return library.run_case(name.encode(), out.data_ptr(), inp.data_ptr(), n).decode()

    @contextlib.contextmanager
    def workers(count):
        """Launches inside the with on `count` OS threads; after it, on one per core again."""
        library.set_workers(count)
        try:
            yield
        finally:
            library.set_workers(0)

    run.library, run.workers = library, workers
    return run


# ---- Barriers that can never complete: an error that names the kernel and the line, not a hang


def test_barrier_that_some_threads_skip_fails_with_its_line(cases):
    error = cases("barrier_in_branch", n=8)  # the first block to fail, of those running at once, reports
    expected = (f"barrier deadlock in barrier_in_branch, block (BLOCK, 0, 0): the __syncthreads() at "
                f"{line_of('barrier_in_branch')} can never complete: threads 0-63 wait there, threads 64-127 "
                "have exited (every thread of a block must reach the same __syncthreads())")
    assert re.fullmatch(re.escape(expected).replace("BLOCK", "[0-7]"), error), error
    # The process goes on: the next launch runs, and runs right.
    out = torch.full((64 * 3,), float("nan"))
    assert cases("neighbour", n=3, out=out) == ""
    assert torch.equal(out, ((torch.arange(64) + 1) % 64).float().repeat(3))


def test_threads_at_two_different_barriers_fail(cases):
    """The same message whichever thread arrived first: the launches below run in the two orders."""
    with cases.workers(1):
        error, again = cases("two_barriers"), cases("two_barriers")
    assert error == again
    assert (f"the __syncthreads() at {line_of('two_barriers_first')} can never complete: threads 0-31 wait there, "
            f"threads 32-127 wait at the __syncthreads() at {line_of('two_barriers_second')}") in error


def test_shuffle_waiting_for_lanes_that_exited_fails(cases):
    error = cases("shuffle_after_exit", out=torch.zeros(64))
    assert error.startswith("barrier deadlock in shuffle_after_exit, block (0, 0, 0): warp 0's __shfl_xor_sync() at "
                            f"{line_of('shuffle_after_exit')} can never complete: threads 0-15 wait there, "
                            "threads 16-31 have exited (all 32 lanes of a warp")


def test_shuffle_and_barrier_waiting_for_each_other_fail(cases):
    error = cases("shuffle_or_barrier", out=torch.zeros(32))
    assert (f"the __syncthreads() at {line_of('shuffle_or_barrier_barrier')} can never complete: threads 0-15 wait "
            f"at the __shfl_xor_sync() at {line_of('shuffle_or_barrier_shuffle')}, threads 16-31 wait there") in error


def test_deadlock_reaches_python_as_runtime_error():
    """Through minimal_flash's path: bindings.cu turns the launch's error into the message that
    _raise_if raises. (A kernel of this repository has no deadlock, so the message is built here.)"""
    with pytest.raises(RuntimeError, match="barrier deadlock in flash2_forward"):
        mf._raise_if("flash2_forward failed: barrier deadlock in flash2_forward, block (0, 0, 0): ...")


# ---- Barriers that block; shared memory per block


@pytest.mark.parametrize("case", ["next_without_barrier", "previous_without_barrier"])
def test_missing_barrier_gives_a_wrong_answer(cases, case):
    """A thread runs ahead to the next barrier, as far as it can: without one, it reads its
    neighbour's word before the neighbour wrote it, and gets the NaN poison. The threads take turns
    in one order in one block and in the other in the next, so this shows in full whichever
    neighbour a thread reads."""
    with cases.workers(1):  # the blocks in turn on one worker, so in both orders
        out = torch.zeros(64 * 2)
        assert cases(case, n=2, out=out) == ""
    # In one block 63 of the 64 threads read too early; in the other, only the one whose neighbour
    # (across the ends of the block) takes its turn after it.
    assert sorted(out.view(2, 64).isnan().sum(dim=1).tolist()) == [1, 63], out
    assert cases("neighbour", n=2, out=out) == ""
    assert torch.equal(out, ((torch.arange(64) + 1) % 64).float().repeat(2))


def test_missing_barrier_between_warps_gives_a_wrong_answer(cases):
    """A warp runs on to its next __syncthreads before the next warp starts: without the barrier,
    the first warp overwrites the words that the second has still to read."""
    out = torch.zeros(64 * 2)
    assert cases("read_then_overwrite_without_barrier", n=2, out=out) == ""
    assert (out == -1).any(), out
    assert cases("read_then_overwrite", n=2, out=out) == ""
    assert torch.equal(out, ((torch.arange(64) + 32) % 64).float().repeat(2))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_block_has_its_own_poisoned_shared_memory(cases, workers):
    """Blocks run at the same time on several OS threads, each with its own shared memory, filled
    with NaN before every block."""
    blocks = 24
    with cases.workers(workers):
        out = torch.zeros(2 * blocks)
        assert cases("own_shared_memory", n=blocks, out=out) == ""
    assert torch.equal(out, torch.zeros(2 * blocks)), out


def test_indices_are_cudas_after_every_switch(cases):
    grid, block = (3, 2, 2), (4, 4, 2)
    out = torch.full((12 * 12 * 32,), float("nan"))
    assert cases("indices", out=out) == ""
    expected = [[tx, ty, tz, bx, by, bz, *block, *grid]
                for bz in range(2) for by in range(2) for bx in range(3)
                for tz in range(2) for ty in range(4) for tx in range(4)]
    assert torch.equal(out.view(-1, 12), torch.tensor(expected, dtype=torch.float32))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_atomic_add_is_atomic_across_blocks(cases, workers):
    """64 blocks of 128 threads, on several OS threads: every one of 64 * 128 * 200 additions counts
    (integers below 2^24 are exact in float32)."""
    with cases.workers(workers):
        out = torch.zeros(33)
        assert cases("count", n=200, out=out) == ""
    assert out[0].item() == 64 * 128 * 200
    assert torch.equal(out[1:], torch.full((32,), 64 * 4.0))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_integer_atomic_add_returns_each_old_value_once(cases, workers):
    """atomicAdd on an int returns the value before its addition: 64 blocks of 128 threads taking 4
    tickets each get every ticket from 0 to 32767 exactly once, and the counter ends past the last."""
    taken = torch.zeros(1, dtype=torch.int32)
    with cases.workers(workers):
        out = torch.zeros(64 * 128 * 4)
        assert cases("tickets", n=4, out=out, inp=taken) == ""
    assert taken.item() == 64 * 128 * 4
    assert torch.equal(out, torch.ones_like(out))


# ---- cp.async


def test_cp_async_lands_at_the_wait(cases):
    """Before the wait the destination holds NaN: neither what the thread wrote there before the
    copy, nor the copy."""
    source = torch.arange(32 * 4, dtype=torch.float32)
    out = torch.zeros(32 * 8)
    assert cases("copy_then_wait", out=out, inp=source) == ""
    before, after = out.view(32, 2, 4).unbind(1)
    assert before.isnan().all()
    assert torch.equal(after.reshape(-1), source)


def test_misaligned_cp_async_fails(cases):
    error = cases("copy_misaligned", inp=torch.zeros(64))
    assert error.startswith("misaligned address: a cp.async of 16 bytes from ")
    assert f"at {line_of('copy_misaligned')} in copy_misaligned, block (0, 0, 0)" in error


def test_cp_async_never_waited_for_fails(cases):
    assert "cp.async copies never waited for" in cases("copy_never_waited", inp=torch.zeros(64))


def test_cp_async_wait_1_leaves_the_newest_group_in_flight(cases):
    """Two commit groups, then cp_async_wait<1> (the wait the kernels' rings use): the first has landed,
    the second not yet (its destination still NaN) until wait<0>."""
    source = torch.arange(256, dtype=torch.float32)
    out = torch.zeros(256)
    assert cases("copy_wait_one", out=out, inp=source) == ""
    first, second = out.view(32, 2, 4).unbind(1)
    assert torch.equal(first.reshape(-1), source[:128]) and second.isnan().all()


def test_cp_async_invalid_lands_zeros(cases):
    """cp.async with valid false (src-size 0, the kernels' rows past the sequence's end), 16 and 4 bytes:
    zeros land over a source that holds none; valid copies land the source beside them."""
    source = torch.arange(1, 32 * 8 + 1, dtype=torch.float32)
    out = torch.full((32 * 8,), math.nan)
    assert cases("copy_invalid_zero_fills", out=out, inp=source) == ""
    landed, source = out.view(32, 8), source.view(32, 8)
    assert torch.equal(landed[0::2], source[0::2]) and torch.equal(landed[1::2], torch.zeros(16, 8))


# ---- Hopper (kernels/hopper.cuh): mbarrier, TMA, named barriers, wgmma, setmaxnreg, bulk reduce


def test_mbarrier_ring_of_tma_loads(cases):
    """A producer thread and a consumer warp pass 2 buffers around through full and empty barriers
    (the producer's first wait on each empty one passes at once); the last box is 5 rows of the
    tensor and 3 past its end, which land as zeros."""
    tiles = 5
    source = torch.randn(8 * tiles - 3, 32)
    out = torch.full((tiles * 32,), float("nan"))
    assert cases("mbarrier_ring", n=tiles, out=out, inp=source) == ""
    expected = torch.cat([source, torch.zeros(3, 32)]).view(tiles, 8, 32).sum(dim=1)
    assert torch.equal(out.view(tiles, 32), expected)


def test_mbarrier_phase_nobody_completes_fails(cases):
    error = cases("mbarrier_never_completes")
    assert error.startswith("barrier deadlock in mbarrier_never_completes, block (0, 0, 0): the mbarrier wait "
                            f"(parity 0) at {line_of('mbarrier_never_completes')} can never complete: threads 0-31 "
                            "have exited, threads 32-63 wait there (its barrier, at shared memory byte 0, has "
                            "completed 0 phases and awaits 1 of its 1 arrivals and 0 bytes"), error


def test_mbarrier_bytes_announced_that_never_come_fail(cases):
    """expect_tx announcing more bytes than the copies bring: on a GPU the wait would hang; here its
    phase can never complete, and the message counts the bytes still awaited."""
    error = cases("mbarrier_bytes_never_come", out=torch.zeros(1), inp=torch.zeros(256))
    assert error.startswith("barrier deadlock in mbarrier_bytes_never_come, block (0, 0, 0): the mbarrier wait "
                            f"(parity 0) at {line_of('mbarrier_bytes_never_come')} can never complete: "), error
    assert "awaits 0 of its 1 arrivals and 16 bytes" in error, error


def test_mbarrier_never_initialized_fails(cases):
    error = cases("mbarrier_uninitialized")
    assert f"at {line_of('mbarrier_uninitialized')} in mbarrier_uninitialized" in error
    assert "the mbarrier at shared memory byte 0 was never initialized" in error


def test_tma_lands_swizzled_at_the_wait(cases):
    """Before the wait on its barrier the box's destination holds NaN; after, the 8 rows of 128
    bytes, the 16-byte chunk c of row r at chunk c ^ r (the 128-byte swizzle)."""
    source = torch.arange(256, dtype=torch.float32).view(8, 32)
    out = torch.zeros(512)
    assert cases("tma_then_wait", out=out, inp=source) == ""
    assert out[:256].isnan().all()
    chunks = source.view(8, 8, 4)
    expected = torch.stack([chunks[r, torch.arange(8) ^ r] for r in range(8)])
    assert torch.equal(out[256:].view(8, 8, 4), expected)


def test_tma_misaligned_or_never_waited_fails(cases):
    error = cases("tma_misaligned", inp=torch.zeros(256))
    assert error.startswith(f"misaligned address: tma_load at {line_of('tma_misaligned')} in tma_load_at"), error
    assert "must be 1024-byte aligned with the 128-byte swizzle; this one is at shared memory byte 128" in error
    assert "TMA copies never landed" in cases("tma_never_waited", inp=torch.zeros(256))


def test_named_barrier_sync_and_arrive(cases):
    """Warp 0 writes and arrives; warps 1-3 sync and read what it wrote. With only 64 of the 128
    threads at the barrier, it can never complete."""
    out = torch.zeros(128)
    assert cases("named_barriers", n=128, out=out) == ""
    assert torch.equal(out[32:], (torch.arange(32, 128) % 32 + 1).float())
    assert cases("named_barriers", n=64, out=out) == (
        "barrier deadlock in named_barriers, block (0, 0, 0): the named barrier 1 (128 threads) at "
        f"{line_of('named_barrier_never_completes')} can never complete: threads 0-63 wait there, threads 64-127 "
        "have exited (as many threads as its count must arrive at a named barrier, by named_barrier_sync or "
        "named_barrier_arrive)")


def test_named_barrier_arrive_does_not_wait(cases):
    """Warp 0 arrives at barrier 1, then at barrier 2; warps 1-3 sync at 2, then at 1: this completes
    only if an arrive goes on without waiting for the barrier to complete."""
    out = torch.zeros(128)
    assert cases("arrive_then_other", out=out) == ""
    assert (out[32:] == 1).all()


def test_bulk_load_lands_at_the_wait(cases):
    """A bulk copy (cp.async.bulk, no tensor map) to shared memory: NaN there until the mbarrier's wait."""
    source = torch.arange(256, dtype=torch.float32)
    out = torch.zeros(512)
    assert cases("bulk_load_then_wait", out=out, inp=source) == ""
    assert out[:256].isnan().all() and torch.equal(out[256:], source)


def test_wgmma_accumulators_land_at_the_wait(cases):
    """Two wgmma of ones (A 64 x 16, B 16 x 64) onto the same accumulators, the second chained on
    the first in flight: NaN before wgmma_wait, 32 after. Without the wait, the launch fails."""
    out = torch.zeros(256)
    assert cases("wgmma_ones", out=out) == ""
    assert out[0::2].isnan().all()
    assert (out[1::2] == 32).all()
    assert "wgmma results never waited for" in cases("wgmma_never_waited", out=out)


@pytest.mark.parametrize("n", [64, 128])
@pytest.mark.parametrize("majors", ["kk", "mk", "km", "mm"])
def test_wgmma_ss_reads_a_and_b_k_major_or_mn_major(cases, majors, n):
    """wgmma_ss<T, N, TRANS_A, TRANS_B>: A (64 x 64) and B (64 x N) stored in shared memory K-major or,
    transposed, MN-major (A M-major: rows of 64 values of m, one per k; B N-major: rows of n, 64-column
    tiles LBO apart), with the 128-byte swizzle; 4 steps of k16 give A B, as float64 computes it from
    the same bf16 values, within fp32 rounding."""
    generator = torch.Generator().manual_seed(n + len(majors))
    A = torch.randn(64, 64, generator=generator).bfloat16().float()
    B = torch.randn(64, n, generator=generator).bfloat16().float()
    out = torch.full((64, n), float("nan"))
    assert cases(f"wgmma_transposed_{majors}", n=n, out=out, inp=torch.cat([A.flatten(), B.flatten()])) == ""
    assert torch.allclose(out.double(), A.double() @ B.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_bulk_reduce_adds_every_block_into_global_memory(cases, workers):
    """64 blocks each add 2 x 256 floats into the same 512 by bulk_reduce_add, on several OS threads:
    every addition counts (small integers: exact). The first group's buffer is overwritten after
    wait_read<1>, which retires it, and the second's after wait_read<0>: neither changes the sums."""
    blocks = 64
    with cases.workers(workers):
        out = torch.zeros(512)
        assert cases("bulk_reduce", n=blocks, out=out) == ""
    b = torch.arange(blocks, dtype=torch.float32)
    expected_first = (torch.arange(256)[:, None] % 7 + b).sum(dim=1)
    assert torch.equal(out[:256], expected_first)
    assert torch.equal(out[256:], torch.full((256,), (b + 1).sum().item()))


@pytest.mark.parametrize("workers", [2, 4])
def test_bulk_reduce_is_atomic(cases, workers):
    """64 blocks each add ones into the same 512 floats 200 times, on several OS threads at once: the
    additions collide, and none is lost (a plain += loses some)."""
    with cases.workers(workers):
        out = torch.zeros(512)
        assert cases("bulk_reduce_rounds", n=200, out=out) == ""
    assert torch.equal(out, torch.full((512,), 64 * 200.0))


def test_bulk_reduce_reads_its_source_at_the_wait(cases):
    """The hardware may read a bulk reduce's shared memory at any moment until the bulk_wait_read that
    retires it: the emulation reads it then, so a source overwritten before that wait adds the new
    values (-1000 here), and the mistake shows."""
    out = torch.zeros(512)
    assert cases("bulk_reduce_overwritten_early", n=2, out=out) == ""
    assert torch.equal(out[:256], (torch.arange(256) % 7 * 2 + 1).float())
    assert torch.equal(out[256:], torch.full((256,), -2000.0))


def test_bulk_reduce_refused(cases):
    """As on a GPU: both addresses 16-byte aligned, a multiple of 16 bytes, the source in shared
    memory; and, as for TMA copies, a bulk reduce never waited for (committed or not) fails the launch."""
    def run(what):
        return cases("bulk_refused", n=what, out=torch.zeros(64), inp=torch.zeros(64))

    error = run(0)
    assert error.startswith(f"misaligned address: bulk_reduce_add at {line_of('bulk_misaligned')} in bulk_refused, "
                            "block (0, 0, 0), thread "), error
    assert "a bulk reduce's addresses must be 16-byte aligned; this one adds from " in error
    error = run(1)
    assert f"at {line_of('bulk_size')}" in error
    assert error.endswith("the size of a bulk reduce is a multiple of 16 bytes; this one is 24"), error
    error = run(2)
    assert f"at {line_of('bulk_not_shared')}" in error
    assert error.endswith("the source of a bulk reduce must be the block's shared memory (256 bytes); these 64 "
                          "bytes are not"), error
    for what in (3, 4):
        error = run(what)
        assert re.fullmatch(r"invalid argument: bulk_refused, block \(0, 0, 0\), thread \d+: bulk reduce never "
                            r"waited for \(a bulk_commit and bulk_wait_read must follow the last bulk_reduce_add\)",
                            error), error


def test_setmaxnreg_takes_multiples_of_8_from_24_to_256(cases):
    assert cases("setmaxnreg_good") == ""
    error = cases("setmaxnreg_bad")
    expected = (f"invalid argument: setmaxnreg_dec at {line_of('setmaxnreg')} in setmaxnreg_case<20>, block "
                "(0, 0, 0), thread N: 20 registers: the count must be a multiple of 8 from 24 to 256")
    assert re.fullmatch(re.escape(expected).replace("N", "(0|127)"), error), error  # the first to run


def test_setmaxnreg_inc_past_what_was_given_back_fails(cases):
    """384 threads hold 168 registers each (the 64K over the block). 24 x 128 + 2 x 240 x 128 is all of
    them; with the producer at 32, the consumers' increase would wait for good on a GPU (a hang that a
    version 4 change once met there): here the launch fails and says so."""
    assert cases("setmaxnreg_pool") == ""
    error = cases("setmaxnreg_pool_short")
    expected = ("setmaxnreg_pool<32>, block (0, 0, 0): the setmaxnreg_inc at "
                f"{line_of('setmaxnreg_pool')} would wait for good on a GPU: the block's warpgroups ask for 1024 "
                "registers more than its 384 threads have together (168 each, the 64K of a multiprocessor over the "
                "block's threads: what ptxas compiles such a kernel to)")
    assert error.endswith(expected), error


def test_setmaxnreg_is_a_collective_of_each_warpgroup(cases):
    """Half of each of two warpgroups reaches setmaxnreg, the other half exits: neither warpgroup's can
    complete (each waits for its own 128 threads, not for the block's first warpgroup)."""
    assert "can never complete" in cases("setmaxnreg_half")


# ---- Launch errors, as a GPU reports them, and what the emulation refuses


@pytest.mark.parametrize("case", ["too_many_threads", "no_blocks", "shared_without_opt_in", "block_z_128",
                                  "grid_y_70000", "block_product_wraps"])
def test_bad_launch_configuration(cases, case):
    """As a GPU: at most 1024 threads (counted in 64 bits: 641 x 6700417 wraps to 1 in 32), 64 along z, a grid
    of at most 65535 blocks along y."""
    assert cases(case) == "invalid configuration argument"


def test_more_than_48_kb_after_opt_in(cases):
    out = torch.zeros(1)
    assert cases("shared_with_opt_in", out=out) == ""
    assert out.item() == 1


def test_warp_collective_needs_whole_warps(cases):
    error = cases("shuffle_in_part_of_a_warp", out=torch.zeros(48))
    assert "a block of 48 threads: the emulation runs warp-collective operations in whole warps only" in error


# ---- Warp collectives read at the collective point; the mistakes a GPU reports


def test_shuffle_moves_each_lanes_own_value(cases):
    """__shfl_xor_sync of float(lane) with lane masks 1, 2, 4, 8, 16, on two warps: lane l gets l ^ mask
    (constant values, or masks applied twice, could not tell a wrong lane from the right one)."""
    out = torch.full((160,), float("nan"))
    assert cases("shuffle_lanes", out=out) == ""
    lane = torch.arange(32)
    assert torch.equal(out.view(5, 32), torch.stack([(lane ^ (1 << m)).float() for m in range(5)]))


def test_ldmatrix_reads_every_row_before_any_lane_goes_on(cases):
    """Each lane zeroes the row it gave right after the ldmatrix: the instruction has read all 32 rows."""
    out = torch.zeros(32)
    assert cases("ldmatrix_then_overwrite", out=out) == ""
    assert torch.equal(out, torch.full((32,), 8.0)), out


def test_ldmatrix_misaligned_row_fails(cases):
    error = cases("ldmatrix_misaligned", out=torch.zeros(32))
    assert error.startswith(f"misaligned address: ldmatrix at {line_of('ldmatrix_misaligned')} in ldmatrix_misaligned, "
                            "block (0, 0, 0), thread "), error
    assert error.endswith("lane 1's row, at shared memory byte 18, is not 16-byte aligned"), error


def test_misaligned_vector_access_fails(cases):
    """A float4 (float2) at an address that is not a multiple of 16 (8): "misaligned address", as on a GPU,
    not a crash of the process (an aligned vector instruction) nor a silent result."""
    inp = torch.arange(64, dtype=torch.float32)
    error = cases("vector_misaligned", n=0, out=torch.zeros(32), inp=inp)
    assert re.fullmatch(r"misaligned address: a 16-byte load \(float4\) at 0x[0-9a-f]+ at "
                        + re.escape(line_of("vector_misaligned")) + r" in vector_misaligned, block \(0, 0, 0\), "
                        r"thread \d+: the address must be a multiple of 16", error), error
    error = cases("vector_misaligned", n=1, out=torch.zeros(32), inp=inp)
    assert error.startswith("misaligned address: a 8-byte store (float2) at 0x"), error


# ---- Polls that can never succeed, shared memory's bounds


def test_shared_memory_past_the_launch_size_is_poisoned(cases):
    """A block of 1 KB reads word 1000, which an earlier block of 8 KB wrote: NaN, not the old 42."""
    out = torch.zeros(1)
    assert cases("shared_stale", out=out) == ""
    assert out.isnan().all(), out


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_shared_memory_past_the_launch_size_is_poisoned_on_every_thread(cases, workers):
    """The same across launches on several OS threads (a launch's helper threads are new ones, each with its
    own shared memory): after blocks of 8 KB then of 1 KB, every block of 1 KB reads word 1000 as NaN, neither
    the 42 that blocks of 8 KB wrote there nor the 0 of a new thread's buffer (which the poisoning, kept per
    worker rather than per thread, once left past the last block's size)."""
    with cases.workers(workers):
        out = torch.zeros(16)
        assert cases("shared_stale_across_launches", n=16, out=out) == ""
    assert out.isnan().all(), out


@pytest.mark.parametrize("word", [255, 256, 257, 300, 56000])
def test_a_write_past_the_launch_size_fails(cases, word):
    """A block of 1 KB writes word `word` (byte 4 word): within its size the launch runs; past it, it fails as a
    GPU's illegal address, naming the first byte written. Either way the next launch, of 2 KB, reads that
    word poisoned (NaN), not the 42 left behind."""
    out = torch.zeros(1)
    error = cases("shared_write_past", n=word, out=out)
    assert error == ("" if word < 256 else
                     f"an illegal memory access was encountered: shared_write, block (0, 0, 0) wrote shared memory "
                     f"byte {4 * word}, past the block's 1024 bytes of shared memory (the size its launch asked for)")
    assert out.isnan().all(), out


def test_cp_async_outside_shared_memory_fails(cases):
    for global_ in (0, 1):
        out = torch.zeros(16)
        error = cases("copy_outside_shared", n=global_, out=out, inp=torch.ones(16))
        assert error.startswith("an illegal memory access was encountered: a cp.async of 16 bytes at "
                                f"{line_of('copy_outside_shared')} in copy_outside_shared, block (0, 0, 0), thread 0: "
                                "its destination is not in the block's 256 bytes of shared memory"), error
        assert torch.equal(out, torch.zeros(16))


# ---- Several builds and threads, Ctrl-C that cannot stop a kernel, faults, fork: each in a child process,
# with a time limit (before, each of these hung or killed the process)

CHILD_PRELUDE = textwrap.dedent("""
    import ctypes, os, signal, sys, threading, time
    import torch  # the library links against torch's
    signal.signal(signal.SIGINT, signal.default_int_handler)
    def load(path):
        library = ctypes.CDLL(path)
        library.run_case.restype = ctypes.c_char_p
        library.run_case.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
        return library
    buffers = [(ctypes.c_float * 64)() for _ in range(8)]
    def run(library, name, n, buffer=0):
        return library.run_case(name.encode(), buffers[buffer], buffers[buffer], n).decode()
    def later(seconds, what):
        threading.Timer(seconds, what).start()
    def ctrl_c():
        os.kill(os.getpid(), signal.SIGINT)
    A = load(sys.argv[1])
""")


def child(cases, tmp_path, code, timeout=60):
    """Runs `code` after CHILD_PRELUDE in a child Python, with the cases' library (A) and, as B, a copy of it
    (another build: a library with its own emulation). Returns (exit status, stdout, stderr); None if it did
    not end within `timeout` s (killed)."""
    copy = tmp_path / "copy_of_cases.so"
    copy.write_bytes(open(cases.library._name, "rb").read())
    script = CHILD_PRELUDE + f"B = load({str(copy)!r})\n" + textwrap.dedent(code)
    process = subprocess.Popen([sys.executable, "-c", script, cases.library._name], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # and what it forked, which holds the pipes open
        process.communicate()
        return None
    return process.returncode, out, err


def test_ctrl_c_after_two_builds_launches_overlapped(cases, tmp_path):
    """Two builds launch from two threads, overlapping (A starts, B starts, A ends, A starts again while B
    still runs): Ctrl-C stops both and raises KeyboardInterrupt; so it does with no launch running, and
    during a later launch. (Before, the handlers each build put in place and took away chained to each
    other in a loop, and Ctrl-C hung the process for good.)"""
    result = child(cases, tmp_path, """
        results = {}
        def launch(library, key, n, buffer):
            results[key] = run(library, "barriers", n, buffer)
        a = threading.Thread(target=launch, args=(A, "a", 3000, 0)); a.start(); time.sleep(0.3)
        b = threading.Thread(target=launch, args=(B, "b", 100000, 1)); b.start(); a.join()
        a = threading.Thread(target=launch, args=(A, "a2", 100000, 2)); a.start(); time.sleep(0.5)
        later(0.5, ctrl_c)
        try:
            time.sleep(5)
            print("no KeyboardInterrupt")
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
        a.join(), b.join()
        print(results["a"] or "ok", results["a2"], results["b"], flush=True)
        try:
            ctrl_c(); time.sleep(2)
            print("no KeyboardInterrupt")
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
        later(1.0, ctrl_c)
        try:
            print(run(A, "barriers", 100000, 3))
        except KeyboardInterrupt:
            print("KeyboardInterrupt")
        print(run(B, "barriers", 10, 4) or "ok", buffers[4][0])
    """)
    assert result is not None, "the child hung"
    status, out, err = result
    assert status == 0, err
    assert out.split("\n") == ["KeyboardInterrupt", "ok interrupted interrupted", "KeyboardInterrupt",
                                "KeyboardInterrupt", "ok 64.0", ""], out


def test_ctrl_c_while_waiting_for_another_threads_launch(cases, tmp_path):
    """A launch that waits for another thread's launch of the same build: a Ctrl-C then stops both at
    once. (Before, the waiting one cleared the Ctrl-C when its turn came, and ran to its end.)"""
    result = child(cases, tmp_path, """
        threading.Thread(target=run, args=(A, "barriers", 100000, 0), daemon=True).start(); time.sleep(0.5)
        later(1.0, ctrl_c)
        start = time.monotonic()
        try:
            print(run(A, "barriers", 100000, 1))
        except KeyboardInterrupt:
            print("KeyboardInterrupt", time.monotonic() - start)
    """)
    assert result is not None, "the child hung"
    status, out, err = result
    words = out.split()
    assert status == 0 and words[0] == "KeyboardInterrupt" and float(words[1]) < 4, (out, err)


def test_second_ctrl_c_ends_a_kernel_that_never_switches(cases, tmp_path):
    """A thread spins on a flag that another thread of its block would set: the emulation never runs that
    one, and the first Ctrl-C cannot stop the spin; a second one ends the process, saying why."""
    result = child(cases, tmp_path, """
        later(1.0, ctrl_c); later(2.5, ctrl_c)
        print(run(A, "spin_on_shared_flag", 1))
    """, timeout=30)
    assert result is not None, "the child hung"
    status, out, err = result
    assert status == -signal.SIGINT, (status, out, err)
    assert ("minimal_flash: Ctrl-C again, and the CPU emulation of spin_on_shared_flag has not stopped: a thread of "
            "the kernel runs code that never reaches a barrier, a warp collective or a wait") in err, err


@pytest.mark.parametrize("case,n,said", [
    ("big_local_array", 3, "thread 0: SIGSEGV at address 0x[0-9a-f]+: stack overflow: the thread's locals take more "
                           "than the 128 KB of stack that the emulation gives a thread; the process ends"),
    ("global_out_of_bounds", 1, r"thread 0: SIGSEGV(?: at address 0x[0-9a-f]+)?: (a general-protection fault|an "
                                r"access outside the process's memory)")])
def test_fault_in_a_kernel_says_where_and_why(cases, tmp_path, case, n, said):
    """A fault in a kernel's thread cannot be recovered from: the process still ends, with a line that names
    the kernel, the block, the thread and the likely cause."""
    result = child(cases, tmp_path, f"print(run(A, {case!r}, {n}))")
    assert result is not None, "the child hung"
    status, out, err = result
    assert status == -signal.SIGSEGV, (status, err)
    assert re.search(f"minimal_flash: CPU emulation of {case}, block \\(0, 0, 0\\), {said}", err), err


def test_launch_in_a_child_forked_during_a_launch_fails(cases, tmp_path):
    """Forked while another thread ran a launch: the child's launch fails, as CUDA refuses to run in such a
    child (before, it hung on the lock that the other thread held at the fork). The launch lasts about 2 s
    on 2 cores, well past the fork at 0.5 s: the test needs it still running then."""
    result = child(cases, tmp_path, """
        thread = threading.Thread(target=run, args=(A, "barriers", 40000, 0)); thread.start(); time.sleep(0.5)
        pid = os.fork()
        if pid == 0:
            print(run(A, "barriers", 1, 1), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        thread.join()
        print(run(A, "barriers", 1, 2) or "ok", buffers[2][0])
    """)
    assert result is not None, "the child hung"
    status, out, err = result
    lines = out.split("\n")
    assert lines[0].startswith("initialization error: this process was forked while another of its threads ran a "
                               "launch of the CPU emulation"), out
    assert lines[1] == "ok 64.0", out


def test_exception_or_assert_in_a_kernel_fails_the_launch(cases, tmp_path):
    """A C++ exception leaving a kernel's thread, or a failed assert, fails the launch (a GPU's device-side
    assert) instead of ending the process (before, it did: in a child process here); the next launch runs."""
    result = child(cases, tmp_path, """
        print(run(A, "throws", 1)); print(run(A, "asserts", 1)); print(run(A, "barriers", 1, 3) or "ok", buffers[3][0])
    """)
    assert result is not None, "the child hung"
    status, out, err = result
    throws, asserts, after, _ = out.split("\n")
    assert throws == "unspecified launch failure: throws, block (0, 0, 0), thread 5 threw a C++ exception: a reader's "\
                     "exception", (out, err)
    assert asserts.startswith(f"device-side assert triggered: {line_of('asserts')}: "), asserts
    assert asserts.endswith("Assertion `threadIdx.x != 5' failed, in asserts, block (0, 0, 0), thread 5"), asserts
    assert after == "ok 64.0" and status == 0, (out, err)


def test_try_wait_loop_that_can_never_succeed_fails(cases, tmp_path):
    """A try_wait loop on a phase that no thread left can complete, and one that a thread waiting at a
    __syncthreads would complete: named deadlocks (before, they spun for good: in a child process here)."""
    result = child(cases, tmp_path, """
        print(run(A, "try_wait_forever", 1)); print(run(A, "sync_vs_polling", 1))
    """)
    assert result is not None, "the child hung"
    forever, polling, _ = result[1].split("\n")
    assert forever == (f"barrier deadlock in try_wait_forever, block (0, 0, 0): the mbarrier_try_wait loop (parity 0) "
                       f"at {line_of('try_wait_forever')} can never complete: threads 0-63 wait there (its barrier, "
                       "at shared memory byte 0, has completed 0 phases and awaits 32 of its 64 arrivals and 0 bytes: "
                       "a phase completes when all its arrivals have arrived and all the bytes announced by "
                       "expect_tx have landed)"), forever
    assert (f"the __syncthreads() at {line_of('sync_vs_polling_barrier')} can never complete: threads 0-31 wait "
            f"there, threads 32-63 wait at the mbarrier_try_wait loop (parity 0) at {line_of('sync_vs_polling_poll')}"
            in polling), polling


# ---- Ctrl-C and the progress line, through minimal_flash, as a user meets them

LONG_CALL = textwrap.dedent("""
    import signal, sys, time
    # Python's own SIGINT handler, whatever disposition the test process handed down: an ignored SIGINT
    # is inherited across exec, and then no Ctrl-C reaches the child (seen in full runs of the suite).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path.insert(0, {root!r})
    import torch
    import minimal_flash as mf
    q = torch.randn(1, 1, 64, 64)
    mf.flash_attention(q, q, q)  # builds or loads the kernels
    big = torch.randn(1, 8, 16384, 64)
    print("start", flush=True)
    try:
        mf.flash_attention(big, big, big)
        print("finished", flush=True)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", flush=True)
    q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))
    error = (mf.flash_attention(q, k, v) - mf.manual_attention(q, k, v)).abs().max().item()
    print("after", error, flush=True)
""")


def lines_of(stream):
    """The stream's lines, as they come, on a queue (None at the end)."""
    lines = queue.Queue()

    def read():
        for line in stream:
            lines.put((time.monotonic(), line.rstrip("\n")))
        lines.put((time.monotonic(), None))

    threading.Thread(target=read, daemon=True).start()
    return lines


def next_line(lines, timeout, what):
    try:
        when, line = lines.get(timeout=timeout)
    except queue.Empty:
        raise AssertionError(f"no {what} within {timeout} s") from None
    assert line is not None, f"the process ended before {what}"
    return when, line


def test_ctrl_c_stops_a_long_cpu_call(tmp_path):
    """Version 2 at (1, 8, 16384, 64) runs for half a minute on 2 cores (seconds on many). After 2 s
    it says so on stderr, with its estimate; SIGINT then raises KeyboardInterrupt within 3 s, and the
    next call is right."""
    child = subprocess.Popen([sys.executable, "-c", LONG_CALL.format(root=str(ROOT))], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        out, err = lines_of(child.stdout), lines_of(child.stderr)
        started, line = next_line(out, 600, '"start"')  # a first build can take a minute
        assert line == "start"
        while True:  # the build's messages, then the progress line
            said, line = next_line(err, 15, "progress line on stderr")
            if "CPU emulation of" in line:
                break
        assert re.fullmatch(r"minimal_flash: CPU emulation of flash2::forward, \d+ blocks of \d+ threads: "
                            r"about \d+ (s|min) left \(Ctrl-C stops it\)", line), line
        assert 1.5 < said - started < 6, said - started
        child.send_signal(signal.SIGINT)
        sent = time.monotonic()
        stopped, line = next_line(out, 10, "KeyboardInterrupt")
        assert line == "KeyboardInterrupt"
        assert stopped - sent < 3, stopped - sent
        _, line = next_line(out, 120, "the next call's result")
        assert line.startswith("after ") and float(line.split()[1]) < 1e-5, line
        assert child.wait(timeout=60) == 0
    finally:
        child.kill()
        child.wait()


def test_jupyter_interrupt_stops_a_long_cpu_call():
    """The interrupt button of a Jupyter kernel sends it SIGINT: the cell ends with
    KeyboardInterrupt, and the kernel goes on."""
    manager_module = pytest.importorskip("jupyter_client.manager", reason="jupyter is not installed")
    manager, client = manager_module.start_new_kernel(kernel_name="python3")
    try:
        def execute(code, timeout):
            """The cell's reply and what it printed or raised."""
            message_id = client.execute(code)
            outputs = []
            deadline = time.monotonic() + timeout
            while True:
                message = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
                if message["parent_header"].get("msg_id") != message_id:
                    continue
                kind, content = message["msg_type"], message["content"]
                if kind == "stream":
                    outputs.append(content["text"])
                elif kind == "error":
                    outputs.append(content["ename"])
                elif kind == "status" and content["execution_state"] == "idle":
                    return "".join(outputs)

        setup = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport torch, minimal_flash as mf\n"
                 "q = torch.randn(1, 1, 64, 64); mf.flash_attention(q, q, q); print('ready')")
        assert "ready" in execute(setup, 600)
        # stop_on_error=False: the kernel would otherwise drop the cells sent soon after this one fails.
        message_id = client.execute("big = torch.randn(1, 8, 16384, 64); mf.flash_attention(big, big, big)",
                                    stop_on_error=False)
        time.sleep(3)
        manager.interrupt_kernel()
        sent = time.monotonic()
        while True:
            message = client.get_iopub_msg(timeout=10)
            if message["parent_header"].get("msg_id") == message_id and message["msg_type"] == "error":
                break
        assert message["content"]["ename"] == "KeyboardInterrupt"
        assert time.monotonic() - sent < 3
        check = ("q, k, v = (torch.randn(1, 2, 100, 64) for _ in range(3))\n"
                 "print((mf.flash_attention(q, k, v) - mf.manual_attention(q, k, v)).abs().max().item())")
        printed = execute(check, 120)
        assert float(printed.split()[-1]) < 1e-5, printed
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def test_interrupted_launch_raises_keyboard_interrupt():
    """What bindings.cu returns for a launch that Ctrl-C stopped becomes KeyboardInterrupt, even
    where Python's own handler did not raise it (another SIGINT handler was installed)."""
    with pytest.raises(KeyboardInterrupt, match="flash2_forward failed: interrupted"):
        mf._raise_if("flash2_forward failed: interrupted")

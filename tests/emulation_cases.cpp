// Small kernels that check the CPU emulation itself (kernels/cpu_cuda.h), one behaviour each;
// tests/test_emulation.py builds this file and calls run_case. Lines marked "// line: NAME" are
// the ones the tests expect in messages: they find them by the marker, so edits may move them.
#include <cassert>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <string>

#include "cpu_cuda.h"
#include "hopper.cuh"

// ---- Barriers that can never complete

__global__ void barrier_in_branch(float*) {
    if (threadIdx.x < 64) __syncthreads();  // line: barrier_in_branch
}

__global__ void two_barriers(float*) {
    if (threadIdx.x < 32)
        __syncthreads();  // line: two_barriers_first
    else
        __syncthreads();  // line: two_barriers_second
}

__global__ void shuffle_after_exit(float* out) {
    if (threadIdx.x % 32 >= 16) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // line: shuffle_after_exit
}

__global__ void shuffle_or_barrier(float* out) {
    if (threadIdx.x < 16) out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);  // line: shuffle_or_barrier_shuffle
    else __syncthreads();  // line: shuffle_or_barrier_barrier
}

// ---- Barriers that block, shared memory

// Thread t reads the word thread t + step wrote: right only if the barrier makes every thread wait
// until all have written (without it, a thread runs ahead and may read the NaN poison).
__global__ void neighbour(float* out, bool barrier, int step) {
    extern __shared__ __align__(16) float smem[];
    const unsigned t = threadIdx.x, n = blockDim.x;
    smem[t] = float(t);
    if (barrier) __syncthreads();
    out[blockIdx.x * n + t] = smem[(t + n + step) % n];
}

// Each block fills its shared memory with its number, then checks, between barriers (where the
// worker switches threads and other blocks run on other cores), that it still holds that number.
// out[block]: words found changed; out[blocks + block]: words that were not NaN before the fill.
__global__ void own_shared_memory(float* out, int words) {
    extern __shared__ __align__(16) float smem[];
    float changed = 0, not_poisoned = 0;
    for (int i = threadIdx.x; i < words; i += blockDim.x) not_poisoned += !std::isnan(smem[i]);
    __syncthreads();
    for (int i = threadIdx.x; i < words; i += blockDim.x) smem[i] = float(blockIdx.x);
    for (int round = 0; round < 20; ++round) {
        __syncthreads();
        for (int i = threadIdx.x; i < words; i += blockDim.x) changed += smem[i] != float(blockIdx.x);
    }
    atomicAdd(&out[blockIdx.x], changed);
    atomicAdd(&out[gridDim.x + blockIdx.x], not_poisoned);
}

// Each thread reads a word of the other warp, then overwrites its own word with no barrier in
// between: right only if every warp has read before any overwrites. A warp goes on as far as it can
// (past the shuffle, where it waits for its own lanes only) before the other warp starts, so here
// the second warp reads what the first has overwritten. out[t]: what thread t read.
__global__ void read_then_overwrite(float* out, bool barrier) {
    extern __shared__ __align__(16) float smem[];
    const unsigned t = threadIdx.x, n = blockDim.x;
    smem[t] = float(t);
    __syncthreads();
    float x = smem[(t + 32) % n];
    x = __shfl_xor_sync(0xffffffffu, x, 1);
    x = __shfl_xor_sync(0xffffffffu, x, 1);  // back to this lane's own value
    if (barrier) __syncthreads();
    smem[t] = -1.0f;
    out[blockIdx.x * n + t] = x;
}

// ---- Indices, atomics

// Each thread writes what it sees of threadIdx, blockIdx, blockDim and gridDim, after a barrier and
// a shuffle (where the worker has switched to other threads and back): 12 values at its place.
__global__ void indices(float* out) {
    __syncthreads();
    const float lane_sum = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
    const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    const unsigned thread = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    float* at = out + 12 * (block * blockDim.x * blockDim.y * blockDim.z + thread);
    const unsigned values[12] = {threadIdx.x, threadIdx.y, threadIdx.z, blockIdx.x, blockIdx.y, blockIdx.z,
                                 blockDim.x,  blockDim.y,  blockDim.z,  gridDim.x,  gridDim.y,  gridDim.z};
    for (int i = 0; i < 12; ++i) at[i] = float(values[i]) * (lane_sum == 1.0f ? 1.0f : -1.0f);
}

// Every thread of every block adds 1 to out[0] `adds` times, and to out[1 + its lane] once.
__global__ void count(float* out, int adds) {
    for (int i = 0; i < adds; ++i) {
        atomicAdd(out, 1.0f);
        if (i % 8 == 0) __syncthreads();  // other threads of the block interleave here
    }
    atomicAdd(out + 1 + threadIdx.x % 32, 1.0f);
}
// Every thread of every block takes `takes` tickets from the int counter *taken (atomicAdd's old
// value, as a persistent kernel takes its work tiles) and adds 1 to out[ticket] for each.
__global__ void tickets(int* taken, float* out, int takes) {
    for (int i = 0; i < takes; ++i) {
        atomicAdd(out + atomicAdd(taken, 1), 1.0f);
        if (i % 4 == 0) __syncthreads();
    }
}

// ---- cp.async

// Thread t writes 4 floats of shared memory, copies 4 others from `from` over them and reads them
// before the wait (NaN: neither the old values nor the new) and after (the copy), into out[8t ..].
__global__ void copy_then_wait(const float* from, float* out) {
    extern __shared__ __align__(16) float smem[];
    const unsigned t = threadIdx.x;
    for (int i = 0; i < 4; ++i) smem[4 * t + i] = -1.0f;
    cp_async16(smem + 4 * t, from + 4 * t, true);
    cp_async_commit();
    for (int i = 0; i < 4; ++i) out[8 * t + i] = smem[4 * t + i];
    cp_async_wait<0>();
    for (int i = 0; i < 4; ++i) out[8 * t + 4 + i] = smem[4 * t + i];
}

__global__ void copy_misaligned(const float* from, float*) {
    extern __shared__ __align__(16) float smem[];
    cp_async16(smem + 1, from, true);  // line: copy_misaligned
    cp_async_commit();
    cp_async_wait<0>();
}

__global__ void copy_never_waited(const float* from, float*) {
    extern __shared__ __align__(16) float smem[];
    cp_async16(smem + 4 * threadIdx.x, from, true);
    cp_async_commit();
}

// ---- Hopper (kernels/hopper.cuh): mbarrier, TMA, named barriers, wgmma, setmaxnreg

// A tensor map of fp32 rows of 32 values (128 bytes): (1, rows, 32), boxes of 8 rows.
CUtensorMap rows_map(const float* from, int rows, CUtensorMapSwizzle swizzle) {
    CUtensorMap map;
    const cuuint64_t dims[3] = {32, cuuint64_t(rows), 1}, strides[2] = {128, 128 * cuuint64_t(rows)};
    const cuuint32_t box[3] = {32, 8, 1}, ones[3] = {1, 1, 1};
    cuTensorMapEncodeTiled(&map, CU_TENSOR_MAP_DATA_TYPE_FLOAT32, 3, const_cast<float*>(from), dims, strides, box,
                           ones, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                           CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return map;
}

// A ring of 2 buffers: thread 0 loads `tiles` boxes of 8 rows by TMA, warp 1 sums each box's columns
// into out[32 i + lane] and gives the buffer back. Rows past the tensor's end land as zeros.
__global__ void mbarrier_ring(const __grid_constant__ CUtensorMap map, float* out, int tiles) {
    extern __shared__ __align__(16) float smem[];
    float* buffers = smem;  // 2 x 8 x 32 floats
    uint64_t *full = reinterpret_cast<uint64_t*>(smem + 2 * 256), *empty = full + 2;
    if (threadIdx.x == 0) {
        for (int s = 0; s < 2; ++s) mbarrier_init(&full[s], 1), mbarrier_init(&empty[s], 32);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int i = 0; i < tiles; ++i) {
            const int s = i % 2;
            mbarrier_wait(&empty[s], (i / 2 + 1) % 2);  // the first wait on each passes at once
            mbarrier_arrive_expect_tx(&full[s], 8 * 32 * 4);
            tma_load(buffers + 256 * s, &map, 0, 8 * i, 0, &full[s]);
        }
    } else if (threadIdx.x >= 32) {
        const int lane = threadIdx.x - 32;
        for (int i = 0; i < tiles; ++i) {
            const int s = i % 2;
            mbarrier_wait(&full[s], i / 2 % 2);
            float sum = 0;
            for (int r = 0; r < 8; ++r) sum += buffers[256 * s + 32 * r + lane];
            out[32 * i + lane] = sum;
            mbarrier_arrive(&empty[s]);
        }
    }
}

// Warp 1 waits for a phase that nobody completes: warp 0 exits.
__global__ void mbarrier_never_completes(float*) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x == 0) mbarrier_init(bar, 1);
    __syncthreads();
    if (threadIdx.x >= 32) mbarrier_wait(bar, 0);  // line: mbarrier_never_completes
}

__global__ void mbarrier_uninitialized(float*) {
    extern __shared__ __align__(16) float smem[];
    mbarrier_wait(reinterpret_cast<uint64_t*>(smem), 0);  // line: mbarrier_uninitialized
}

// Thread 0 loads one box of 8 rows, 128-byte swizzle, into shared memory at 1024 and writes out what
// is there before the wait (out[0 .. 255]) and after (out[256 .. 511]).
__global__ void tma_then_wait(const __grid_constant__ CUtensorMap map, float* out) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    float* tile = smem + 256;
    if (threadIdx.x != 0) return;
    mbarrier_init(bar, 1);
    mbarrier_arrive_expect_tx(bar, 8 * 32 * 4);
    tma_load(tile, &map, 0, 0, 0, bar);
    for (int i = 0; i < 256; ++i) out[i] = tile[i];
    mbarrier_wait(bar, 0);
    for (int i = 0; i < 256; ++i) out[256 + i] = tile[i];
}

// A box into shared memory at float `at` (misaligned: at 32, with the 128-byte swizzle), waited for
// or never.
__global__ void tma_load_at(const __grid_constant__ CUtensorMap map, float*, int at, bool wait) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x != 0) return;
    mbarrier_init(bar, 1);
    mbarrier_arrive_expect_tx(bar, 8 * 32 * 4);
    tma_load(smem + at, &map, 0, 0, 0, bar);  // line: tma_misaligned
    if (wait) mbarrier_wait(bar, 0);
}

// Warp 0 writes, arrives at named barrier 1 and goes on; warps 1-3 sync there and read. With
// `arrivals` 64, only threads 0-63 come: the barrier of 128 never completes.
__global__ void named_barriers(float* out, int arrivals) {
    extern __shared__ __align__(16) float smem[];
    const unsigned t = threadIdx.x;
    if (arrivals < 128) {
        if (t < unsigned(arrivals)) named_barrier_sync(1, 128);  // line: named_barrier_never_completes
        return;
    }
    if (t < 32) {
        smem[t] = float(t) + 1;
        named_barrier_arrive(1, 128);
    } else {
        named_barrier_sync(1, 128);
        out[t] = smem[t % 32];
    }
}

// A warpgroup multiplies ones: A (64 x 16) and B (16 x 64), bf16, K-major with the 128-byte swizzle,
// twice onto the same accumulators. out[2t]: thread t's d[0][0] before the wait (NaN), out[2t + 1]:
// after (32).
__global__ void wgmma_ones(float* out, bool wait) {
    extern __shared__ __align__(16) float smem[];
    for (int i = threadIdx.x; i < 4096; i += 128) smem[i] = bits_float(0x3f803f80u);  // bf16 ones
    fence_proxy_async();
    __syncthreads();
    const uint64_t a = smem_descriptor(0, 0, 1024), b = smem_descriptor(8192, 0, 1024);
    float d[8][4];
    wgmma_fence();
    wgmma_ss<__nv_bfloat16, 64>(d, a, b, false);
    wgmma_ss<__nv_bfloat16, 64>(d, a, b, true);
    wgmma_commit();
    out[2 * threadIdx.x] = d[0][0];
    if (!wait) return;
    wgmma_wait<0>();
    out[2 * threadIdx.x + 1] = d[0][0];
}

// The byte of element (row, col) of a tile of rows of 64 16-bit values with the 128-byte swizzle (the
// 16-byte chunk c of row r at chunk c ^ (r % 8)), wider tiles as 64-column tiles `block` bytes apart.
__device__ unsigned swizzled_at(unsigned row, unsigned col, unsigned block) {
    const unsigned at = col / 64 * block + row * 128 + col % 64 * 2;
    return at ^ (at >> 3 & 0x70);
}

// D (64 x N) = A (64 x 64) B (64 x N) by 4 wgmma_ss of k16, A and B given row-major in `in` (A, then
// B) and stored in shared memory K-major or MN-major as TRANS_A and TRANS_B say:
//   A K-major at byte 0: rows of 64 k (m, k); step s 32 bytes further. SBO 1024 (8 rows of m).
//   A M-major at byte 0: rows of 64 m (k, m); step s 2048 bytes (16 rows of k) further. SBO 1024
//     (8 rows of k); LBO 8192, from m 0-63 to 64-127, of which the wgmma's 64 rows use none.
//   B K-major at byte 16384: rows of 64 k (n, k), N rows; step s 32 bytes further. SBO 1024.
//   B N-major at byte 16384: rows of 64 n (k, n), columns 64-127 8192 bytes further (LBO); step s
//     2048 bytes further. SBO 1024.
// Out: D, row-major, from the accumulators in the layout of kernels/hopper.cuh.
template <int N, bool TRANS_A, bool TRANS_B>
__global__ void wgmma_transposed(const float* in, float* out) {
    extern __shared__ __align__(16) float smem[];
    unsigned short* tiles = reinterpret_cast<unsigned short*>(smem);
    const float *A = in, *B = in + 64 * 64;
    for (int i = threadIdx.x; i < 64 * 64; i += 128) {  // A[m][k]
        const unsigned m = i / 64, k = i % 64;
        tiles[(TRANS_A ? swizzled_at(k, m, 8192) : swizzled_at(m, k, 8192)) / 2] =
            __bfloat16_as_ushort(__float2bfloat16(A[i]));
    }
    for (int i = threadIdx.x; i < 64 * N; i += 128) {  // B[k][n]
        const unsigned k = i / N, n = i % N;
        tiles[(16384 + (TRANS_B ? swizzled_at(k, n, 8192) : swizzled_at(n, k, 8192))) / 2] =
            __bfloat16_as_ushort(__float2bfloat16(B[i]));
    }
    fence_proxy_async();
    __syncthreads();
    float d[N / 8][4];
    wgmma_fence();
    for (int s = 0; s < 4; ++s)
        wgmma_ss<__nv_bfloat16, N, TRANS_A, TRANS_B>(
            d, smem_descriptor((TRANS_A ? 2048 : 32) * s, 8192, 1024),
            smem_descriptor(16384 + (TRANS_B ? 2048 : 32) * s, 8192, 1024), s > 0);
    wgmma_commit();
    wgmma_wait<0>();
    const int t = threadIdx.x, w = t / 32, g = t % 32 / 4, q = t % 4;
    for (int n = 0; n < N / 8; ++n)
        for (int j = 0; j < 4; ++j) out[(16 * w + g + 8 * (j / 2)) * N + 8 * n + 2 * q + j % 2] = d[n][j];
}

template <int N>
void launch_transposed(bool ta, bool tb, const float* in, float* out) {
    auto kernel = ta ? (tb ? wgmma_transposed<N, true, true> : wgmma_transposed<N, true, false>)
                     : (tb ? wgmma_transposed<N, false, true> : wgmma_transposed<N, false, false>);
    LAUNCH(kernel, dim3(1), dim3(128), 32768, 0)(in, out);
}

// Each block adds, by the copy engine, its 256 + 256 floats into out[0 .. 512): block b's first
// buffer holds i % 7 + b (as one request, the first group), its second b + 1 (as two requests of 128,
// the second group). Thread 0 issues them, waits until the first group has read its buffer and
// overwrites it; with `early`, it overwrites the second buffer too before the second group is waited
// for (on a GPU either value may be added; here the new one, -1000, is).
__global__ void bulk_reduce(float* out, bool early) {
    extern __shared__ __align__(16) float smem[];
    float *first = smem, *second = smem + 256;
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        first[i] = float(i % 7 + blockIdx.x), second[i] = float(blockIdx.x + 1);
    fence_proxy_async();  // written by threads, read by the copy engine
    __syncthreads();
    if (threadIdx.x != 0) return;
    bulk_reduce_add(out, first, 256 * 4);
    bulk_commit();
    bulk_reduce_add(out + 256, second, 128 * 4);
    bulk_reduce_add(out + 384, second + 128, 128 * 4);
    bulk_commit();
    bulk_wait_read<1>();
    for (int i = 0; i < 256; ++i) first[i] = -1000.0f;
    if (early)
        for (int i = 0; i < 256; ++i) second[i] = -1000.0f;
    bulk_wait_read<0>();
    for (int i = 0; i < 256; ++i) second[i] = -1000.0f;
}

// The bulk reduces the hardware refuses (or, never waited for, the emulation does): `what` 0, an
// unaligned destination; 1, 24 bytes; 2, a source in global memory; 3, never waited for; 4, never
// committed.
__global__ void bulk_refused(float* out, const float* in, int what) {
    extern __shared__ __align__(16) float smem[];
    for (int i = 0; i < 64; ++i) smem[i] = 1.0f;
    fence_proxy_async();
    if (what == 0) bulk_reduce_add(out + 1, smem, 64);  // line: bulk_misaligned
    if (what == 1) bulk_reduce_add(out, smem, 24);      // line: bulk_size
    if (what == 2) bulk_reduce_add(out, in, 64);        // line: bulk_not_shared
    if (what >= 3) bulk_reduce_add(out, smem, 64);
    if (what != 4) bulk_commit();
    if (what < 3) bulk_wait_read<0>();
}

template <int R>
__global__ void setmaxnreg_case(float*) {
    if (threadIdx.x < 128)
        setmaxnreg_dec<R>();  // line: setmaxnreg
    else
        setmaxnreg_inc<240>();
}
// Version 4's split of a multiprocessor's registers: 384 threads of 168 each; the producer warpgroup
// gives back down to R, the two consumers take up to 240 (after it has, or before: then they wait).
template <int R>
__global__ void setmaxnreg_pool(float*) {
    if (threadIdx.x < 128)
        setmaxnreg_dec<R>();
    else
        setmaxnreg_inc<240>();  // line: setmaxnreg_pool
}

// ---- What the emulation refuses

__global__ void shuffle_in_part_of_a_warp(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

// ---- Warp collectives read at the collective point; mistakes a GPU reports

// Each lane loads 4 tiles of ones by ldmatrix, then zeroes the row it gave: the instruction read all
// rows at once, so every lane gets 8 ones.
__global__ void ldmatrix_then_overwrite(float* out) {
    extern __shared__ __align__(16) float smem[];
    unsigned short* tile = reinterpret_cast<unsigned short*>(smem);  // 32 rows of 8 values
    const unsigned lane = threadIdx.x;
    for (int j = 0; j < 8; ++j) tile[lane * 8 + j] = __bfloat16_as_ushort(__float2bfloat16(1.0f));
    __syncthreads();
    unsigned r[4];
    ldmatrix_x4(r, tile + lane * 8);
    for (int j = 0; j < 8; ++j) tile[lane * 8 + j] = 0;
    float sum = 0;
    for (int i = 0; i < 4; ++i)
        sum += __bfloat162float(__ushort_as_bfloat16(r[i] & 0xffff)) +
               __bfloat162float(__ushort_as_bfloat16(r[i] >> 16));
    out[lane] = sum;
}

// Rows of 18 bytes: lane 1's is not 16-byte aligned.
__global__ void ldmatrix_misaligned(float* out) {
    extern __shared__ __align__(16) float smem[];
    unsigned short* tile = reinterpret_cast<unsigned short*>(smem);
    for (int j = 0; j < 9; ++j) tile[threadIdx.x * 9 + j] = 0;
    __syncthreads();
    unsigned r[4];
    ldmatrix_x4(r, tile + threadIdx.x * 9);  // line: ldmatrix_misaligned
    out[threadIdx.x] = float(r[0]);
}

// A float4 read at an address 4 bytes past a multiple of 16 (`store`: a float2 written at one 4 past 8).
__global__ void vector_misaligned(const float* in, float* out, bool store) {
    if (store) {
        *reinterpret_cast<float2*>(out + 1) = float2{1.0f, 2.0f};
        return;
    }
    const float4 v = *reinterpret_cast<const float4*>(in + 1);  // line: vector_misaligned
    out[threadIdx.x] = v.x + v.y + v.z + v.w;
}

__global__ void throws(float*) {
    if (threadIdx.x == 5) throw std::runtime_error("a reader's exception");
}

__global__ void asserts(float* out) {
    assert(threadIdx.x != 5);  // line: asserts
    out[threadIdx.x] = 1;
}

// ---- Polls that can never succeed

// Only warp 0 arrives at a barrier of 64 arrivals; both warps poll its phase 0 in a loop.
__global__ void try_wait_forever(float*) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x == 0) mbarrier_init(bar, 64);
    __syncthreads();
    if (threadIdx.x < 32) mbarrier_arrive(bar);
    while (!mbarrier_try_wait(bar, 0)) {  // line: try_wait_forever
    }
}

// Warp 0 arrives only after a __syncthreads that warp 1, polling for that arrival, never reaches.
__global__ void sync_vs_polling(float*) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x == 0) mbarrier_init(bar, 32);
    __syncthreads();
    if (threadIdx.x < 32) {
        __syncthreads();  // line: sync_vs_polling_barrier
        mbarrier_arrive(bar);
    } else {
        while (!mbarrier_try_wait(bar, 0)) {  // line: sync_vs_polling_poll
        }
        __syncthreads();
    }
}

// ---- Shared memory's bounds

__global__ void shared_write(float*, int index, float value) {
    extern __shared__ __align__(16) float smem[];
    if (threadIdx.x == 0) smem[index] = value;
}
__global__ void shared_read(float* out, int index) {
    extern __shared__ __align__(16) float smem[];
    if (threadIdx.x == 0) out[0] = smem[index];
}
__global__ void shared_read_each(float* out, int index) {  // each block its own out
    extern __shared__ __align__(16) float smem[];
    if (threadIdx.x == 0) out[blockIdx.x] = smem[index];
}

// A cp.async to byte 4096 of 256 bytes of shared memory (`global`: to global memory).
__global__ void copy_outside_shared(const float* from, float* out, bool global) {
    extern __shared__ __align__(16) float smem[];
    if (threadIdx.x != 0) return;
    cp_async16(global ? out + 4 : smem + 1024, from, true);  // line: copy_outside_shared
    cp_async_commit();
    cp_async_wait<0>();
}

// ---- What only ends the process (run in a child process by the tests)

// Thread 0 spins on a flag that thread 32 would set: the emulation never runs thread 32.
__global__ void spin_on_shared_flag(float* out) {
    extern __shared__ __align__(16) float smem[];
    volatile int* flag = reinterpret_cast<volatile int*>(smem);
    if (threadIdx.x == 0) *flag = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
        while (*flag == 0) {
        }
        out[0] = 1;
    } else if (threadIdx.x == 32) {
        *flag = 1;
    }
}

__global__ void big_local_array(float* out, int n) {
    float local[64 * 1024];  // 256 KB: more than a fiber's stack
    for (int i = 0; i < 64 * 1024; ++i) local[i] = float(i % (n + 1));
    out[threadIdx.x] = local[(threadIdx.x * 977) % (64 * 1024)];
}

__global__ void global_out_of_bounds(float* out) {
    if (threadIdx.x == 0) out[1ll << 40] = 1.0f;
}

__global__ void nothing(float*) {}

// A long launch: `rounds` barriers per thread, in blocks of 128 threads.
__global__ void barriers(float* out, int rounds) {
    for (int i = 0; i < rounds; ++i) __syncthreads();
    if (threadIdx.x == 0) atomicAdd(out, 1.0f);
}

// ---- Cases of the emulation's semantics an audit found untested: shuffled lane values, cp.async wait<1>, a
// bulk load, an arrive that must not wait, colliding bulk reductions, setmaxnreg per warpgroup
__global__ void shuffle_lanes(float* out) {  // out[32 m + lane]: lane's shuffle with lane mask 1 << m
    const unsigned lane = threadIdx.x % 32;
    for (int m = 0; m < 5; ++m) {
        const float got = __shfl_xor_sync(0xffffffffu, float(lane), 1 << m);
        if (threadIdx.x < 32) out[32 * m + lane] = got;
    }
}
__global__ void copy_wait_one(const float* from, float* out) {  // two groups; wait<1>, then wait<0>
    extern __shared__ __align__(16) float smem[];
    const unsigned t = threadIdx.x;
    cp_async16(smem + 4 * t, from + 4 * t, true);
    cp_async_commit();
    cp_async16(smem + 128 + 4 * t, from + 128 + 4 * t, true);
    cp_async_commit();
    cp_async_wait<1>();
    for (int i = 0; i < 4; ++i) out[8 * t + i] = smem[4 * t + i], out[8 * t + 4 + i] = smem[128 + 4 * t + i];
    cp_async_wait<0>();
}
// cp.async with valid false (the kernels' tiles past the sequence's end): zeros land, whatever the
// source holds. Odd threads copy invalid, 16 bytes and then 4; out[8t ..]: the 16 bytes, then the 4.
__global__ void copy_invalid_zero_fills(const float* from, float* out) {
    extern __shared__ __align__(16) float smem[];
    const unsigned t = threadIdx.x;
    const bool valid = t % 2 == 0;
    cp_async16(smem + 8 * t, from + 8 * t, valid);
    for (int i = 0; i < 4; ++i) cp_async4(smem + 8 * t + 4 + i, from + 8 * t + 4 + i, valid);
    cp_async_commit();
    cp_async_wait<0>();
    for (int i = 0; i < 8; ++i) out[8 * t + i] = smem[8 * t + i];
}
// Thread 0 announces more bytes (expect_tx) than its bulk copy brings: the phase can never complete.
__global__ void mbarrier_bytes_never_come(const float* from, float* out) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    if (threadIdx.x != 0) return;
    mbarrier_init(bar, 1);
    mbarrier_arrive_expect_tx(bar, 256 * 4 + 16);
    bulk_load(smem + 4, from, 256 * 4, bar);
    mbarrier_wait(bar, 0);  // line: mbarrier_bytes_never_come
    out[0] = smem[4];
}
__global__ void bulk_load_then_wait(const float* from, float* out) {
    extern __shared__ __align__(16) float smem[];
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    float* rows = smem + 4;
    if (threadIdx.x != 0) return;
    mbarrier_init(bar, 1);
    mbarrier_arrive_expect_tx(bar, 256 * 4);
    bulk_load(rows, from, 256 * 4, bar);
    for (int i = 0; i < 256; ++i) out[i] = rows[i];
    mbarrier_wait(bar, 0);
    for (int i = 0; i < 256; ++i) out[256 + i] = rows[i];
}
// Warp 0 arrives at barrier 1 and then at barrier 2; warps 1-3 sync at 2, then at 1. Completes only
// if the arrive does not wait.
__global__ void arrive_then_other(float* out) {
    if (threadIdx.x < 32) {
        named_barrier_arrive(1, 128);
        named_barrier_arrive(2, 128);
    } else {
        named_barrier_sync(2, 128);
        named_barrier_sync(1, 128);
        out[threadIdx.x] = 1;
    }
}
__global__ void bulk_reduce_rounds(float* out, int rounds) {
    extern __shared__ __align__(16) float smem[];
    for (int i = threadIdx.x; i < 512; i += blockDim.x) smem[i] = 1.0f;
    __syncthreads();
    if (threadIdx.x != 0) return;
    for (int r = 0; r < rounds; ++r) {
        bulk_reduce_add(out, smem, 512 * 4);
        bulk_commit();
        bulk_wait_read<0>();
    }
}
// Threads 0-63 of warpgroup 0 and 128-191 of warpgroup 1 reach setmaxnreg, the others exit: neither
// warpgroup can complete it.
__global__ void setmaxnreg_half(float*) {
    if (threadIdx.x % 128 < 64) setmaxnreg_dec<40>();
}

extern "C" {

// Runs one case by name with `n` as its size parameter; returns "" or the launch's error message.
const char* run_case(const char* name, float* out, const float* in, int n) {
    static thread_local std::string message;  // tests launch from several threads
    const std::string c = name;
    if (c == "barrier_in_branch") LAUNCH(barrier_in_branch, dim3(n), dim3(128), 0, 0)(out);
    else if (c == "two_barriers") LAUNCH(two_barriers, dim3(1), dim3(128), 0, 0)(out);
    else if (c == "shuffle_after_exit") LAUNCH(shuffle_after_exit, dim3(1), dim3(64), 0, 0)(out);
    else if (c == "shuffle_or_barrier") LAUNCH(shuffle_or_barrier, dim3(1), dim3(32), 0, 0)(out);
    else if (c == "neighbour") LAUNCH(neighbour, dim3(n), dim3(64), 64 * sizeof(float), 0)(out, true, 1);
    else if (c == "next_without_barrier") LAUNCH(neighbour, dim3(n), dim3(64), 64 * sizeof(float), 0)(out, false, 1);
    else if (c == "previous_without_barrier") LAUNCH(neighbour, dim3(n), dim3(64), 64 * sizeof(float), 0)(out, false, -1);
    else if (c == "read_then_overwrite") LAUNCH(read_then_overwrite, dim3(n), dim3(64), 64 * sizeof(float), 0)(out, true);
    else if (c == "read_then_overwrite_without_barrier")
        LAUNCH(read_then_overwrite, dim3(n), dim3(64), 64 * sizeof(float), 0)(out, false);
    else if (c == "own_shared_memory") LAUNCH(own_shared_memory, dim3(n), dim3(64), 4096 * sizeof(float), 0)(out, 4096);
    else if (c == "indices") LAUNCH(indices, dim3(3, 2, 2), dim3(4, 4, 2), 0, 0)(out);
    else if (c == "count") LAUNCH(count, dim3(64), dim3(128), 0, 0)(out, n);
    else if (c == "tickets")  // the counter: in's first 4 bytes, as an int
        LAUNCH(tickets, dim3(64), dim3(128), 0, 0)(reinterpret_cast<int*>(const_cast<float*>(in)), out, n);
    else if (c == "copy_then_wait") LAUNCH(copy_then_wait, dim3(1), dim3(32), 32 * 4 * sizeof(float), 0)(in, out);
    else if (c == "copy_misaligned") LAUNCH(copy_misaligned, dim3(1), dim3(32), 1024, 0)(in, out);
    else if (c == "copy_never_waited") LAUNCH(copy_never_waited, dim3(1), dim3(32), 1024, 0)(in, out);
    else if (c == "mbarrier_ring") {
        const int tiles = n, rows = 8 * tiles - 3;  // the last box: 5 rows of the tensor, 3 of zeros
        LAUNCH(mbarrier_ring, dim3(1), dim3(64), 2 * 1024 + 64, 0)(rows_map(in, rows, CU_TENSOR_MAP_SWIZZLE_NONE), out, tiles);
    } else if (c == "mbarrier_never_completes") LAUNCH(mbarrier_never_completes, dim3(1), dim3(64), 64, 0)(out);
    else if (c == "mbarrier_uninitialized") LAUNCH(mbarrier_uninitialized, dim3(1), dim3(32), 64, 0)(out);
    else if (c == "tma_then_wait")
        LAUNCH(tma_then_wait, dim3(1), dim3(32), 2048, 0)(rows_map(in, 8, CU_TENSOR_MAP_SWIZZLE_128B), out);
    else if (c == "tma_misaligned")
        LAUNCH(tma_load_at, dim3(1), dim3(32), 4096, 0)(rows_map(in, 8, CU_TENSOR_MAP_SWIZZLE_128B), out, 32, true);
    else if (c == "tma_never_waited")
        LAUNCH(tma_load_at, dim3(1), dim3(32), 4096, 0)(rows_map(in, 8, CU_TENSOR_MAP_SWIZZLE_NONE), out, 256, false);
    else if (c == "named_barriers") LAUNCH(named_barriers, dim3(1), dim3(128), 128, 0)(out, n);
    else if (c == "wgmma_ones") LAUNCH(wgmma_ones, dim3(1), dim3(128), 16384, 0)(out, true);
    else if (c == "wgmma_never_waited") LAUNCH(wgmma_ones, dim3(1), dim3(128), 16384, 0)(out, false);
    else if (c.compare(0, 17, "wgmma_transposed_") == 0) {  // _kk, _mk, _km, _mm: A, B K- or MN-major
        const bool ta = c[17] == 'm', tb = c[18] == 'm';
        if (n == 64) launch_transposed<64>(ta, tb, in, out);
        else launch_transposed<128>(ta, tb, in, out);
    } else if (c == "bulk_reduce") LAUNCH(bulk_reduce, dim3(n), dim3(64), 2048, 0)(out, false);
    else if (c == "bulk_reduce_overwritten_early") LAUNCH(bulk_reduce, dim3(n), dim3(64), 2048, 0)(out, true);
    else if (c == "bulk_refused") LAUNCH(bulk_refused, dim3(1), dim3(32), 256, 0)(out, in, n);
    else if (c == "setmaxnreg_good") LAUNCH(setmaxnreg_case<40>, dim3(1), dim3(256), 0, 0)(out);
    else if (c == "setmaxnreg_bad") LAUNCH(setmaxnreg_case<20>, dim3(1), dim3(256), 0, 0)(out);
    else if (c == "setmaxnreg_pool") LAUNCH(setmaxnreg_pool<24>, dim3(1), dim3(384), 0, 0)(out);
    else if (c == "setmaxnreg_pool_short") LAUNCH(setmaxnreg_pool<32>, dim3(1), dim3(384), 0, 0)(out);
    else if (c == "shuffle_in_part_of_a_warp") LAUNCH(shuffle_in_part_of_a_warp, dim3(1), dim3(48), 0, 0)(out);
    else if (c == "ldmatrix_then_overwrite") LAUNCH(ldmatrix_then_overwrite, dim3(1), dim3(32), 1024, 0)(out);
    else if (c == "ldmatrix_misaligned") LAUNCH(ldmatrix_misaligned, dim3(1), dim3(32), 1024, 0)(out);
    else if (c == "vector_misaligned") LAUNCH(vector_misaligned, dim3(1), dim3(32), 0, 0)(in, out, n == 1);
    else if (c == "throws") LAUNCH(throws, dim3(1), dim3(32), 0, 0)(out);
    else if (c == "asserts") LAUNCH(asserts, dim3(1), dim3(32), 0, 0)(out);
    else if (c == "try_wait_forever") LAUNCH(try_wait_forever, dim3(1), dim3(64), 64, 0)(out);
    else if (c == "sync_vs_polling") LAUNCH(sync_vs_polling, dim3(1), dim3(64), 64, 0)(out);
    else if (c == "shared_stale") {  // word 1000 written by a block of 8 KB, read by one of 1 KB
        LAUNCH(shared_write, dim3(1), dim3(32), 8192, 0)(out, 1000, 42.0f);
        LAUNCH(shared_read, dim3(1), dim3(32), 1024, 0)(out, 1000);
    } else if (c == "shared_stale_across_launches") {  // blocks of 8 KB, then 1 KB, then 1 KB reading past it
        LAUNCH(shared_write, dim3(n), dim3(32), 8192, 0)(out, 1000, 42.0f);
        LAUNCH(shared_write, dim3(n), dim3(32), 1024, 0)(out, 100, 42.0f);
        LAUNCH(shared_read_each, dim3(n), dim3(32), 1024, 0)(out, 1000);
    } else if (c == "shared_write_past") {  // word n of a block of 1 KB: past it for n >= 256
        LAUNCH(shared_write, dim3(1), dim3(32), 1024, 0)(out, n, 42.0f);
        LAUNCH(shared_read, dim3(1), dim3(32), 2048, 0)(out, n);  // a launch after it: runs, poisoned again
    } else if (c == "copy_outside_shared") LAUNCH(copy_outside_shared, dim3(1), dim3(32), 256, 0)(in, out, n == 1);
    else if (c == "spin_on_shared_flag") LAUNCH(spin_on_shared_flag, dim3(1), dim3(64), 64, 0)(out);
    else if (c == "big_local_array") LAUNCH(big_local_array, dim3(1), dim3(1), 0, 0)(out, n);
    else if (c == "global_out_of_bounds") LAUNCH(global_out_of_bounds, dim3(1), dim3(32), 0, 0)(out);
    else if (c == "block_z_128") LAUNCH(nothing, dim3(1), dim3(1, 1, 128), 0, 0)(out);
    else if (c == "grid_y_70000") LAUNCH(nothing, dim3(1, 70000), dim3(32), 0, 0)(out);
    else if (c == "block_product_wraps") LAUNCH(nothing, dim3(1), dim3(641, 6700417, 1), 0, 0)(out);
    else if (c == "too_many_threads") LAUNCH(nothing, dim3(1), dim3(1025), 0, 0)(out);
    else if (c == "no_blocks") LAUNCH(nothing, dim3(0), dim3(32), 0, 0)(out);
    else if (c == "shared_without_opt_in") LAUNCH(nothing, dim3(1), dim3(32), 48 * 1024 + 16, 0)(out);
    else if (c == "shared_with_opt_in") {
        cudaFuncSetAttribute(barriers, cudaFuncAttributeMaxDynamicSharedMemorySize, 100 * 1024);
        LAUNCH(barriers, dim3(1), dim3(32), 100 * 1024, 0)(out, 1);
    } else if (c == "barriers") LAUNCH(barriers, dim3(64), dim3(128), 0, 0)(out, n);
    else if (c == "shuffle_lanes") LAUNCH(shuffle_lanes, dim3(1), dim3(64), 0, 0)(out);
    else if (c == "copy_wait_one") LAUNCH(copy_wait_one, dim3(1), dim3(32), 256 * sizeof(float), 0)(in, out);
    else if (c == "mbarrier_bytes_never_come")
        LAUNCH(mbarrier_bytes_never_come, dim3(1), dim3(32), 272 * sizeof(float), 0)(in, out);
    else if (c == "copy_invalid_zero_fills")
        LAUNCH(copy_invalid_zero_fills, dim3(1), dim3(32), 256 * sizeof(float), 0)(in, out);
    else if (c == "bulk_load_then_wait") LAUNCH(bulk_load_then_wait, dim3(1), dim3(32), 4096, 0)(in, out);
    else if (c == "arrive_then_other") LAUNCH(arrive_then_other, dim3(1), dim3(128), 0, 0)(out);
    else if (c == "bulk_reduce_rounds") LAUNCH(bulk_reduce_rounds, dim3(64), dim3(64), 2048, 0)(out, n);
    else if (c == "setmaxnreg_half") LAUNCH(setmaxnreg_half, dim3(1), dim3(256), 0, 0)(out);
    else return "no such case";
    const cudaError_t err = cudaGetLastError();
    message = err == cudaSuccess ? "" : cudaGetErrorString(err);
    return message.c_str();
}

// How many OS threads a launch may use (0: one per core).
void set_workers(int n) { cpu_cuda::cpu_set_workers(unsigned(n)); }
}

// What the kernels share: the block sizes, the padded strides of tiles in shared memory, the tile
// loader and the attention mask. Each kernels/*.cu file includes this header and no other kernel.
#pragma once

// Block sizes are compile-time constants so that a thread's row of S_ij can live in registers.
// minimal_flash.py passes -DBR=.. -DBC=.. to recompile with other sizes.
#ifndef BR
#define BR 32
#endif
#ifndef BC
#define BC 32
#endif
constexpr int Br = BR, Bc = BC;

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Row strides, in floats, of tiles stored transposed in shared memory: a row holds Bc keys (LD) or
// Br queries (LR). Rounded up to a multiple of 4, so that a thread reads 4 of them as one 16-byte
// load; plus 4, so that the store that transposes a tile is 4-way bank-conflicted, not 32-way.
constexpr int LD = ceil_div(Bc, 4) * 4 + 4;
constexpr int LR = ceil_div(Br, 4) * 4 + 4;

// Version 2 (flash2*.cu): output columns a thread accumulates in registers per pass. A row with
// d > DC columns takes ceil(d / DC) passes, so that registers stay bounded (no spills).
constexpr int DC = 64;
__host__ __device__ inline int flash2_V_stride(int d) { return ceil_div(d, DC) * DC; }

// May query `row` attend to key `col`? Not to a key past the end of the sequence (the padding of a
// partial last tile), and, when causal, not to a later key.
__device__ inline bool visible(int row, int col, int N, bool causal) {
    return col < N && !(causal && col > row);
}

// Four consecutive floats at a 16-byte-aligned address, read as one 16-byte load: a quarter of the
// load instructions of four single reads.
__device__ inline void load4(float* to, const float* from) {
    const float4 v = *reinterpret_cast<const float4*>(from);
    to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
}

// *to += (a, b, c, e), four consecutive floats at a 16-byte-aligned address, by other threads and
// blocks at the same time: one vector atomic on sm_90 and later (Hopper), a quarter of the atomic
// instructions of four single ones; elsewhere, and in the CPU emulation, four single ones.
// atomic_add2 likewise for two floats at an 8-byte-aligned address.
__device__ inline void atomic_add4(float* to, float a, float b, float c, float e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(to), float4{a, b, c, e});
#else
    atomicAdd(to, a), atomicAdd(to + 1, b), atomicAdd(to + 2, c), atomicAdd(to + 3, e);
#endif
}
__device__ inline void atomic_add2(float* to, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(to), float2{a, b});
#else
    atomicAdd(to, a), atomicAdd(to + 1, b);
#endif
}

// Copies rows [row0, row0 + ROWS) of an N x d matrix into shared memory, element (r, x) going to
// tile[r * rs + x * xs], using threads lane = 0 .. lanes-1. Consecutive lanes take consecutive x,
// so the global reads coalesce. A thread issues all its loads before it stores any: one at a time,
// their latencies (hundreds of cycles each) would add up and dominate the kernel. Rows at or past
// `valid` are zero-filled, so a partial tile never reads past the end of the slice.
template <int ROWS>
__device__ void load_tile(float* tile, int rs, int xs, const float* src, int row0, int valid, int d,
                          int lane, int lanes) {
    for (int x = lane; x < d; x += lanes) {
        float v[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) v[r] = row0 + r < valid ? src[(size_t)(row0 + r) * d + x] : 0.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) tile[r * rs + x * xs] = v[r];
    }
}

// Chapter 3's tiles hold 16-bit values (bf16 or fp16, moved as raw bits). A row of a shared tile
// holds d values and 8 more: the 8 rows that one ldmatrix reads then start 16 bytes apart in the
// banks, not all in the same ones.
__host__ __device__ constexpr int stride16(int d) { return d + 8; }

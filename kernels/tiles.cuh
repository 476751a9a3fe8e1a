// What chapter 1's kernels share (flash.cu, flash_backward.cu), and later chapters reuse: the block
// sizes, the padded strides of tiles in shared memory, the tile loader and the attention mask.
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

// The block's shared memory, as many bytes as the launch asks for. Declared here, at file scope, for
// the kernels that live in a namespace (chapters 2 and 3): inside a namespace the same declaration
// would name another array. Chapter 1's kernels declare it where they use it: the same array.
extern __shared__ __align__(16) float smem[];

__host__ __device__ constexpr int ceil_div(int a, int b) { return (a + b - 1) / b; }

// Row strides, in floats, of tiles stored transposed in shared memory: a row holds Bc keys (LD) or
// Br queries (LR). Rounded up to a multiple of 4, so that a thread reads 4 of them as one 16-byte
// load; plus 4, so that the store that transposes a tile is 4-way bank-conflicted, not 32-way.
constexpr int LD = ceil_div(Bc, 4) * 4 + 4;
constexpr int LR = ceil_div(Br, 4) * 4 + 4;

// May query `row` attend to key `col`? Not to a key past the end of the sequence (the padding of a
// partial last tile), and, when causal, not to a later key.
__device__ inline bool visible(int row, int col, int N, bool causal) {
    return col < N && !(causal && col > row);
}

// Copies rows [row0, row0 + ROWS) of an N x d matrix into shared memory, element (r, x) going to
// tile[r * rs + x * xs], using threads lane = 0 .. lanes-1. Consecutive lanes take consecutive x,
// so the global reads coalesce. A thread issues all its loads before it stores any: one at a time,
// their latencies (hundreds of cycles each) would add up and dominate the kernel. Rows at or past
// `valid` are zero-filled, so a partial tile never reads past the end of the slice.
template <int ROWS>
__device__ void load_tile(float* tile, int rs, int xs, const float* src, int row0, int valid, int d, int lane,
                          int lanes) {
    for (int x = lane; x < d; x += lanes) {
        float v[ROWS];
#pragma unroll
        for (int r = 0; r < ROWS; ++r) v[r] = row0 + r < valid ? src[(size_t)(row0 + r) * d + x] : 0.0f;
#pragma unroll
        for (int r = 0; r < ROWS; ++r) tile[r * rs + x * xs] = v[r];
    }
}

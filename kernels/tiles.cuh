// What chapter 1's kernels share (flash.cu, flash_backward.cu), and later chapters reuse: the block
// sizes, the padded strides of tiles in shared memory, the tile loader and the attention mask; and
// where a (batch, head) slice's rows lie, in chapter 3's kernels (slice_rows) and in a strided view
// (Strides, chapter 4's).
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

// Where the rows of one (batch, head) slice lie, so that one kernel source serves two layouts:
//   fixed length (cu_seqlens_q null; flash_attention): q, O (B, H, N, d), k, v (B, H / group, N, d).
//     Slice bh is N rows of d values, one after the other; its k, v slice is bh / group.
//   packed (flash_attn_varlen_func): sequences of different lengths one after the other, without
//     padding, which would cost the longest sequence's memory and work for each: q, O (total_q, H, d),
//     k, v (total_k, H / group, d). Sequence b's queries are rows cu_seqlens_q[b] ..
//     cu_seqlens_q[b + 1] - 1 (its keys likewise), and a row holds all heads of a token, so the rows
//     of one head are H d values apart. The grid is sized by the longest sequence: a block past its
//     own sequence's end has nothing to do.
// L (and the backward's D) hold a float per row of q, in the same order: L + q / d, ld_q / d apart.
struct Slice {
    size_t q, kv;     // the offset of row 0 in q, O, dQ, and in k, v, dK, dV, in values
    int ld_q, ld_kv;  // values from one row to the next
    int Nq, Nk;       // the slice's queries and keys: its own sequence's, packed
};
__device__ inline Slice slice_rows(int bh, int N, int d, int group, const int* cu_seqlens_q,
                                   const int* cu_seqlens_k, int H) {
    if (!cu_seqlens_q) return {size_t(bh) * N * d, size_t(bh / group) * N * d, d, d, N, N};
    const int b = bh / H, h = bh % H, Hk = H / group, q0 = cu_seqlens_q[b], k0 = cu_seqlens_k[b];
    return {(size_t(q0) * H + h) * d, (size_t(k0) * Hk + h / group) * d, H * d, Hk * d,
            cu_seqlens_q[b + 1] - q0, cu_seqlens_k[b + 1] - k0};
}

// Where the rows of a (B, H, N, d) tensor lie when it is a view, not a contiguous tensor: row n of
// head h of batch b starts b * batch + h * head + n * row values from the tensor's start, and its d
// values are contiguous. Contiguous: (H N d, N d, d). A model's q, k, v are such views (notebook 7's
// GPT: (B, T, 3, H, d) permuted to (B, H, T, d), rows 3 H d values apart, heads d), and so is the
// gradient of its output; version 4 reads them where they are, through tensor maps (version4.cuh).
struct Strides {
    long long batch, head, row;  // in values
    __host__ __device__ long long at(long long b, long long h, long long n) const {
        return b * batch + h * head + n * row;
    }
};

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

// Tensor cores, one warp at a time (chapter 3): ldmatrix loads 8 x 8 tiles of 16-bit values from
// shared memory into the registers of a warp's 32 lanes, and mma.sync m16n8k16 multiplies a 16 x 16
// tile A by a 16 x 8 tile B, bf16 or fp16 in, fp32 accumulated. On the GPU each is one PTX
// instruction; on the CPU, kernels/cpu_cuda.h emulates them with the same lane layouts, so a kernel
// that takes the wrong register gets a wrong answer there too. The layouts (PTX ISA, "Matrix
// fragments for mma.m16n8k16"), for a lane, g = lane / 4, q = lane % 4, two 16-bit values per register
// (the lower column or row index in the low half):
//   a[0]: A[g][2q, 2q+1]   a[1]: A[g+8][2q, 2q+1]   a[2]: A[g][2q+8, 2q+9]   a[3]: A[g+8][2q+8, 2q+9]
//   b[0]: B[2q, 2q+1][g]   b[1]: B[2q+8, 2q+9][g]
//   c[0], c[1]: C[g][2q, 2q+1]   c[2], c[3]: C[g+8][2q, 2q+1]   (and d, the result, likewise)
#pragma once
#include <type_traits>
#include "tiles.cuh"     // visible
#include "cp_async.cuh"  // cp_async16, cp_async4, cp_async_commit, cp_async_wait
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

constexpr float LOG2E = 1.44269504f;  // log2(e): exp(x) = exp2(x LOG2E)

// The backward's L in log2 units, for P = exp2(S c - L log2(e)). A row that sees no key has L = -inf
// (the log of an empty sum): +inf stands in for it, so that its P is exp2(score - inf) = 0 for every
// score, -inf included, with no test of the score per element (such a test, in version 4's backward
// with mods, made nvcc serialize the wgmma: ptxas's C7511).
__host__ __device__ inline float log2_of_L(float L) { return L == -INFINITY ? INFINITY : L * LOG2E; }

// Chapter 3's tiles hold 16-bit values (bf16 or fp16, moved as raw bits). A row of a shared tile
// holds d values and 8 more: the 8 rows that one ldmatrix reads then start 16 bytes apart in the
// banks, not all in the same ones.
__host__ __device__ constexpr int stride16(int d) { return d + 8; }

// Two floats rounded to bf16 (or fp16) and packed into one register, the first in the low half.
__device__ inline unsigned pack_bf16(float lo, float hi) {
    return __bfloat16_as_ushort(__float2bfloat16(lo)) | unsigned(__bfloat16_as_ushort(__float2bfloat16(hi)))
                                                            << 16;
}
__device__ inline unsigned pack_f16(float lo, float hi) {
    return __half_as_ushort(__float2half(lo)) | unsigned(__half_as_ushort(__float2half(hi))) << 16;
}

#ifdef __CUDACC__  // on the CPU, cpu_cuda.h defines the same functions
// d = A b + c for one 16 x 8 tile of fp32, A and b in bf16 (or fp16), in the layouts above.
__device__ inline void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                         const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}
__device__ inline void mma_f16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                                        const float (&c)[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
}

// Four 8 x 8 tiles of 16-bit values from shared memory: lanes 8i .. 8i+7 give the addresses of the
// 8 rows (16 bytes each) of tile i, and each lane receives in r[i] row g, columns 2q and 2q+1 of tile
// i. With .trans, tile i transposed: row 2q and 2q+1, column g.
__device__ inline void ldmatrix_x4(unsigned (&r)[4], const void* row) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}
__device__ inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(row));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(address));
}

// 2^x by the special-function unit's single instruction (exp(x) = 2^(x LOG2E), LOG2E above).
// exp2f does more: it scales inputs whose result would be subnormal (below 2^-126) into range and
// back, two extra multiplies per call, for values that round to 0 as probabilities anyway. Within 2 ulp
// of the correctly rounded 2^x (PTX ISA); ftz: a subnormal result is 0, a subnormal input gives 1.
__device__ inline float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

// tanh(x) by the special-function unit's single instruction (sm_75 and later), where tanhf is a
// sequence of libm arithmetic; the official kernels' softcap uses it too (cutlass::fast_tanh). Its
// largest relative error, 2^-11 (PTX ISA), is fp16's own rounding and an eighth of bf16's; it is
// exact at +-0, gives +-1 at +-inf, NaN for NaN, and passes subnormals through.
__device__ inline float fast_tanh(float x) {
    float y;
    asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

#endif

// The same, for a kernel templated on its 16-bit type T (__nv_bfloat16 or __half): d += A b.
template <class T>
__device__ inline void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        mma_bf16_m16n8k16(d, a, {b0, b1}, d);
    else
        mma_f16_m16n8k16(d, a, {b0, b1}, d);
}
template <class T>
__device__ inline unsigned pack(float lo, float hi) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        return pack_bf16(lo, hi);
    else
        return pack_f16(lo, hi);
}

// A 16-bit value of type T (raw bits) as a float.
template <class T>
__device__ inline float to_float(unsigned short bits) {
    if constexpr (std::is_same_v<T, __nv_bfloat16>)
        return __bfloat162float(__ushort_as_bfloat16(bits));
    else
        return __half2float(__ushort_as_half(bits));
}

// Where value (row, col) of a shared tile lies, in values from the tile's start. Padded: rows of ld
// values (stride16, as above). Swizzled<D>: rows of exactly D values, 16-byte chunk c of a row stored
// at chunk c ^ (row % 8): the 8 rows one ldmatrix reads still fall on different banks, and every row
// starts on a 128-byte boundary, so the 16-byte copies of a row by 8 lanes fill whole 128-byte lines
// of shared memory (kernels/flash_decode.cu, whose copies are its time).
struct Padded {
    int ld;
    __device__ int operator()(int row, int col) const { return row * ld + col; }
};
template <int D>
struct Swizzled {
    __device__ int operator()(int row, int col) const {
        return row * D + ((col / 8) ^ (row % 8)) * 8 + col % 8;
    }
};

// A warp's products of 16-bit tiles in shared memory into C, 16 x N, held as N / 8 accumulator tiles
// (the layout above). C += A B^T: A's 16 rows at `a`, B^T's N columns the N rows at `b`, K values
// each, as in S = Q K^T; at_a and at_b place a tile's values (Padded or Swizzled).
template <class T, int K, int N, class LayoutA, class LayoutB>
__device__ void mma_ABt(float (&c)[N / 8][4], const unsigned short* a, LayoutA at_a, const unsigned short* b,
                        LayoutB at_b) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
        unsigned af[4];  // rows 0-7 and 8-15, columns 16 kk .. 16 kk + 7, then 16 kk + 8 .. 16 kk + 15
        ldmatrix_x4(af, &a[at_a(lane % 16, kk * 16 + lane / 16 * 8)]);
#pragma unroll
        for (int nb = 0; nb < N / 16; ++nb) {
            unsigned bf[4];  // B's columns 16 nb .. 16 nb + 15 are b's rows: no transpose
            ldmatrix_x4(bf, &b[at_b(nb * 16 + lane % 8 + lane / 16 * 8, kk * 16 + lane / 8 % 2 * 8)]);
            mma16816<T>(c[2 * nb], af, bf[0], bf[1]);
            mma16816<T>(c[2 * nb + 1], af, bf[2], bf[3]);
        }
    }
}
// The same, both tiles padded with row stride ld.
template <class T, int K, int N>
__device__ void mma_ABt(float (&c)[N / 8][4], const unsigned short* a, const unsigned short* b, int ld) {
    mma_ABt<T, K, N>(c, a, Padded{ld}, b, Padded{ld});
}

// The accumulators of a product C (16 x K), rounded to T, as the A operands of the next product:
// tiles 2 kb and 2 kb + 1 are, in the same lanes, the A operand of columns 16 kb .. 16 kb + 15.
template <class T, int K>
__device__ void a_operands(unsigned (&a)[K / 16][4], const float (&c)[K / 8][4]) {
#pragma unroll
    for (int kb = 0; kb < K / 16; ++kb) {
#pragma unroll
        for (int r = 0; r < 4; ++r)  // r: rows g, g + 8, g, g + 8 of tiles 2 kb, 2 kb, 2 kb + 1, 2 kb + 1
            a[kb][r] = pack<T>(c[2 * kb + r / 2][r % 2 * 2], c[2 * kb + r / 2][r % 2 * 2 + 1]);
    }
}

// C += A B: A (16 x K) as A operands in registers, B's K rows at `b`, N values each, as in O += P V;
// at_b places b's values (Padded or Swizzled; an int ld takes the overload below, Padded).
template <class T, int K, int N, class LayoutB, class = std::enable_if_t<!std::is_integral_v<LayoutB>>>
__device__ void mma_AB(float (&c)[N / 8][4], const unsigned (&a)[K / 16][4], const unsigned short* b,
                       LayoutB at_b) {
    const int lane = threadIdx.x % 32;
#pragma unroll
    for (int kb = 0; kb < K / 16; ++kb)
#pragma unroll
        for (int nb = 0; nb < N / 16; ++nb) {
            unsigned bf[4];  // rows 16 kb .. 16 kb + 15, columns 16 nb .. 16 nb + 15, transposed
            ldmatrix_x4_trans(bf, &b[at_b(kb * 16 + lane % 16, nb * 16 + lane / 16 * 8)]);
            mma16816<T>(c[2 * nb], a[kb], bf[0], bf[1]);
            mma16816<T>(c[2 * nb + 1], a[kb], bf[2], bf[3]);
        }
}
template <class T, int K, int N>
__device__ void mma_AB(float (&c)[N / 8][4], const unsigned (&a)[K / 16][4], const unsigned short* b,
                       int ld) {
    mma_AB<T, K, N>(c, a, b, Padded{ld});
}

// An accumulator tile's elements set to `fill` where a query may not see a key (tiles.cuh's visible):
// lane (g, q) holds of each 8 columns n, in c[n][0..3], rows `row` and row + 8 and columns `col` + 8n
// and col + 8n + 1, where row is its g and col its 2q, both counted from the start of the sequence
// (the layout above). The rows are queries and the columns keys, as in S = Q K^T; with KEYS_ARE_ROWS,
// the other way round, as in S^T = K Q^T.
template <bool KEYS_ARE_ROWS, int NT>
__device__ inline void mask_fragment(float (&c)[NT][4], int row, int col, int N, bool causal, float fill) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int r = row + 8 * (e / 2), k = col + 8 * n + e % 2;
            if (!(KEYS_ARE_ROWS ? visible(k, r, N, causal) : visible(r, k, N, causal))) c[n][e] = fill;
        }
}

// Alg. 1, line 9 on one accumulator tile of 16 rows (S_ij, NT tiles of 8 keys): the new running max
// m of the lane's two rows (their 4 lanes agree by shuffles), l rescaled to it by alpha =
// exp(m_old - m_new), and S turned into P_ij and added to the lane's share of l. O must be rescaled
// by alpha too: here at once (RESCALE_O, chapter 3), or later, by rescale below, while a product
// runs (chapter 4, flash3_hopper.cu).
// m and S stay unscaled: exp(scale (S - m)) = exp2(S c - m c) with c = scale log2(e), one fused
// multiply-add and one exp2 (fast_exp2, a single instruction) per element.
// fixed_max (chapter 6, version 4, mods::bounded): m is a bound of every score, set before the first
// tile, and never moves: no max to take, alpha = 1, nothing to rescale.
template <bool RESCALE_O, int NT, int NO>
__device__ inline void online_softmax(float (&s)[NT][4], float (&m)[2], float (&l)[2], float (&o)[NO][4],
                                      float (&alpha)[2], float c, bool fixed_max = false) {
    float mc[2];
    if (fixed_max) {
        alpha[0] = alpha[1] = 1.0f, mc[0] = m[0] * c, mc[1] = m[1] * c;
    } else {
        float m_new[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) m_new[i / 2] = fmaxf(m_new[i / 2], s[n][i]);
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 1));
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 2));
            // A row that has seen only masked keys keeps m = -inf: its P is exp2(-inf) = 0, no NaN.
            alpha[r] = m_new[r] == -INFINITY ? 1.0f : fast_exp2((m[r] - m_new[r]) * c);
            mc[r] = m_new[r] == -INFINITY ? 0.0f : m_new[r] * c;
            m[r] = m_new[r], l[r] *= alpha[r];
            if constexpr (RESCALE_O)
#pragma unroll
                for (int n = 0; n < NO; ++n) o[n][2 * r] *= alpha[r], o[n][2 * r + 1] *= alpha[r];
        }
    }
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s[n][i] = fast_exp2(fmaf(s[n][i], c, -mc[i / 2]));
            l[i / 2] += s[n][i];
        }
}
// The warp's max or sum of `value`, in every lane (a butterfly: each lane ends with the same bits).
__device__ inline float warp_max(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value = fmaxf(value, __shfl_xor_sync(0xffffffffu, value, offset));
    return value;
}
__device__ inline float warp_sum(float value) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
    return value;
}
// O's rows (the lane's two, in NO tiles of 8 columns) times their alpha.
template <int NO>
__device__ inline void rescale(float (&o)[NO][4], const float (&alpha)[2]) {
#pragma unroll
    for (int n = 0; n < NO; ++n)
        o[n][0] *= alpha[0], o[n][1] *= alpha[0], o[n][2] *= alpha[1], o[n][3] *= alpha[1];
}

// Rows [row0, row0 + rows) of an N x D matrix of 16-bit values, rows ld values apart (tiles.cuh's
// Slice), into a shared tile by cp.async, 16 bytes per thread and step, not waited for here; rows
// past N are zero-filled.
template <int D>
__device__ void load_tile16_async(unsigned short* tile, const unsigned short* src, int row0, int rows, int N,
                                  int ld) {
    src += (size_t)row0 * ld;
    for (int e = threadIdx.x; e < rows * D / 8; e += blockDim.x) {
        const int r = e / (D / 8), x = e % (D / 8) * 8;
        const bool valid = row0 + r < N;
        cp_async16(tile + r * stride16(D) + x, src + (valid ? r * ld + x : 0), valid);
    }
}

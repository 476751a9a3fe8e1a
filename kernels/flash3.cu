// FlashAttention-2 forward pass on tensor cores (chapter 3): bf16 or fp16 in, fp32 accumulation,
// O in the input's type, L in fp32. The loop order of flash2.cu; the arithmetic moves from one
// multiply-add per thread per instruction to mma.sync, a 16 x 8 x 16 matrix product per warp
// (kernels/mma.cuh has the instructions and their lane layouts). One block per (batch, head, 64
// query rows): 4 warps, each owning 16 rows. For each key tile j of 64 keys a warp computes its
// 16 x 64 block of S_ij, the online softmax on those fragments in registers (a row's max and sum
// over the 4 lanes that hold it, by shuffles), and O += P_ij V_j, with P_ij taken straight from
// the accumulators of S_ij into the A operand: no round trip through shared memory.
// Names as in the paper; "Alg. 1, line n" marks each phase of the FlashAttention-2 paper's Algorithm 1.
#include "tiles.cuh"  // ceil_div, visible, stride16, load_tile16
#include "mma.cuh"    // ldmatrix_x4, ldmatrix_x4_trans, mma16816<T>, pack<T>

constexpr int BR3 = 64, BC3 = 64, WARPS3 = BR3 / 16;  // rows per block, keys per tile, warps per block
// Shared memory: Q_i, and two buffers each of K_j and V_j, in 16-bit values.
__host__ __device__ inline int flash3_shared_bytes(int d) { return (BR3 + 4 * BC3) * stride16(d) * 2; }

// Rows [row0, row0 + rows) of an N x D matrix of 16-bit values into a shared tile by cp.async, 16
// bytes per thread and step, not waited for here; rows past N are zero-filled.
template <int D>
__device__ void load_tile16_async(unsigned short* tile, const unsigned short* src, int row0, int rows, int N) {
    for (int e = threadIdx.x; e < rows * D / 8; e += blockDim.x) {
        const int r = e / (D / 8), x = e % (D / 8) * 8;
        const bool valid = row0 + r < N;
        cp_async16(tile + r * stride16(D) + x, src + (size_t)(valid ? row0 + r : 0) * D + x, valid);
    }
}

// S = -inf where a query may not see a key (tiles.cuh's visible): lane (g, q)'s accumulators of the
// tile hold rows `row` and row + 8, columns col + 8n and col + 8n + 1.
__device__ inline void mask(float (&s)[BC3 / 8][4], int row, int col, int N, bool causal) {
#pragma unroll
    for (int n = 0; n < BC3 / 8; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i)
            if (!visible(row + 8 * (i / 2), col + 8 * n + i % 2, N, causal)) s[n][i] = -INFINITY;
}

template <class T, int D>
__global__ void __launch_bounds__(32 * WARPS3) flash3_forward(const unsigned short* Q, const unsigned short* K, const unsigned short* V,
                               int N, float scale, bool causal, unsigned short* O, float* L) {
    constexpr int LS = stride16(D);
    extern __shared__ __align__(16) float smem[];
    unsigned short* Q_i = reinterpret_cast<unsigned short*>(smem);  // BR3 x LS
    unsigned short* K_j = Q_i + BR3 * LS;  // two buffers of BC3 x LS: tile j in buffer j % 2
    unsigned short* V_j = K_j + 2 * BC3 * LS;
    // Lane l of warp w holds, of the warp's 16 rows, rows g and g + 8, and of each 8 columns of an
    // accumulator, columns 2q and 2q + 1 (kernels/mma.cuh).
    const int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, q = l % 4;

    const size_t bh = blockIdx.y;  // this block's (batch, head) slice
    Q += bh * N * D, K += bh * N * D, V += bh * N * D, O += bh * N * D, L += bh * N;
    const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // heaviest first, as in flash2.cu
    const int row0 = tile * BR3, Tc = ceil_div(N, BC3);
    const int j_end = causal ? min(Tc, (min(row0 + BR3, N) - 1) / BC3 + 1) : Tc;

    load_tile16_async<D>(Q_i, Q, row0, BR3, N);  // Alg. 1, line 4
    cp_async_commit();
    load_tile16_async<D>(K_j, K, 0, BC3, N);  // Alg. 1, lines 6-7 for j = 0
    load_tile16_async<D>(V_j, V, 0, BC3, N);
    cp_async_commit();
    cp_async_wait<1>();  // Q_i has landed; K_0, V_0 may still be on their way
    __syncthreads();
    unsigned qf[D / 16][4];  // the warp's 16 rows of Q_i as A operands, one per 16 columns
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], &Q_i[(w * 16 + l % 16) * LS + kk * 16 + l / 16 * 8]);

    float o[D / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l_part[2] = {};  // Alg. 1, line 5 (rows g, g + 8)
    for (int j = 0; j < j_end; ++j) {
        // Double buffering: tile j + 1's copies fly (into the buffers tile j - 1 used) while tile j
        // is multiplied, so the wait for memory overlaps the tensor cores' work.
        if (j + 1 < j_end) {  // Alg. 1, lines 6-7 for tile j + 1
            load_tile16_async<D>(K_j + (j + 1) % 2 * BC3 * LS, K, (j + 1) * BC3, BC3, N);
            load_tile16_async<D>(V_j + (j + 1) % 2 * BC3 * LS, V, (j + 1) * BC3, BC3, N);
            cp_async_commit();
            cp_async_wait<1>();  // tile j has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // ... for every thread's share of it
        const unsigned short *K_t = K_j + j % 2 * BC3 * LS, *V_t = V_j + j % 2 * BC3 * LS;

        float s[BC3 / 8][4] = {};  // Alg. 1, line 8: S_ij, 8 tiles of 16 x 8; B = K_j^T is K_j's rows
#pragma unroll
        for (int kb = 0; kb < BC3 / 16; ++kb)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned kf[4];  // keys 16 kb .. 16 kb + 15, columns 16 kk .. 16 kk + 15
                ldmatrix_x4(kf, &K_t[(kb * 16 + l % 8 + l / 16 * 8) * LS + kk * 16 + l / 8 % 2 * 8]);
                mma16816<T>(s[2 * kb], qf[kk], kf[0], kf[1]);
                mma16816<T>(s[2 * kb + 1], qf[kk], kf[2], kf[3]);
            }
        // Alg. 1, line 9: the new running max of rows g and g + 8 (their 4 lanes agree by shuffles),
        // then P_ij and each lane's share of l. Only a tile that crosses the end of the sequence or,
        // causal, the diagonal needs the mask: the others skip its index arithmetic on every element.
        if ((j + 1) * BC3 > N || (causal && (j + 1) * BC3 > row0 + 1))
            mask(s, row0 + w * 16 + g, j * BC3 + 2 * q, N, causal);
        float m_new[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < BC3 / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) m_new[i / 2] = fmaxf(m_new[i / 2], s[n][i]);
        // m and S stay unscaled: exp(scale (S - m)) = exp2(S c - m c) with c = scale log2(e), one
        // fused multiply-add and one exp2 (a single hardware instruction) per element.
        const float c = scale * 1.44269504f;
        float alpha[2], mc[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 1));
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 2));
            // A row that has seen only masked keys keeps m = -inf: its P is exp2(-inf) = 0, no NaN.
            alpha[r] = m_new[r] == -INFINITY ? 1.0f : exp2f((m[r] - m_new[r]) * c);
            mc[r] = m_new[r] == -INFINITY ? 0.0f : m_new[r] * c;
            m[r] = m_new[r], l_part[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) o[n][i] *= alpha[i / 2];
#pragma unroll
        for (int n = 0; n < BC3 / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                s[n][i] = exp2f(fmaf(s[n][i], c, -mc[i / 2]));  // now P_ij
                l_part[i / 2] += s[n][i];
            }
        // Alg. 1, line 10: O += P_ij V_j. The accumulators of S's tiles 2 kb and 2 kb + 1 are, in the
        // same lanes, the A operand for keys 16 kb .. 16 kb + 15; V_j's columns come transposed.
#pragma unroll
        for (int kb = 0; kb < BC3 / 16; ++kb) {
            const unsigned pf[4] = {pack<T>(s[2 * kb][0], s[2 * kb][1]), pack<T>(s[2 * kb][2], s[2 * kb][3]),
                                    pack<T>(s[2 * kb + 1][0], s[2 * kb + 1][1]),
                                    pack<T>(s[2 * kb + 1][2], s[2 * kb + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 16; ++dn) {
                unsigned vf[4];  // keys 16 kb .. 16 kb + 15, columns 16 dn .. 16 dn + 15
                ldmatrix_x4_trans(vf, &V_t[(kb * 16 + l % 16) * LS + dn * 16 + l / 16 * 8]);
                mma16816<T>(o[2 * dn], pf, vf[0], vf[1]);
                mma16816<T>(o[2 * dn + 1], pf, vf[2], vf[3]);
            }
        }
        __syncthreads();  // every warp is done with tile j's buffers before tile j + 2's copies fill them
    }
    // Alg. 1, lines 12-15: a row's l is its 4 lanes' shares added up; O = O / l, L = m + log(l).
    for (int r = 0; r < 2; ++r) {
        float l_row = l_part[r];
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 1);
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = row0 + w * 16 + g + 8 * r;
        if (row >= N) continue;
        const float inv_l = 1.0f / l_row;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)  // columns 8n + 2q, 8n + 2q + 1: one 4-byte store
            *reinterpret_cast<unsigned*>(&O[(size_t)row * D + 8 * n + 2 * q]) =
                pack<T>(o[n][2 * r] * inv_l, o[n][2 * r + 1] * inv_l);
        if (q == 0) L[row] = m[r] * scale + logf(l_row);
    }
}

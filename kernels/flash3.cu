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
__host__ __device__ inline int flash3_shared_bytes(int d) { return (BR3 + 2 * BC3) * stride16(d) * 2; }

template <class T, int D>
__global__ void __launch_bounds__(32 * WARPS3) flash3_forward(const unsigned short* Q, const unsigned short* K, const unsigned short* V,
                               int N, float scale, bool causal, unsigned short* O, float* L) {
    constexpr int LS = stride16(D);
    extern __shared__ __align__(16) float smem[];
    unsigned short* Q_i = reinterpret_cast<unsigned short*>(smem);  // BR3 x LS
    unsigned short* K_j = Q_i + BR3 * LS;                            // BC3 x LS
    unsigned short* V_j = K_j + BC3 * LS;                            // BC3 x LS
    // Lane l of warp w holds, of the warp's 16 rows, rows g and g + 8, and of each 8 columns of an
    // accumulator, columns 2q and 2q + 1 (kernels/mma.cuh).
    const int w = threadIdx.x / 32, l = threadIdx.x % 32, g = l / 4, q = l % 4;

    const size_t bh = blockIdx.y;  // this block's (batch, head) slice
    Q += bh * N * D, K += bh * N * D, V += bh * N * D, O += bh * N * D, L += bh * N;
    const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;  // heaviest first, as in flash2.cu
    const int row0 = tile * BR3, Tc = ceil_div(N, BC3);
    const int j_end = causal ? min(Tc, (min(row0 + BR3, N) - 1) / BC3 + 1) : Tc;

    load_tile16<D>(Q_i, Q, row0, BR3, N);  // Alg. 1, line 4
    __syncthreads();
    unsigned qf[D / 16][4];  // the warp's 16 rows of Q_i as A operands, one per 16 columns
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) ldmatrix_x4(qf[kk], &Q_i[(w * 16 + l % 16) * LS + kk * 16 + l / 16 * 8]);

    float o[D / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l_part[2] = {};  // Alg. 1, line 5 (rows g, g + 8)
    for (int j = 0; j < j_end; ++j) {  // Alg. 1, lines 6-7: load K_j, V_j
        __syncthreads();  // every warp is done with the previous K_j, V_j
        load_tile16<D>(K_j, K, j * BC3, BC3, N);
        load_tile16<D>(V_j, V, j * BC3, BC3, N);
        __syncthreads();  // K_j, V_j are complete

        float s[BC3 / 8][4] = {};  // Alg. 1, line 8: S_ij, 8 tiles of 16 x 8; B = K_j^T is K_j's rows
#pragma unroll
        for (int kb = 0; kb < BC3 / 16; ++kb)
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk) {
                unsigned kf[4];  // keys 16 kb .. 16 kb + 15, columns 16 kk .. 16 kk + 15
                ldmatrix_x4(kf, &K_j[(kb * 16 + l % 8 + l / 16 * 8) * LS + kk * 16 + l / 8 % 2 * 8]);
                mma16816<T>(s[2 * kb], qf[kk], kf[0], kf[1]);
                mma16816<T>(s[2 * kb + 1], qf[kk], kf[2], kf[3]);
            }
        // Alg. 1, line 9: the new running max of rows g and g + 8 (their 4 lanes agree by shuffles),
        // then P_ij and each lane's share of l.
        float m_new[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < BC3 / 8; ++n)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int row = row0 + w * 16 + g + 8 * (i / 2), col = j * BC3 + 8 * n + 2 * q + i % 2;
                s[n][i] = visible(row, col, N, causal) ? s[n][i] * scale : -INFINITY;
                m_new[i / 2] = fmaxf(m_new[i / 2], s[n][i]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 1));
            m_new[r] = fmaxf(m_new[r], __shfl_xor_sync(0xffffffffu, m_new[r], 2));
            alpha[r] = m_new[r] == -INFINITY ? 1.0f : __expf(m[r] - m_new[r]);  // as in flash2.cu
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
                s[n][i] = s[n][i] == -INFINITY ? 0.0f : __expf(s[n][i] - m[i / 2]);  // now P_ij
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
                ldmatrix_x4_trans(vf, &V_j[(kb * 16 + l % 16) * LS + dn * 16 + l / 16 * 8]);
                mma16816<T>(o[2 * dn], pf, vf[0], vf[1]);
                mma16816<T>(o[2 * dn + 1], pf, vf[2], vf[3]);
            }
        }
    }
    // Alg. 1, lines 12-15: a row's l is its 4 lanes' shares added up; O = O / l, L = m + log(l).
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float l_row = l_part[r];
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 1);
        l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
        const int row = row0 + w * 16 + g + 8 * r;
        if (row >= N) continue;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)  // columns 8n + 2q, 8n + 2q + 1: one 4-byte store
            *reinterpret_cast<unsigned*>(&O[(size_t)row * D + 8 * n + 2 * q]) =
                pack<T>(o[n][2 * r] / l_row, o[n][2 * r + 1] / l_row);
        if (q == 0) L[row] = m[r] + logf(l_row);
    }
}

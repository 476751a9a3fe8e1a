// FlashAttention forward pass: Algorithm 1 of Dao et al., "FlashAttention" (2022), in fp32.
// One block per (batch, head) walks the K/V tiles j (outer loop) and, for each, the Q tiles i
// (inner loop); one thread per row of Q_i. O, l and m live in global memory between steps, as in
// the paper. Names follow the paper: Q_i, K_j, V_j, S_ij, m, l, O (m~ and P~ written m_tilde, P);
// "Alg. 1, line n" marks each phase.
#include "tiles.cuh"  // Br, Bc, LD, ceil_div, visible, load_tile

__global__ void flash_forward(const float* Q, const float* K, const float* V, int N, int d, float scale,
                              bool causal, float* O, float* l, float* m, float* L) {
    // Step (j, i) changes only the rows of tile i, so the steps of the inner loop are independent:
    // the block's G groups of Br threads take G of them at once. Thread tx of group g owns row tx.
    const int G = blockDim.x / Br, g = threadIdx.x / Br, tx = threadIdx.x % Br;
    extern __shared__ __align__(16) float smem[];
    // K_j and V_j transposed: all threads read the same word at once (a broadcast), 4 keys at a time.
    float* K_jT = smem;           // d x LD
    float* V_jT = K_jT + d * LD;  // d x LD
    // Q_i and O_i, this group's: thread tx walks row tx, and the odd stride d + 1 puts the 32 rows
    // a warp reads at once in 32 different banks (with stride d = 64 they would all hit one).
    float* Q_i = V_jT + d * LD + g * 2 * Br * (d + 1);  // Br x (d + 1)
    float* O_i = Q_i + Br * (d + 1);                    // Br x (d + 1)

    const size_t bh = blockIdx.x;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, O += bh * N * d;
    l += bh * N, m += bh * N, L += bh * N;
    const int Tr = ceil_div(N, Br), Tc = ceil_div(N, Bc);

    for (int j = 0; j < Tc; ++j) {  // Alg. 1, lines 5-6: load K_j, V_j
        load_tile<Bc>(K_jT, 1, LD, K, j * Bc, N, d, threadIdx.x, blockDim.x);
        load_tile<Bc>(V_jT, 1, LD, V, j * Bc, N, d, threadIdx.x, blockDim.x);
        // Causal: tile (i, j) is entirely above the diagonal, and skipped, while i * Br + Br - 1 < j * Bc.
        const int i0 = causal ? j * Bc / Br : 0;
        // Every group makes the same number of passes, idle ones (i >= Tr) included, because every
        // thread of the block must reach every __syncthreads().
        for (int i = i0 + g; i - g < Tr; i += G) {  // Alg. 1, lines 7-8: load Q_i, O_i (l_i, m_i below)
            load_tile<Br>(Q_i, d + 1, 1, Q, i * Br, N, d, tx, Br);
            // Algorithm 1 starts with O = 0, l = 0, m = -inf; we start there at j = 0 instead of
            // reading them, so the outputs need no initialisation (and garbage in O cannot leak in).
            load_tile<Br>(O_i, d + 1, 1, O, i * Br, j == 0 ? 0 : N, d, tx, Br);
            __syncthreads();  // Q_i, O_i (and, in the first pass, K_j, V_j) are complete.

            const int row = i * Br + tx;
            if (row < N) {
                float S[Bc];  // Alg. 1, line 9: row tx of S_ij = scale * Q_i K_j^T, in registers
#pragma unroll
                for (int y = 0; y < Bc; ++y) S[y] = 0.0f;
                for (int x = 0; x < d; ++x) {
                    const float q = Q_i[tx * (d + 1) + x];
#pragma unroll
                    for (int y = 0; y < Bc; ++y) S[y] += q * K_jT[x * LD + y];
                }
                float m_tilde = -INFINITY;  // Alg. 1, line 10: m~ = rowmax(S_ij), over the keys it may see
#pragma unroll
                for (int y = 0; y < Bc; ++y) {
                    S[y] = visible(row, j * Bc + y, N, causal) ? S[y] * scale : -INFINITY;
                    m_tilde = fmaxf(m_tilde, S[y]);
                }
                float l_tilde = 0.0f;  // l~ = rowsum(P~), P~ = exp(S_ij - m~)
#pragma unroll
                for (int y = 0; y < Bc; ++y) {
                    // A row can see no key of this tile (causal, Br > Bc): then m_tilde = -inf and
                    // exp(-inf - -inf) would be NaN; such a row gets P = 0 and changes nothing.
                    S[y] = S[y] == -INFINITY ? 0.0f : __expf(S[y] - m_tilde);
                    l_tilde += S[y];
                }
                // Alg. 1, line 11: the new running max and sum
                const float m_old = j == 0 ? -INFINITY : m[row], l_old = j == 0 ? 0.0f : l[row];
                const float m_new = fmaxf(m_old, m_tilde);
                const float alpha = l_old * __expf(m_old - m_new);  // weight of the old O row
                const float beta = __expf(m_tilde - m_new);         // weight of P_ij V_j
                const float l_new = alpha + beta * l_tilde, inv_l = 1.0f / l_new;
                for (int x = 0; x < d; ++x) {  // Alg. 1, line 12: O_i = (alpha O_i + beta P~ V_j) / l_new
                    float pv = 0.0f;           // (P_ij V_j)[tx][x]
#pragma unroll
                    for (int y = 0; y < Bc; ++y) pv += S[y] * V_jT[x * LD + y];
                    float& o = O_i[tx * (d + 1) + x];
                    o = (alpha * o + beta * pv) * inv_l;
                }
                m[row] = m_new, l[row] = l_new;  // Alg. 1, line 13
            }
            __syncthreads();  // every row of O_i is updated before the group stores it together.
            for (int x = tx; x < d; x += Br)  // Alg. 1, line 12: write O_i
#pragma unroll
                for (int r = 0; r < Br; ++r)
                    if (i * Br + r < N) O[(size_t)(i * Br + r) * d + x] = O_i[r * (d + 1) + x];
            __syncthreads();  // the store has read O_i, and all are done with Q_i, K_j, V_j,
                              // before the next loads overwrite them.
        }
    }
    // After the last barrier every m, l is final (another group may have written them).
    for (int row = threadIdx.x; row < N; row += blockDim.x)
        L[row] = m[row] + logf(l[row]);  // log-sum-exp of the row, for the backward pass
}

// Shared memory of a block of G thread groups, in floats: K_j^T, V_j^T, then each group's Q_i, O_i.
__host__ __device__ inline int forward_shared_floats(int d, int G) {
    return 2 * d * LD + G * 2 * Br * (d + 1);
}

// FlashAttention forward pass: Algorithm 1 of Dao et al., "FlashAttention" (2022), in fp32.
// One block per (batch, head) walks the K/V tiles j (outer loop) and, for each, the Q tiles i
// (inner loop); one thread per row of Q_i. O, l and m live in global memory between steps, as in
// the paper. Names follow the paper: Q_i, K_j, V_j, S_ij, m, l, O (m~ and P~ written m_tilde, P).
#pragma once  // the other kernels include it

// Block sizes are compile-time constants so that a thread's row of S_ij can live in registers.
// minimal_flash.py passes -DBR=.. -DBC=.. to recompile with other sizes.
#ifndef BR
#define BR 32
#endif
#ifndef BC
#define BC 32
#endif
constexpr int Br = BR, Bc = BC;

// Shared memory, in floats. Thread tx walks row tx of Q_i and O_i along x; with a row stride of d
// (64, say) all 32 threads of a warp would hit the same bank at every step. Padding each row to
// d + 1 floats puts them in 32 different banks. K_j and V_j are stored transposed, d rows of LD:
// all threads read the same words at the same time (a broadcast, free of conflicts), and with LD a
// multiple of 4 the Bc keys of one row are read 4 at a time, as 16-byte loads. The extra 4 floats
// make the transposing store only 4-way conflicted instead of 32-way. G thread groups share K_j,
// V_j and each have their own Q_i and O_i.
constexpr int LD = (Bc + 3) / 4 * 4 + 4;
__host__ __device__ inline int forward_shared_floats(int d, int G) {
    return 2 * d * LD + G * 2 * Br * (d + 1);
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

__global__ void flash_forward(const float* Q, const float* K, const float* V, int N, int d,
                              float scale, bool causal, float* O, float* l, float* m, float* L) {
    // Step (j, i) changes only the rows of tile i, so the steps of the inner loop are independent:
    // the block's G groups of Br threads take G of them at once. Thread tx of group g owns row tx.
    const int G = blockDim.x / Br, g = threadIdx.x / Br, tx = threadIdx.x % Br;
    extern __shared__ __align__(16) float smem[];
    float* K_jT = smem;                                   // d x LD, K_j transposed
    float* V_jT = K_jT + d * LD;                          // d x LD, V_j transposed
    float* Q_i = V_jT + d * LD + g * 2 * Br * (d + 1);    // Br x (d + 1), this group's
    float* O_i = Q_i + Br * (d + 1);                      // Br x (d + 1), this group's

    const size_t bh = blockIdx.x;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, O += bh * N * d;
    l += bh * N, m += bh * N, L += bh * N;
    const int Tr = (N + Br - 1) / Br, Tc = (N + Bc - 1) / Bc;

    for (int j = 0; j < Tc; ++j) {
        load_tile<Bc>(K_jT, 1, LD, K, j * Bc, N, d, threadIdx.x, blockDim.x);
        load_tile<Bc>(V_jT, 1, LD, V, j * Bc, N, d, threadIdx.x, blockDim.x);
        // Causal: tile (i, j) is entirely above the diagonal, and skipped, while i * Br + Br - 1 < j * Bc.
        const int i0 = causal ? j * Bc / Br : 0;
        // Every group makes the same number of passes, idle ones (i >= Tr) included, because every
        // thread of the block must reach every __syncthreads().
        for (int i = i0 + g; i - g < Tr; i += G) {
            load_tile<Br>(Q_i, d + 1, 1, Q, i * Br, N, d, tx, Br);
            // Algorithm 1 starts with O = 0, l = 0, m = -inf; we start there at j = 0 instead of
            // reading them, so the outputs need no initialisation (and garbage in O cannot leak in).
            load_tile<Br>(O_i, d + 1, 1, O, i * Br, j == 0 ? 0 : N, d, tx, Br);
            __syncthreads();  // Q_i, O_i (and, in the first pass, K_j, V_j) are complete.

            const int row = i * Br + tx;
            if (row < N) {
                float S[Bc];  // row tx of S_ij = scale * Q_i K_j^T, then of P_ij; in registers
#pragma unroll
                for (int y = 0; y < Bc; ++y) S[y] = 0.0f;
                for (int x = 0; x < d; ++x) {
                    const float q = Q_i[tx * (d + 1) + x];
#pragma unroll
                    for (int y = 0; y < Bc; ++y) S[y] += q * K_jT[x * LD + y];
                }
                float m_tilde = -INFINITY;  // rowmax(S_ij), over the keys this row may see
#pragma unroll
                for (int y = 0; y < Bc; ++y) {
                    const int col = j * Bc + y;
                    S[y] = col < N && !(causal && col > row) ? S[y] * scale : -INFINITY;
                    m_tilde = fmaxf(m_tilde, S[y]);
                }
                float l_tilde = 0.0f;  // rowsum(P_ij), P_ij = exp(S_ij - m_tilde)
#pragma unroll
                for (int y = 0; y < Bc; ++y) {
                    // A row can see no key of this tile (causal, Br > Bc): then m_tilde = -inf and
                    // exp(-inf - -inf) would be NaN; such a row gets P = 0 and changes nothing.
                    S[y] = S[y] == -INFINITY ? 0.0f : __expf(S[y] - m_tilde);
                    l_tilde += S[y];
                }
                const float m_old = j == 0 ? -INFINITY : m[row], l_old = j == 0 ? 0.0f : l[row];
                const float m_new = fmaxf(m_old, m_tilde);
                const float alpha = l_old * __expf(m_old - m_new);  // weight of the old O row
                const float beta = __expf(m_tilde - m_new);         // weight of P_ij V_j
                const float l_new = alpha + beta * l_tilde, inv_l = 1.0f / l_new;
                for (int x = 0; x < d; ++x) {
                    float pv = 0.0f;  // (P_ij V_j)[tx][x]
#pragma unroll
                    for (int y = 0; y < Bc; ++y) pv += S[y] * V_jT[x * LD + y];
                    float& o = O_i[tx * (d + 1) + x];
                    o = (alpha * o + beta * pv) * inv_l;
                }
                m[row] = m_new, l[row] = l_new;
            }
            __syncthreads();  // every row of O_i is updated before the group stores it together.
            for (int x = tx; x < d; x += Br)
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

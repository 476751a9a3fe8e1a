// FlashAttention forward pass: Algorithm 1 of Dao et al., "FlashAttention" (2022), in fp32.
// One block per (batch, head) walks the K/V tiles j (outer loop) and, for each, the Q tiles i
// (inner loop); one thread per row of Q_i. O, l and m live in global memory between steps, as in
// the paper. Names follow the paper: Q_i, K_j, V_j, S_ij, m, l, O (m~ and P~ written m_tilde, P).

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
// d + 1 floats puts them in 32 different banks. K_j and V_j are stored transposed (d rows of
// Bc + 1): every thread reads the same word at the same time (a broadcast, free), the offsets
// y = 0..Bc-1 are compile-time constants, and the +1 keeps the transposing store conflict-free.
__host__ __device__ inline int forward_shared_floats(int d) {
    return 2 * Br * (d + 1) + 2 * d * (Bc + 1);
}

// Copies rows [row0, row0 + rows) of an N x d matrix into shared memory, element (r, x) going to
// tile[r * rs + x * xs]. Consecutive threads take consecutive x, so the global reads coalesce.
// Rows at or past `valid` are zero-filled: a partial tile never reads past the end of the slice.
__device__ void load_tile(float* tile, int rs, int xs, const float* src, int row0, int rows,
                          int valid, int d) {
    for (int r = 0; r < rows; ++r)
        for (int x = threadIdx.x; x < d; x += blockDim.x)
            tile[r * rs + x * xs] = row0 + r < valid ? src[(size_t)(row0 + r) * d + x] : 0.0f;
}

__global__ void flash_forward(const float* Q, const float* K, const float* V, int N, int d,
                              float scale, bool causal, float* O, float* l, float* m, float* L) {
    extern __shared__ float smem[];
    float* Q_i = smem;                  // Br x (d + 1)
    float* O_i = Q_i + Br * (d + 1);    // Br x (d + 1)
    float* K_jT = O_i + Br * (d + 1);   // d x (Bc + 1), K_j transposed
    float* V_jT = K_jT + d * (Bc + 1);  // d x (Bc + 1), V_j transposed

    const size_t bh = blockIdx.x;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, O += bh * N * d;
    l += bh * N, m += bh * N, L += bh * N;
    const int tx = threadIdx.x, Tr = (N + Br - 1) / Br, Tc = (N + Bc - 1) / Bc;

    for (int j = 0; j < Tc; ++j) {
        load_tile(K_jT, 1, Bc + 1, K, j * Bc, Bc, N, d);
        load_tile(V_jT, 1, Bc + 1, V, j * Bc, Bc, N, d);
        // Causal: tile (i, j) is entirely above the diagonal, and skipped, while i * Br + Br - 1 < j * Bc.
        for (int i = causal ? j * Bc / Br : 0; i < Tr; ++i) {
            load_tile(Q_i, d + 1, 1, Q, i * Br, Br, N, d);
            // Algorithm 1 starts with O = 0, l = 0, m = -inf; we start there at j = 0 instead of
            // reading them, so the outputs need no initialisation (and garbage in O cannot leak in).
            load_tile(O_i, d + 1, 1, O, i * Br, Br, j == 0 ? 0 : N, d);
            __syncthreads();  // Q_i, O_i (and, for the first i, K_j, V_j) are complete before use.

            const int row = i * Br + tx;
            if (row < N) {
                float S[Bc];  // row tx of S_ij = scale * Q_i K_j^T, then of P_ij; in registers
#pragma unroll
                for (int y = 0; y < Bc; ++y) S[y] = 0.0f;
                for (int x = 0; x < d; ++x) {
                    const float q = Q_i[tx * (d + 1) + x];
#pragma unroll
                    for (int y = 0; y < Bc; ++y) S[y] += q * K_jT[x * (Bc + 1) + y];
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
                const float l_new = alpha + beta * l_tilde;
                for (int x = 0; x < d; ++x) {
                    float pv = 0.0f;  // (P_ij V_j)[tx][x]
#pragma unroll
                    for (int y = 0; y < Bc; ++y) pv += S[y] * V_jT[x * (Bc + 1) + y];
                    float& o = O_i[tx * (d + 1) + x];
                    o = (alpha * o + beta * pv) / l_new;
                }
                m[row] = m_new, l[row] = l_new;
            }
            __syncthreads();  // every row of O_i is updated before the block stores it together.
            for (int r = 0; r < Br && i * Br + r < N; ++r)
                for (int x = tx; x < d; x += blockDim.x)
                    O[(size_t)(i * Br + r) * d + x] = O_i[r * (d + 1) + x];
            __syncthreads();  // the store has read O_i, and all are done with Q_i, K_j, V_j,
                              // before the next loads overwrite them.
        }
    }
    for (int row = tx; row < N; row += Br)  // this thread wrote m[row], l[row]: no barrier needed
        L[row] = m[row] + logf(l[row]);     // log-sum-exp of the row, for the backward pass
}

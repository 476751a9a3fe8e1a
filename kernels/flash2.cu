// FlashAttention-2 forward pass (Dao, "FlashAttention-2", 2023, Algorithm 1), in fp32: the loop
// order that keeps the GPU busy. One block per (batch, head, query tile). Each thread owns one query
// row and keeps that row's running max m, running sum l and output accumulator O in registers for
// the whole pass, while the K/V tiles stream through shared memory. Compared with flash.cu (the
// first paper's Algorithm 1): O, l and m never go through global memory, there are B * H * Tr
// blocks instead of B * H, and O is divided by l once, at the end. Same names as the paper: Q_i,
// K_j, V_j, S_ij, m, l, O; "Alg. 1, line n" marks each phase of the FlashAttention-2 paper's
// Algorithm 1.
#include "tiles.cuh"  // Br, Bc, LD, DC, flash2_V_stride, ceil_div, visible, load_tile

// Shared memory, in floats, for a block of R query rows: K_j^T (d x LD, as in flash.cu), V_j
// (Bc x LV), Q_i (R x (d + 1)).
__host__ __device__ inline int flash2_shared_floats(int d, int R) {
    return d * LD + Bc * flash2_V_stride(d) + R * (d + 1);
}

__global__ void flash2_forward(const float* Q, const float* K, const float* V, int N, int d,
                               float scale, bool causal, float* O, float* L) {
    const int R = blockDim.x, t = threadIdx.x, LV = flash2_V_stride(d);
    extern __shared__ __align__(16) float smem[];
    float* K_jT = smem;           // d x LD, K_j transposed: thread t reads K_j[y][x] for all y at once
    float* V_j = K_jT + d * LD;   // Bc x LV, row-major: row y of V_j is read 4 columns at a time
    float* Q_i = V_j + Bc * LV;   // R x (d + 1): the odd row stride puts the R rows in R different banks

    const size_t bh = blockIdx.y;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, O += bh * N * d, L += bh * N;
    // Causal: later query tiles see more keys. Blocks run roughly in launch order, so the heaviest
    // are launched first and the light ones fill in the gaps at the end.
    const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int row0 = tile * R, row = row0 + t, Tc = ceil_div(N, Bc);
    // Causal tiles are skipped, not masked one by one: key tile j is needed only while j * Bc is at
    // most the block's last row.
    const int j_end = causal ? min(Tc, (min(row0 + R, N) - 1) / Bc + 1) : Tc;

    // V_j's columns d .. LV-1 are read (a pass covers DC columns) but never loaded: zero them once.
    for (int e = t; e < Bc * (LV - d); e += R) V_j[e / (LV - d) * LV + d + e % (LV - d)] = 0.0f;
    // Alg. 1, line 4: each group of Br threads loads its own Br rows of Q_i, as in flash.cu.
    load_tile<Br>(Q_i + t / Br * Br * (d + 1), d + 1, 1, Q, row0 + t / Br * Br, N, d, t % Br, Br);

    for (int c0 = 0; c0 < d; c0 += DC) {  // one pass per DC columns of O
        float o[DC] = {}, m = -INFINITY, l = 0.0f;  // Alg. 1, line 5: this row's O (unnormalised), m, l
        for (int j = 0; j < j_end; ++j) {  // Alg. 1, lines 6-7: load K_j, V_j
            __syncthreads();  // all threads are done reading the previous K_j, V_j (and Q_i, the zeros are written)
            load_tile<Bc>(K_jT, 1, LD, K, j * Bc, N, d, t, R);
            load_tile<Bc>(V_j, LV, 1, V, j * Bc, N, d, t, R);
            __syncthreads();  // K_j, V_j are complete before anyone reads them

            float S[Bc] = {};  // Alg. 1, line 8: row t of S_ij = scale * Q_i K_j^T, in registers
            for (int x = 0; x < d; ++x) {
                const float q = Q_i[t * (d + 1) + x];
#pragma unroll
                for (int y = 0; y < Bc; ++y) S[y] += q * K_jT[x * LD + y];
            }
            float m_new = m;  // Alg. 1, line 9: the new running max, then P~ and l
#pragma unroll
            for (int y = 0; y < Bc; ++y) {
                S[y] = visible(row, j * Bc + y, N, causal) ? S[y] * scale : -INFINITY;
                m_new = fmaxf(m_new, S[y]);
            }
            // The old O and l were summed relative to the old max: rescale them to the new one. A row
            // that has seen no key yet has m = m_new = -inf, and nothing to rescale.
            const float alpha = m_new == -INFINITY ? 1.0f : __expf(m - m_new);
            l *= alpha;
#pragma unroll
            for (int c = 0; c < DC; ++c) o[c] *= alpha;
#pragma unroll
            for (int y = 0; y < Bc; ++y) {  // Alg. 1, line 10: O += P_ij V_j, row y of V_j at a time
                const float p = S[y] == -INFINITY ? 0.0f : __expf(S[y] - m_new);
                l += p;
#pragma unroll
                for (int c = 0; c < DC; ++c) o[c] += p * V_j[y * LV + c0 + c];
            }
            m = m_new;
        }
        if (row < N) {  // Alg. 1, lines 12-15: O = O / l, L = m + log(l), written
#pragma unroll
            for (int c = 0; c < DC; ++c)  // a constant index keeps o[] in registers
                if (c0 + c < d) O[(size_t)row * d + c0 + c] = o[c] / l;
            if (c0 == 0) L[row] = m + logf(l);  // every pass finds the same m and l
        }
    }
}

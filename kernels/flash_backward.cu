// FlashAttention backward pass: Algorithm 4 of Dao et al., "FlashAttention" (2022), in fp32.
// Same schedule as flash.cu: one block per (batch, head) walks the K/V tiles j (outer loop) and, for
// each, the Q tiles i (inner loop). P_ij is recomputed from the forward's log-sum-exp L, exactly as
// the forward made it, instead of being stored: P_ij = exp(S_ij - L_i). dK_j and dV_j accumulate in
// shared memory over the inner loop; dQ_i accumulates in global memory over the outer loop, as in
// the paper. No atomics: at any moment each element of dQ, dK and dV has exactly one thread that
// adds to it. Names follow the paper: S_ij, P_ij, dP_ij, dS_ij, D_i, dQ_i, dK_j, dV_j;
// "Alg. 4, line n" marks each phase (the paper's lines for dropout have no counterpart here).
#include "tiles.cuh"  // Br, Bc, LD, LR, ceil_div, visible, load_tile

// Shared memory, in floats. K_j and V_j are transposed (d x LD), as in flash.cu: a thread walking
// its row of Q_i reads K_j[y][x] for all y at once, as 16-byte broadcasts. Each of the G thread
// groups has its own Q_i, dO_i (d x LR) and P_ij, dS_ij (Bc x LR), all transposed too: step A
// writes them one row per thread, conflict-free, and step B reads them along that row 4 floats at
// a time. dK_j and dV_j (Bc x d) come last, in global memory's order; their size need not be a
// multiple of 4, and everything before them stays 16-byte aligned.
constexpr int ROWS_B = Bc % 4 == 0 ? 4 : 1;  // rows of dK_j, dV_j per thread in step B (must divide Bc)
__host__ __device__ inline int backward_group_floats(int d) { return 2 * (d + Bc) * LR; }
__host__ __device__ inline int backward_shared_floats(int d, int G) {
    return 2 * d * LD + G * backward_group_floats(d) + 2 * Bc * d;
}

__global__ void flash_backward(const float* Q, const float* K, const float* V, const float* O,
                               const float* dO, const float* L, int N, int d, float scale, bool causal,
                               float* D, float* dQ, float* dK, float* dV) {
    // As in the forward, G groups of Br threads take G tiles of the inner loop at once.
    const int G = blockDim.x / Br, g = threadIdx.x / Br, tx = threadIdx.x % Br;
    extern __shared__ __align__(16) float smem[];
    float* K_jT = smem;                                   // d x LD
    float* V_jT = K_jT + d * LD;                          // d x LD
    float* groups = V_jT + d * LD;                        // G x (Q_i, dO_i, P_ij, dS_ij)
    float* Q_iT = groups + g * backward_group_floats(d);  // d x LR, this group's
    float* dO_iT = Q_iT + d * LR;                         // d x LR
    float* P_ijT = dO_iT + d * LR;                        // Bc x LR
    float* dS_ijT = P_ijT + Bc * LR;                      // Bc x LR
    float* dK_j = groups + G * backward_group_floats(d);  // Bc x d
    float* dV_j = dK_j + Bc * d;                          // Bc x d

    const size_t bh = blockIdx.x;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, O += bh * N * d, dO += bh * N * d;
    dQ += bh * N * d, dK += bh * N * d, dV += bh * N * d, L += bh * N, D += bh * N;
    const int Tr = ceil_div(N, Br), Tc = ceil_div(N, Bc);

    // Alg. 4, line 19: D_i = rowsum(dO_i * O_i). The paper computes it inside the loops; it depends
    // on the row only, so we compute it once, up front.
    for (int row = threadIdx.x; row < N; row += blockDim.x) {
        float D_row = 0.0f;
        for (int x = 0; x < d; ++x) D_row += dO[(size_t)row * d + x] * O[(size_t)row * d + x];
        D[row] = D_row;
    }

    for (int j = 0; j < Tc; ++j) {  // Alg. 4, lines 6-8: load K_j, V_j (dK_j, dV_j start at 0 below)
        load_tile<Bc>(K_jT, 1, LD, K, j * Bc, N, d, threadIdx.x, blockDim.x);
        load_tile<Bc>(V_jT, 1, LD, V, j * Bc, N, d, threadIdx.x, blockDim.x);
        const int i0 = causal ? j * Bc / Br : 0;  // tiles above the diagonal are skipped
        for (int ib = i0; ib < Tr; ib += G) {     // Alg. 4, lines 9-10; group g takes tile i = ib + g
            const int i = ib + g, row = i * Br + tx, busy = min(G, Tr - ib);
            load_tile<Br>(Q_iT, 1, LR, Q, i * Br, N, d, tx, Br);
            load_tile<Br>(dO_iT, 1, LR, dO, i * Br, N, d, tx, Br);
            __syncthreads();  // Q_i, dO_i (and, in the first pass, K_j, V_j and D) are complete.

            // Step A, thread tx: row tx of S_ij, P_ij, dP_ij, dS_ij (in registers), then of dQ_i.
            // A row past N (partial or idle tile) gets L = +inf, so P = 0 and dS = 0: steps A and
            // B need no special case for it.
            const float L_i = row < N ? L[row] : INFINITY, D_i = row < N ? D[row] : 0.0f;
            float P[Bc], dS[Bc];  // S_ij then P_ij; dP_ij then dS_ij
#pragma unroll
            for (int y = 0; y < Bc; ++y) P[y] = dS[y] = 0.0f;
            for (int x = 0; x < d; ++x) {  // Alg. 4, lines 11 and 17
                const float q = Q_iT[x * LR + tx], dout = dO_iT[x * LR + tx];
#pragma unroll
                for (int y = 0; y < Bc; ++y) {
                    P[y] += q * K_jT[x * LD + y];      // S_ij = Q_i K_j^T
                    dS[y] += dout * V_jT[x * LD + y];  // dP_ij = dO_i V_j^T
                }
            }
#pragma unroll
            for (int y = 0; y < Bc; ++y) {  // Alg. 4, lines 12-13 and 20
                P[y] = visible(row, j * Bc + y, N, causal) ? __expf(scale * P[y] - L_i) : 0.0f;
                dS[y] = P[y] * (dS[y] - D_i);  // dS_ij = P_ij * (dP_ij - D_i)
                P_ijT[y * LR + tx] = P[y];
                dS_ijT[y * LR + tx] = dS[y];
            }
            // Alg. 4, line 21: dQ_i += scale dS_ij K_j, 8 columns at a time: the 8 reads of dQ are
            // issued together (one at a time, each would wait for memory) and the 8 sums over y run
            // side by side. Tile i is first visited at j = 0 (also when causal): there dQ starts
            // from 0 instead of being read, so it needs no initialisation.
            for (int x0 = 0; x0 < d && row < N; x0 += 8) {
                float* dQ_row = dQ + (size_t)row * d + x0;
                const int n = min(8, d - x0);
                float dq[8];
#pragma unroll
                for (int c = 0; c < 8; ++c) dq[c] = j > 0 && c < n ? dQ_row[c] : 0.0f;
#pragma unroll
                for (int c = 0; c < 8; ++c) {
                    float dSK = 0.0f;  // (dS_ij K_j)[tx][x0 + c]
#pragma unroll
                    for (int y = 0; y < Bc; ++y) dSK += dS[y] * K_jT[(x0 + c) * LD + y];
                    if (c < n) dQ_row[c] = dq[c] + scale * dSK;
                }
            }
            __syncthreads();  // every group's P_ij and dS_ij are complete before step B reads them.

            // Step B, all threads (Alg. 4, lines 16 and 22; line 24 after the last pass): dV_j +=
            // P_ij^T dO_i and dK_j += dS_ij^T Q_i, summed over the busy groups' tiles. Thread e
            // takes rows y0 .. y0 + ROWS_B - 1 of both, at one column x.
            // Consecutive threads take consecutive x: they read the same rows of P_ij^T, dS_ij^T (a
            // broadcast, one memory transaction for the warp) and each its own row of dO_i^T, Q_i^T
            // (4 transactions for 16-byte reads): each thread reuses those for all ROWS_B rows.
            for (int e = threadIdx.x; e < Bc / ROWS_B * d; e += blockDim.x) {
                const int y0 = e / d * ROWS_B, x = e % d;
                float dv[ROWS_B] = {}, dk[ROWS_B] = {};
                for (int h = 0; h < busy; ++h) {
                    const float* Q_hT = groups + h * backward_group_floats(d);  // group h's tiles
                    const float *dO_hT = Q_hT + d * LR, *P_hT = dO_hT + d * LR, *dS_hT = P_hT + Bc * LR;
#pragma unroll
                    for (int r = 0; r < Br; ++r) {
                        const float dout = dO_hT[x * LR + r], q = Q_hT[x * LR + r];
#pragma unroll
                        for (int k = 0; k < ROWS_B; ++k) {
                            dv[k] += P_hT[(y0 + k) * LR + r] * dout;
                            dk[k] += dS_hT[(y0 + k) * LR + r] * q;
                        }
                    }
                }
                // The first pass starts dK_j, dV_j from 0; the last stores them in global memory
                // (row y of the tile is row j * Bc + y of the slice), dK_j times the scale that
                // dK_j += scale dS_ij^T Q_i leaves out above. Between passes they stay in shared
                // memory, each element always with this same thread: no barrier needed for them.
#pragma unroll
                for (int k = 0; k < ROWS_B; ++k) {
                    const int y = y0 + k;
                    dv[k] += ib == i0 ? 0.0f : dV_j[y * d + x], dk[k] += ib == i0 ? 0.0f : dK_j[y * d + x];
                    if (ib + G < Tr) {
                        dV_j[y * d + x] = dv[k], dK_j[y * d + x] = dk[k];
                    } else if (j * Bc + y < N) {
                        dV[(size_t)(j * Bc + y) * d + x] = dv[k],
                                                      dK[(size_t)(j * Bc + y) * d + x] = scale * dk[k];
                    }
                }
            }
            __syncthreads();  // step B is done reading every group's tiles (and K_j, V_j) before
                              // the next loads overwrite them.
        }
    }
}

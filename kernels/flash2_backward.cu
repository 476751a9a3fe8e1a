// FlashAttention-2 backward pass (Dao, "FlashAttention-2", 2023, Algorithm 2), in fp32: the forward's
// loop order turned around. One block per (batch, head, tile of R keys). Each thread owns one key
// row and keeps that row's dK and dV in registers for the whole pass, while the query tiles Q_i,
// dO_i stream through shared memory. Compared with flash_backward.cu (Algorithm 4): dK_j and dV_j
// leave the chip once, final, and there are B * H * ceil(N / R) blocks instead of B * H.
//
// dQ_i = scale * sum_j dS_ij K_j sums over key tiles that now belong to different blocks. Each block
// adds its share into dQ with atomicAdd, as FlashAttention-2 does. The alternative, a second kernel
// that owns the query rows and recomputes S and dP, would redo 2 of the 5 matrix products. The
// price of atomics: dQ must start at 0, and the order of the additions, so dQ's last bits, varies
// from run to run. Same names as the paper: S_ij, P_ij, dP_ij, dS_ij, D_i, dQ_i, dK_j, dV_j;
// "Alg. 2, line n" marks each phase.
#include "tiles.cuh"  // Br, Bc, LR, DC, flash2_V_stride, ceil_div, visible, load_tile

// Queries a thread takes at a time: their S and dP (2 x YB floats) live in registers beside dK and
// dV (2 x DC). Why not 16: the unrolled loop over c below then grows so long that nvcc (13.0) stops
// merging its reads of 4 consecutive floats into one 16-byte load, and reads them one at a time.
constexpr int YB = Br % 8 == 0 ? 8 : Br;
// Rows of K_j, V_j per loading group (a block has G * Bc keys). load_tile keeps one load per row in
// flight: 64 or more would spill registers.
constexpr int KG = Bc % 16 == 0 ? 16 : Bc;

// Shared memory, in floats, for a block of R keys: Q_i^T and dO_i^T (DV x LR each, rows d .. DV-1
// zero: a pass reads DC of them), dS_ij^T (R x LR), K_j and V_j (R x (d + 1): the odd stride puts
// the R rows a thread each walks in different banks), L_i and D_i (Br each).
__host__ __device__ inline int flash2_backward_shared_floats(int d, int R) {
    return (2 * flash2_V_stride(d) + R) * LR + 2 * R * (d + 1) + 2 * Br;
}

// Alg. 2, line 4: D = rowsum(dO * O), one thread per row. Every key block needs D_i for every
// query tile: computing it once, before the main kernel, costs one read of O.
__global__ void flash2_backward_D(const float* O, const float* dO, size_t rows, int d, float* D) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float D_row = 0.0f;
    for (int x = 0; x < d; ++x) D_row += dO[row * d + x] * O[row * d + x];
    D[row] = D_row;
}

__global__ void flash2_backward(const float* Q, const float* K, const float* V, const float* dO,
                                const float* L, const float* D, int N, int d, float scale,
                                bool causal, float* dQ, float* dK, float* dV) {
    const int R = blockDim.x, t = threadIdx.x, DV = flash2_V_stride(d);
    extern __shared__ __align__(16) float smem[];
    float* Q_iT = smem;             // DV x LR: thread t reads Q_i[y][x] for 4 y at once, a broadcast
    float* dO_iT = Q_iT + DV * LR;  // DV x LR
    float* dS_T = dO_iT + DV * LR;  // R x LR: row t is thread t's row of dS_ij^T
    float* K_j = dS_T + R * LR;     // R x (d + 1): row t is thread t's key
    float* V_j = K_j + R * (d + 1);
    float* L_i = V_j + R * (d + 1);
    float* D_i = L_i + Br;

    const size_t bh = blockIdx.y;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, dO += bh * N * d;
    dQ += bh * N * d, dK += bh * N * d, dV += bh * N * d, L += bh * N, D += bh * N;
    const int col0 = blockIdx.x * R, col = col0 + t, keys = min(R, N - col0), Tr = ceil_div(N, Br);
    // Causal: query tiles wholly before the block's first key are skipped. Block 0 has the most
    // work, and blocks run roughly in launch order: the heaviest start first.
    const int i0 = causal ? col0 / Br : 0;

    for (int e = t; e < (DV - d) * LR; e += R) Q_iT[d * LR + e] = dO_iT[d * LR + e] = 0.0f;
    // Alg. 2, line 6: groups of KG threads load KG rows each of the block's keys, as in flash.cu.
    const int g0 = t / KG * KG;
    load_tile<KG>(K_j + g0 * (d + 1), d + 1, 1, K, col0 + g0, N, d, t % KG, KG);
    load_tile<KG>(V_j + g0 * (d + 1), d + 1, 1, V, col0 + g0, N, d, t % KG, KG);

    for (int c0 = 0; c0 < d; c0 += DC) {  // one pass per DC columns of dK and dV
        float dK_row[DC] = {}, dV_row[DC] = {};  // Alg. 2, line 7
        for (int i = i0; i < Tr; ++i) {  // Alg. 2, lines 8-9: load Q_i, dO_i, L_i, D_i
            __syncthreads();  // all are done with the previous Q_i, dO_i, dS_T (and K_j, V_j are loaded)
            load_tile<Br>(Q_iT, 1, LR, Q, i * Br, N, d, t, R);
            load_tile<Br>(dO_iT, 1, LR, dO, i * Br, N, d, t, R);
            for (int y = t; y < Br; y += R) {  // a row past N gets L = +inf, so P = 0 and dS = 0
                L_i[y] = i * Br + y < N ? L[i * Br + y] : INFINITY;
                D_i[y] = i * Br + y < N ? D[i * Br + y] : 0.0f;
            }
            __syncthreads();  // Q_i, dO_i, L_i, D_i are complete before anyone reads them

            for (int y0 = 0; y0 < Br; y0 += YB) {
                float P[YB] = {}, dS[YB] = {};  // S_ij then P_ij; dP_ij then dS_ij, of this key
                for (int x = 0; x < d; ++x) {  // Alg. 2, lines 10 and 13
                    const float k = K_j[t * (d + 1) + x], v = V_j[t * (d + 1) + x];
#pragma unroll
                    for (int y = 0; y < YB; ++y) {
                        P[y] += k * Q_iT[x * LR + y0 + y];    // S_ij = Q_i K_j^T
                        dS[y] += v * dO_iT[x * LR + y0 + y];  // dP_ij = dO_i V_j^T
                    }
                }
#pragma unroll
                for (int y = 0; y < YB; ++y) {  // Alg. 2, lines 11 and 14
                    P[y] = visible(i * Br + y0 + y, col, N, causal) ? __expf(scale * P[y] - L_i[y0 + y]) : 0.0f;
                    dS[y] = P[y] * (dS[y] - D_i[y0 + y]);  // dS_ij = P_ij * (dP_ij - D_i)
                }
#pragma unroll
                for (int c = 0; c < DC; ++c) {  // Alg. 2, lines 12, 16: dV_j += P_ij^T dO_i, dK_j += dS_ij^T Q_i
#pragma unroll
                    for (int y = 0; y < YB; ++y) {
                        dV_row[c] += P[y] * dO_iT[(c0 + c) * LR + y0 + y];
                        dK_row[c] += dS[y] * Q_iT[(c0 + c) * LR + y0 + y];
                    }
                }
                if (c0 == 0)  // dS is the same in every pass: the first one adds it into dQ
#pragma unroll
                    for (int y = 0; y < YB; ++y) dS_T[t * LR + y0 + y] = dS[y];
            }
            if (c0 == 0) {
                __syncthreads();  // every key's row of dS_ij^T is complete
                // Alg. 2, line 15: dQ_i += scale * dS_ij K_j over this block's keys. Thread e takes YB
                // rows of dQ_i at column x; consecutive threads take consecutive x, so they read one
                // row of K_j (consecutive words) and the same values of dS_T (a broadcast).
                for (int e = t; e < Br / YB * d; e += R) {
                    const int x = e % d, y0 = e / d * YB;
                    float dq[YB] = {};
                    for (int k = 0; k < keys; ++k) {
                        const float K_kx = K_j[k * (d + 1) + x];
#pragma unroll
                        for (int y = 0; y < YB; ++y) dq[y] += dS_T[k * LR + y0 + y] * K_kx;
                    }
#pragma unroll
                    for (int y = 0; y < YB; ++y)
                        if (i * Br + y0 + y < N) atomicAdd(&dQ[(size_t)(i * Br + y0 + y) * d + x], scale * dq[y]);
                }
            }
        }
        if (col < N)  // Alg. 2, line 18
#pragma unroll
            for (int c = 0; c < DC; ++c)  // a constant index keeps dK_row, dV_row in registers
                if (c0 + c < d) {
                    dK[(size_t)col * d + c0 + c] = scale * dK_row[c];  // the scale left out above
                    dV[(size_t)col * d + c0 + c] = dV_row[c];
                }
    }
}

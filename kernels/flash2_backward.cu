// FlashAttention-2 backward pass (Dao, "FlashAttention-2", 2023, Algorithm 2), in fp32: the forward's
// loop order turned around. One block per (batch, head, tile of Bc = 64 keys): K_j and V_j stay in
// shared memory and dK_j, dV_j in registers for the whole pass, while the query tiles Q_i, dO_i of
// Br = 32 rows stream through shared memory. Compared with flash_backward.cu (Algorithm 4): dK_j
// and dV_j leave the chip once, final, and there are B * H * ceil(N / 64) blocks instead of B * H.
// The tiles arrive by cp.async, tile i + 1's copies in flight while dQ_i is computed.
//
// dQ_i = scale * sum_j dS_ij K_j sums over key tiles that now belong to different blocks. Each block
// adds its share into dQ with atomicAdd, as FlashAttention-2 does. The alternative, a second kernel
// that owns the query rows and recomputes S and dP, would redo 2 of the 5 matrix products. The
// price of atomics: dQ must start at 0, and the order of the additions, so dQ's last bits, varies
// from run to run. Same names as the paper: S_ij, P_ij, dP_ij, dS_ij, D_i, dQ_i, dK_j, dV_j;
// "Alg. 2, line n" marks each phase.
//
// Register tiling, as in flash2.cu: in each of the five matrix products of a step (i, j) a thread
// computes a block of outputs, so that each float it reads from shared memory feeds several
// multiply-adds, not one (shared memory, not arithmetic, would set the pace). The 128 threads take
//   S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T    4 keys x 4 queries each, over the d columns
//   dV_j += P_ij^T dO_i (warps 0-1), or
//   dK_j += dS_ij^T Q_i (warps 2-3)                8 keys x 8 columns, over the 32 queries
//   dQ_i += scale dS_ij K_j                        4 queries x 4 columns, over the 64 keys
// and P_ij, dS_ij go through shared memory, from the threads that compute them to those that
// multiply them. A thread reads 1/2 float per multiply-add in the 4 x 4 blocks and 1/4 in the 8 x 8
// ones. dV and dK go to different warps: one 8 x 8 block per thread, where both would be two 4 x 8
// blocks in the same 64 registers, reading 3/8. At d = 64 a block takes 168 registers per thread
// and 68 KB of shared memory: 3 blocks, 12 warps, fit on a multiprocessor, where one key per thread
// (232 registers) left room for 8 warps.
#include "tiles.cuh"     // ceil_div, visible
#include "vectors.cuh"   // load4, atomic_add4
#include "cp_async.cuh"  // cp_async16, cp_async4, cp_async_commit, cp_async_wait

namespace flash2_backward {

// Its own tile sizes, whatever the Br and Bc of the forward: queries per tile, keys per block, and
// threads. Tiles of 64 queries would need 103 KB of shared memory at d = 64 (2 blocks per
// multiprocessor, not 3) and more than a block may have at d = 200.
constexpr int Br = 32, Bc = 64, THREADS = 128;
// Columns of dK_j and dV_j a thread accumulates in registers per pass, as in flash2.cu.
constexpr int DC = 64;
// Row stride of P_ij and dS_ij (Br queries x Bc keys): Bc + 4 puts the 32 values that a warp
// stores at once, for 8 queries and 4 keys, in 32 different banks.
constexpr int LK = Bc + 4;

// Q_i, dO_i, K_j and V_j are stored by rows, as in global memory, so a thread reads 4 consecutive
// columns of a row as one 16-byte load, in each product. A row holds DV = d rounded up to DC
// (columns d .. DV-1 are zeros: a pass of dK, dV reads DC columns), plus 4: a stride of an odd
// number of 16-byte groups sends the 8 rows that a quarter-warp reads at the same column to 8
// different groups of 4 banks.
__host__ __device__ inline int padded_columns(int d) { return ceil_div(d, DC) * DC; }  // DV
__host__ __device__ inline int stride(int d) { return padded_columns(d) + 4; }

// Shared memory, in floats: K_j, V_j (Bc rows each), Q_i, dO_i (Br rows each), P_ij, dS_ij
// (Br x LK each), L_i and D_i (Br each).
__host__ __device__ inline int shared_floats(int d) {
    return 2 * (Bc + Br) * stride(d) + 2 * Br * LK + 2 * Br;
}

// Alg. 2, line 4: D = rowsum(dO * O), a warp per row: lanes on columns, so the reads coalesce, and
// the row's sum by shuffles. The same pass zeroes the row of dQ, into which the main kernel adds.
__global__ void rowsum_D(const float* O, const float* dO, size_t rows, int d, float* D, float* dQ) {
    const size_t row = (size_t)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // the warp's 32 lanes together: the shuffles below take them all
    float sum = 0.0f;
    for (int x = lane; x < d; x += 32) sum += dO[row * d + x] * O[row * d + x], dQ[row * d + x] = 0.0f;
    for (int lanes = 16; lanes > 0; lanes /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, lanes);
    if (lane == 0) D[row] = sum;
}

// Rows [row0, row0 + ROWS) of an N x d matrix into a tile stored by rows, stride ls, by cp.async
// (cp_async.cuh), not waited for here: all of a tile's copies fly at once, and none passes through
// registers (loads staged in registers waited a round trip to memory for every 8 rows). 16 lanes
// to a row, each copying 16 bytes where 4 divides d (minimal_flash.py passes 16-byte-aligned
// tensors, so every row starts aligned), else 4. Rows past N land as zeros.
template <int ROWS>
__device__ void load_rows_async(float* tile, int ls, const float* src, int row0, int N, int d) {
    constexpr int lanes = 16;
    const int width = d % 4 == 0 ? 4 : 1;
    for (int r = threadIdx.x / lanes; r < ROWS; r += THREADS / lanes) {
        const bool valid = row0 + r < N;
        const float* from = src + (size_t)(valid ? row0 + r : 0) * d;
        for (int x = threadIdx.x % lanes * width; x < d; x += lanes * width)
            if (width == 4)
                cp_async16(tile + r * ls + x, from + x, valid);
            else
                cp_async4(tile + r * ls + x, from + x, valid);
    }
}

// acc[r][c] += a[r] . b[c], 4 terms each: a 4 x 4 block of a matrix product, 4 steps of its sums.
__device__ inline void dot4x4(float (&acc)[4][4], const float (&a)[4][4], const float (&b)[4][4]) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c)
#pragma unroll
            for (int u = 0; u < 4; ++u) acc[r][c] += a[r][u] * b[c][u];
}

// acc[a][b] += A_a . B_b over the d columns, for rows A_a = A + 16 a ls (keys) and B_b = B + 8 b ls
// (queries): 4 columns at a time, 8 16-byte loads for 64 multiply-adds. The 8 threads of a
// quarter-warp read 4 consecutive rows of B and 2 of A (lanes as in the kernel): no bank conflicts.
// The kernel is bound by the instructions it issues (Nsight Compute, notebooks/results/README.md), so
// the column loop goes in whole passes of DC columns, each unrolled: every load's address is then a
// constant offset from the pass's start, with no arithmetic of its own.
__device__ void rows_times_rows(float (&acc)[4][4], const float* A, const float* B, int ls, int d) {
    for (int x0 = 0; x0 < d; x0 += DC)  // columns d .. DV-1 are zeros
#pragma unroll
        for (int x = x0; x < x0 + DC; x += 4) {
            float a[4][4], b[4][4];
#pragma unroll
            for (int r = 0; r < 4; ++r) load4(a[r], A + 16 * r * ls + x), load4(b[r], B + 8 * r * ls + x);
            dot4x4(acc, a, b);
        }
}

// 3 blocks per multiprocessor: nvcc then keeps to 168 registers (65536 / (3 * 128), down to a multiple of 8).
__global__ void __launch_bounds__(THREADS, 3)
    backward(const float* Q, const float* K, const float* V, const float* dO, const float* L, const float* D,
             int N, int d, float scale, bool causal, float* dQ, float* dK, float* dV) {
    const int t = threadIdx.x, DV = padded_columns(d), ls = stride(d);
    // smem: the block's shared memory, declared in tiles.cuh
    float* K_j = smem;              // Bc x ls
    float* V_j = K_j + Bc * ls;     // Bc x ls
    float* Q_i = V_j + Bc * ls;     // Br x ls
    float* dO_i = Q_i + Br * ls;    // Br x ls
    float* P_ij = dO_i + Br * ls;   // Br x LK
    float* dS_ij = P_ij + Br * LK;  // Br x LK
    float* L_i = dS_ij + Br * LK;   // Br
    float* D_i = L_i + Br;          // Br

    const size_t bh = blockIdx.y;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, dO += bh * N * d;
    dQ += bh * N * d, dK += bh * N * d, dV += bh * N * d, L += bh * N, D += bh * N;
    const int col0 = blockIdx.x * Bc, Tr = ceil_div(N, Br);
    // Causal: query tiles wholly before the block's first key are skipped. Block 0 has the most
    // work, and blocks run roughly in launch order: the heaviest start first.
    const int i0 = causal ? col0 / Br : 0;

    // Thread t's share of S_ij^T and dP_ij^T: keys kg + 16a, queries qg + 8b (a, b < 4). Bit 0 of
    // the lane goes to qg and bit 1 to kg, so lanes n and n ^ 1 read the same rows of K_j, V_j and
    // lanes n and n ^ 2 the same rows of Q_i, dO_i. A 16-byte load takes 4 passes of shared memory
    // (one 32-bit register per lane per pass), but 2 when such pairs of lanes read the same address
    // (NVIDIA's rule for Volta and Turing; an H100 counts the same): half the passes of qg = t % 8.
    const int lane = t % 32, qg = lane % 2 + lane / 4 % 4 * 2, kg = lane / 2 % 2 + lane / 16 * 2 + t / 32 * 4;
    // dV_j or dK_j, by the same lanes: keys 8kb .. 8kb+7 by columns 4cg .. 4cg+3 and 32+4cg .. 32+4cg+3
    // of a pass's DC. The 8 lanes of a quarter-warp then read 128 consecutive bytes of a row of Q_i
    // or dO_i, all 32 banks once; columns 8cg .. 8cg+7 sent lanes cg and cg + 4 to the same banks.
    const int kb = kg % 8, cg = qg;
    const bool dK_warp = t >= THREADS / 2;
    const float* PdS = dK_warp ? dS_ij : P_ij;  // dK_j += dS_ij^T Q_i, dV_j += P_ij^T dO_i
    const float* QdO = dK_warp ? Q_i : dO_i;
    float* out = dK_warp ? dK : dV;
    // dQ_i: queries q4 .. q4+3, columns 4 cq .. 4 cq + 3 of a pass: each of K_j's rows is one 16-byte
    // load, and each query's 4 sums one vector atomicAdd (vectors.cuh's atomic_add4).
    const int q4 = t / 16 * 4, cq = t % 16;

    // Alg. 2, lines 8-9 for query tile i: Q_i, dO_i, L_i, D_i by cp.async, one group, not waited
    // for here; L_i and D_i (adjacent) a float a thread. Rows past N land as zeros, L_i = D_i = 0
    // included: their P is exp(0 - 0) = 1 on visible keys, not 0, and still nothing they add is
    // wrong. Their dO rows are zero, so dP = 0 and dS = P (dP - D) = 0: dK += dS^T Q and
    // dV += P^T dO add zero, and dQ's rows past N are never stored.
    auto load_query_tile = [&](int i) {
        load_rows_async<Br>(Q_i, ls, Q, i * Br, N, d);
        load_rows_async<Br>(dO_i, ls, dO, i * Br, N, d);
        const int row = i * Br + t % Br;
        if (t < 2 * Br) cp_async4(L_i + t, (t < Br ? L : D) + (row < N ? row : 0), row < N);
        cp_async_commit();
    };
    // Columns d .. DV-1 of K_j, V_j, Q_i, dO_i (adjacent, 2 (Bc + Br) rows) are read but never
    // loaded: zero them once.
    for (int e = t; e < 2 * (Bc + Br) * (DV - d); e += THREADS)
        smem[e / (DV - d) * ls + d + e % (DV - d)] = 0.0f;
    load_rows_async<Bc>(K_j, ls, K, col0, N, d);  // Alg. 2, line 6
    load_rows_async<Bc>(V_j, ls, V, col0, N, d);
    load_query_tile(i0);  // the same group as K_j and V_j

    for (int c0 = 0; c0 < d; c0 += DC) {  // one pass per DC columns of dK and dV
        float acc[8][8] = {};             // Alg. 2, line 7: the thread's 8 x 8 block of dV_j or dK_j
        for (int i = i0; i < Tr; ++i) {
            cp_async_wait<0>();  // this thread's copies of tile i have landed ...
            __syncthreads();     // ... everyone's, and all are done with the previous P_ij, dS_ij

            float S[4][4] = {}, dP[4][4] = {};
            rows_times_rows(S, K_j + kg * ls, Q_i + qg * ls, ls, d);    // Alg. 2, line 10: S_ij^T
            rows_times_rows(dP, V_j + kg * ls, dO_i + qg * ls, ls, d);  // Alg. 2, line 13: dP_ij^T
#pragma unroll
            for (int a = 0; a < 4; ++a)
#pragma unroll
                for (int b = 0; b < 4; ++b) {  // Alg. 2, lines 11 and 14
                    const int q = qg + 8 * b, k = kg + 16 * a;
                    const float p =
                        visible(i * Br + q, col0 + k, N, causal) ? __expf(scale * S[a][b] - L_i[q]) : 0.0f;
                    P_ij[q * LK + k] = p;
                    dS_ij[q * LK + k] = p * (dP[a][b] - D_i[q]);  // dS_ij = P_ij * (dP_ij - D_i)
                }
            __syncthreads();  // P_ij, dS_ij are complete before anyone reads them

            // Alg. 2, line 12 (dV_j) or 16 (dK_j), query q at a time; unrolled by 4, for the same reason.
#pragma unroll 4
            for (int q = 0; q < Br; ++q) {
                float p[8], x[8];  // 4 16-byte loads, 64 multiply-adds
                load4(&p[0], &PdS[q * LK + 8 * kb]), load4(&p[4], &PdS[q * LK + 8 * kb + 4]);
                load4(&x[0], &QdO[q * ls + c0 + 4 * cg]), load4(&x[4], &QdO[q * ls + c0 + 32 + 4 * cg]);
#pragma unroll
                for (int r = 0; r < 8; ++r)
#pragma unroll
                    for (int c = 0; c < 8; ++c) acc[r][c] += p[r] * x[c];
            }
            __syncthreads();  // all are done with Q_i, dO_i, L_i, D_i: the next tile may land there
            // The next tile's copies fly while dQ_i is computed: the wait for memory overlaps
            // arithmetic. (After the last tile of a pass, the next pass starts again at tile i0.)
            if (i + 1 < Tr)
                load_query_tile(i + 1);
            else if (c0 + DC < d)
                load_query_tile(i0);

            // Alg. 2, line 15: dQ_i += scale * dS_ij K_j, in the first pass only (dS is the same in
            // every pass), DC columns at a time; keys 4 at a time, one 16-byte load each of dS for a
            // query and of K_j for a key.
            for (int cc = 0; c0 == 0 && cc < d; cc += DC) {
                float dq[4][4] = {};
                for (int k = 0; k < Bc; k += 4) {
                    float s[4][4], k4[4][4], kT[4][4];  // dS of 4 queries, K_j's 4 columns, at keys k .. k+3
#pragma unroll
                    for (int b = 0; b < 4; ++b) load4(s[b], &dS_ij[(q4 + b) * LK + k]);
#pragma unroll
                    for (int u = 0; u < 4; ++u) load4(k4[u], &K_j[(k + u) * ls + cc + 4 * cq]);
#pragma unroll
                    for (int v = 0; v < 4; ++v)
#pragma unroll
                        for (int u = 0; u < 4; ++u) kT[v][u] = k4[u][v];  // registers renamed, no moves
                    dot4x4(dq, s, kT);
                }
                const int col = cc + 4 * cq;
#pragma unroll
                for (int b = 0; b < 4; ++b) {
                    if (i * Br + q4 + b >= N || col >= d) continue;
                    float* to = &dQ[(size_t)(i * Br + q4 + b) * d + col];
                    if (d % 4 == 0)  // then col + 3 < d too, and the 4 floats are 16-byte aligned
                        atomic_add4(to, scale * dq[b][0], scale * dq[b][1], scale * dq[b][2],
                                    scale * dq[b][3]);
                    else
#pragma unroll
                        for (int v = 0; v < 4; ++v)
                            if (col + v < d) atomicAdd(to + v, scale * dq[b][v]);
                }
            }
        }
#pragma unroll
        for (int r = 0; r < 8; ++r)  // Alg. 2, line 18; a constant index keeps acc in registers
#pragma unroll
            for (int c = 0; c < 8; ++c) {
                const int key = col0 + 8 * kb + r, col = c0 + 4 * cg + c % 4 + 32 * (c / 4);
                if (key < N && col < d) out[(size_t)key * d + col] = dK_warp ? scale * acc[r][c] : acc[r][c];
            }
    }
}

}  // namespace flash2_backward

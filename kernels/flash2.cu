// FlashAttention-2 forward pass (Dao, "FlashAttention-2", 2023, Algorithm 1), in fp32: the loop
// order that keeps the whole GPU busy, and register tiling, which keeps its arithmetic units busy.
// One block per (batch, head, R query rows). Each row keeps its running max m, sum l and output
// accumulator O on chip for the whole pass while the K/V tiles stream through shared memory.
// Compared with flash.cu (the first paper's Algorithm 1): O, l and m never go through global
// memory, there are B * H * N / R blocks instead of B * H, and O is divided by l once, at the end.
// Names as in the paper: Q_i, K_j, V_j, S_ij, P_ij, m, l, O; "Alg. 1, line n" marks each phase of
// the FlashAttention-2 paper's Algorithm 1.
//
// Register tiling, as the matrix-product kernels 5-6 of siboehm/SGEMM_CUDA do: a thread computes a
// TM x TN block of S_ij and a TM x OC block of O. The 12 floats it reads from shared memory for one
// column x of S_ij then feed 32 multiply-adds; with one row per thread (flash.cu), each float of K_j
// and V_j fed one, and shared memory, not arithmetic, set the pace. Who owns what, Br = Bc = 32
// (TPR = Bc / TN = 4 threads per row group, consecutive lanes of one warp):
//
//                 S_ij = Q_i K_j^T (Br x Bc)              O (Br x d), a pass of DC = 64 columns
//               keys 0-7   8-15  16-23  24-31             col 0-3  4-7  8-11 12-15  16-19 ...
//   rows  0- 3 [  t0    |  t1  |  t2  |  t3  ]            [  t0  |  t1  |  t2  |  t3  |  t0  | ...
//   rows  4- 7 [  t4    |  t5  |  t6  |  t7  ]            [  t4  |  t5  |  t6  |  t7  |  t4  | ...
//   ...                                                   ...
//   rows 28-31 [ t28    | t29  | t30  | t31  ]            (a thread's OC = 16 columns: 4 groups of
//                                                          4, TPR groups apart)
// The TPR threads of a row agree on its max by warp shuffles, and P_ij goes through shared memory
// (transposed) to the threads that multiply it by V_j. A block holds G such tiles (R = G Br rows).
#include "tiles.cuh"    // Br, Bc, LD, ceil_div, visible, load_tile
#include "vectors.cuh"  // load4

namespace flash2 {

constexpr int TM = 4, TN = 8;  // a thread's rows and keys of S_ij (multiples of 4: whole float4s)
// Output columns a thread accumulates in registers per pass. A row with d > DC columns takes
// ceil(d / DC) passes, so that registers stay bounded (no spills).
constexpr int DC = 64;
// Version 2 takes Br a multiple of TM and Bc = 16, 32 or 64: then TPR is a power of two that fits in
// a warp, and OC, the thread's columns of O in a pass of DC, is 32, 16 or 8 (a whole number of
// 16-byte loads, and few enough registers). minimal_flash.py refuses other sizes; so does the launcher.
constexpr bool takes_block_sizes = Br % TM == 0 && (Bc == 16 || Bc == 32 || Bc == 64);
constexpr int TPR = takes_block_sizes ? Bc / TN : 1, OC = DC / TPR;
constexpr int TILE_THREADS = Br / TM * TPR;  // threads per tile of Br query rows
// V_j's row stride: d rounded up to whole passes of DC columns (the padding is zeros).
__host__ __device__ inline int V_stride(int d) { return ceil_div(d, DC) * DC; }

__global__ void forward(const float* Q, const float* K, const float* V, int N, int d, float scale,
                        bool causal, float* O, float* L) {
    // Thread t owns rows r0 .. r0 + TM - 1 of the block's R and keys k0 .. k0 + TN - 1 of K_j. Of
    // each pass of DC columns of O it owns the groups of 4 columns kg, kg + TPR, kg + 2 TPR, ...: so
    // the TPR threads of a row read TPR adjacent groups of a row of V_j at once, 16 * TPR bytes in a
    // row, free of bank conflicts (OC adjacent columns each would be 2-way conflicted).
    const int t = threadIdx.x, kg = t % TPR, r0 = t / TPR * TM, k0 = kg * TN;
    const int R = blockDim.x / TILE_THREADS * Br;  // the block's rows: G tiles of Br
    const int LQ = R + 4, LV = V_stride(d);        // LQ: R padded, as LD pads Bc
    // smem: the block's shared memory, declared in tiles.cuh
    float* Q_iT = smem;            // d x LQ: Q_i transposed, a thread's TM rows at x are TM / 4 float4s
    float* K_jT = Q_iT + d * LQ;   // d x LD: K_j transposed, a thread's TN keys at x are TN / 4 float4s
    float* V_j = K_jT + d * LD;    // Bc x LV: a thread's OC columns of row y are OC / 4 float4s
    float* P_ijT = V_j + Bc * LV;  // Bc x LQ: P_ij transposed, a thread's TM rows at key y: TM / 4 float4s

    const size_t bh = blockIdx.y;  // this block's (batch, head) slice
    Q += bh * N * d, K += bh * N * d, V += bh * N * d, O += bh * N * d, L += bh * N;
    // Causal: later query tiles see more keys. Blocks run roughly in launch order, so the heaviest
    // are launched first and the light ones fill in the gaps at the end.
    const int tile = causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int row0 = tile * R, Tc = ceil_div(N, Bc);
    // Causal tiles are skipped, not masked one by one: key tile j is needed only while j * Bc is at
    // most the block's last row.
    const int j_end = causal ? min(Tc, (min(row0 + R, N) - 1) / Bc + 1) : Tc;

    // V_j's columns d .. LV-1 are read (a pass covers DC columns) but never loaded: zero them once.
    for (int e = t; e < Bc * (LV - d); e += blockDim.x) V_j[e / (LV - d) * LV + d + e % (LV - d)] = 0.0f;
    // Alg. 1, line 4: the TPR threads of rows r0 .. r0 + TM - 1 load them, transposed.
    load_tile<TM>(Q_iT + r0, 1, LQ, Q, row0 + r0, N, d, kg, TPR);

    for (int c0 = 0; c0 < d; c0 += DC) {  // one pass per DC columns of O
        // Alg. 1, line 5. l is this thread's share: the sum over its own keys, added up at the end.
        float o[TM][OC] = {}, m[TM], l[TM] = {};
#pragma unroll
        for (int i = 0; i < TM; ++i) m[i] = -INFINITY;
        for (int j = 0; j < j_end; ++j) {  // Alg. 1, lines 6-7: load K_j, V_j
            __syncthreads();  // all are done with the previous K_j, V_j, P_ij (Q_i and the zeros are written)
            load_tile<Bc>(K_jT, 1, LD, K, j * Bc, N, d, t, blockDim.x);
            load_tile<Bc>(V_j, LV, 1, V, j * Bc, N, d, t, blockDim.x);
            __syncthreads();  // K_j, V_j are complete before anyone reads them

            float s[TM][TN] = {};  // Alg. 1, line 8: S_ij = Q_i K_j^T, the thread's TM x TN block
            // Unrolled 4 times, so that the compiler issues the next x's loads before this x's sums.
#pragma unroll 4
            for (int x = 0; x < d; ++x) {
                float q[TM], k[TN];  // (TM + TN) / 4 loads, TM * TN multiply-adds
#pragma unroll
                for (int i = 0; i < TM; i += 4) load4(&q[i], &Q_iT[x * LQ + r0 + i]);
#pragma unroll
                for (int y = 0; y < TN; y += 4) load4(&k[y], &K_jT[x * LD + k0 + y]);
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int y = 0; y < TN; ++y) s[i][y] += q[i] * k[y];
            }
#pragma unroll
            for (int i = 0; i < TM; ++i) {  // Alg. 1, line 9: the new running max, then P_ij and l
                const int row = row0 + r0 + i;
                float m_tile = -INFINITY;
#pragma unroll
                for (int y = 0; y < TN; ++y) {
                    s[i][y] = visible(row, j * Bc + k0 + y, N, causal) ? s[i][y] * scale : -INFINITY;
                    m_tile = fmaxf(m_tile, s[i][y]);
                }
                for (int lane = 1; lane < TPR; lane *= 2)  // the max over the row's TPR threads
                    m_tile = fmaxf(m_tile, __shfl_xor_sync(0xffffffffu, m_tile, lane));
                // The old O and l were summed relative to the old max: rescale them to the new one. A
                // row that has seen no key yet has m = m_new = -inf, and nothing to rescale.
                const float m_new = fmaxf(m[i], m_tile);
                const float alpha = m_new == -INFINITY ? 1.0f : __expf(m[i] - m_new);
                m[i] = m_new, l[i] *= alpha;
#pragma unroll
                for (int c = 0; c < OC; ++c) o[i][c] *= alpha;
#pragma unroll
                for (int y = 0; y < TN; ++y) {
                    const float p = s[i][y] == -INFINITY ? 0.0f : __expf(s[i][y] - m_new);
                    l[i] += p;
                    P_ijT[(k0 + y) * LQ + r0 + i] = p;
                }
            }
            __syncthreads();                // P_ij is complete before anyone reads it
            for (int y = 0; y < Bc; ++y) {  // Alg. 1, line 10: O += P_ij V_j, row y of V_j at a time
                float p[TM], v[OC];         // (TM + OC) / 4 loads, TM * OC multiply-adds
#pragma unroll
                for (int i = 0; i < TM; i += 4) load4(&p[i], &P_ijT[y * LQ + r0 + i]);
#pragma unroll
                for (int c = 0; c < OC; c += 4) load4(&v[c], &V_j[y * LV + c0 + 4 * kg + TPR * c]);
#pragma unroll
                for (int i = 0; i < TM; ++i)
#pragma unroll
                    for (int c = 0; c < OC; ++c) o[i][c] += p[i] * v[c];
            }
        }
#pragma unroll
        for (int i = 0; i < TM; ++i) {  // Alg. 1, lines 12-15: O = O / l, L = m + log(l), written
            for (int lane = 1; lane < TPR; lane *= 2)  // the row's l: its TPR threads' shares added up
                l[i] += __shfl_xor_sync(0xffffffffu, l[i], lane);
            const int row = row0 + r0 + i;
            if (row >= N) continue;
#pragma unroll
            for (int c = 0; c < OC; ++c)                         // a constant index keeps o[][] in registers
                if (c0 + 4 * kg + TPR * (c & ~3) + (c & 3) < d)  // o[i][c]'s column, as read from V_j
                    O[(size_t)row * d + c0 + 4 * kg + TPR * (c & ~3) + (c & 3)] = o[i][c] / l[i];
            if (c0 == 0 && kg == 0) L[row] = m[i] + logf(l[i]);  // every pass finds the same m and l
        }
    }
}

// Shared memory, in floats, for a block of R query rows: Q_i^T (d x LQ), K_j^T (d x LD), V_j
// (Bc x LV), P_ij^T (Bc x LQ).
__host__ __device__ inline int shared_floats(int d, int R) {
    return (d + Bc) * (R + 4) + d * LD + Bc * V_stride(d);
}

}  // namespace flash2

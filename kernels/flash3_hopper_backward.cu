// FlashAttention-3's backward pass on Hopper (chapter 4): bf16 or fp16 in, fp32 accumulation, dK, dV in
// the input's type, dQ summed in fp32. The loop order of chapter 3's backward (flash2_mma_backward.cu,
// Algorithm 2 of the FlashAttention-2 paper: a block owns keys, walks the query tiles), with chapter
// 4's tools (kernels/hopper.cuh): Q_i and dO_i arrive by TMA in a ring of STAGES buffers counted on
// mbarriers; K_j and V_j once, at the start; all five products are wgmma:
//   S_ij^T  = K_j Q_i^T      SS   64 keys x 64 queries per consumer, from shared memory
//   dP_ij^T = V_j dO_i^T     SS
//   dV_j   += P_ij^T dO_i    RS   P^T from the registers where the softmax left it; dO_i read MN-major
//   dK_j   += dS_ij^T Q_i    RS   dS^T likewise
//   dQ_i    = dS_ij K_j      SS   dS^T through shared memory (A read MN-major), K_j MN-major
// and dQ_i, which sums over every block's keys, is added into an fp32 copy of dQ by the copy engine
// (bulk_reduce_add: one request per tile, not an atomic per element as in chapter 3), in whatever
// order blocks get there, so dQ's last bits vary run to run; with `deterministic`, each share waits
// for the shares of the keys before it (a counter per query tile in global memory), at a cost.
// D = rowsum(dO * O) before and dQ's conversion after are chapter 3's kernels.
// Names as in the paper; "Alg. 2, line n" numbered as in flash2_backward.cu.
//
// Who owns what: one block per (batch, head, Bc = 128 keys), 2 warpgroups of 128 threads.
//
//   warpgroup 0   keys  0- 63: S^T, dP^T (64 x 64) for the tile, dK_j, dV_j (64 x d) for the whole pass
//   warpgroup 1   keys 64-127: the same
//   thread 0 also issues the copies: K_j, V_j once; Q_i, dO_i into stage i % STAGES once every
//   consumer warp has released the tile before
//
//   shared memory (1024-byte aligned; 16-bit tiles in sub-tiles of 64 columns, 128-byte swizzled)
//     K_j, V_j          Bc x d each                TMA, read by both warpgroups' wgmma
//     Q_i, dO_i         STAGES x (Br x d) each     the ring: TMA writes, wgmma reads
//     dS_ij^T           Bc x Br                    each warpgroup its 64 rows: stores, then its wgmma
//     dQ_i's share      2 x (Br x d) fp32          each warpgroup's: stores, then the copy engine
//     L_i, D_i          2 x STAGES x 2 x Br fp32   each warpgroup loads its own, by ordinary loads
//
//   within a warpgroup, warp w holds keys 16w .. 16w + 15 of its 64, lane (g, q) keys g and g + 8
//   and, of every 8 query columns, 2q and 2q + 1 (the accumulator layout of kernels/hopper.cuh).
#include "tiles.cuh"   // ceil_div
#include "mma.cuh"     // pack<T>, a_operands, mask_fragment, fast_exp2, LOG2E
#include "hopper.cuh"  // tma_load, mbarrier_*, wgmma_*, named_barrier_*, bulk_reduce_add

namespace flash3_hopper_backward {

constexpr int CONSUMERS = 2, THREADS = 128 * CONSUMERS;
constexpr int Bc = 64 * CONSUMERS, Br = 64;  // keys per block, queries per tile
constexpr int STAGES = 2;                    // Q_i, dO_i buffers in the ring
constexpr int SUB = 64;                      // columns of a swizzled sub-tile: 128 bytes

// Shared memory, in bytes from the 1024-aligned start.
template <int d>
struct Shared {
    static constexpr int K = 0, V = K + Bc * d * 2, Q = V + Bc * d * 2, dO = Q + STAGES * Br * d * 2,
                         dS = dO + STAGES * Br * d * 2, dQ = dS + Bc * Br * 2,
                         LD = dQ + CONSUMERS * Br * d * 4, BARRIERS = LD + CONSUMERS * STAGES * 2 * Br * 4;
    static constexpr int bytes = BARRIERS + (1 + 2 * STAGES) * 8 + 1024;  // + room to align the start
};
inline size_t shared_bytes(int d) { return d == 64 ? Shared<64>::bytes : Shared<128>::bytes; }

// The block's tiles and barriers.
template <int d>
struct Tiles {
    unsigned short *K, *V, *Q, *dO, *dS;  // sub-tile c of Q's stage s: Q + (s * d / SUB + c) * Br * SUB
    float *dQ, *LD;
    uint64_t *KV_full, *QdO_full, *QdO_empty;

    __device__ explicit Tiles(char* base) {
        K = reinterpret_cast<unsigned short*>(base + Shared<d>::K);
        V = reinterpret_cast<unsigned short*>(base + Shared<d>::V);
        Q = reinterpret_cast<unsigned short*>(base + Shared<d>::Q);
        dO = reinterpret_cast<unsigned short*>(base + Shared<d>::dO);
        dS = reinterpret_cast<unsigned short*>(base + Shared<d>::dS);
        dQ = reinterpret_cast<float*>(base + Shared<d>::dQ);
        LD = reinterpret_cast<float*>(base + Shared<d>::LD);
        KV_full = reinterpret_cast<uint64_t*>(base + Shared<d>::BARRIERS);
        QdO_full = KV_full + 1, QdO_empty = QdO_full + STAGES;
    }
    __device__ unsigned short* Q_stage(int s) const { return Q + s * Br * d; }
    __device__ unsigned short* dO_stage(int s) const { return dO + s * Br * d; }
};

// Alg. 2, lines 8-9 (the copy engine's part): Q_i and dO_i into stage s = t % STAGES of the ring (t:
// the block's t-th tile), once every consumer warp has released the tile that used it before. The
// parities as in the forward's load_KV.
template <int d>
__device__ void load_QdO(const Tiles<d>& t, const CUtensorMap* tmQ, const CUtensorMap* tmdO, int tile, int i,
                         int bh) {
    const int s = tile % STAGES;
    mbarrier_wait(&t.QdO_empty[s], (tile / STAGES + 1) % 2);
    mbarrier_arrive_expect_tx(&t.QdO_full[s], 2 * Br * d * 2);
    for (int c = 0; c < d / SUB; ++c) {
        tma_load(t.Q_stage(s) + c * Br * SUB, tmQ, c * SUB, i * Br, bh, &t.QdO_full[s]);
        tma_load(t.dO_stage(s) + c * Br * SUB, tmdO, c * SUB, i * Br, bh, &t.QdO_full[s]);
    }
}

// Descriptors (kernels/hopper.cuh): the 16 columns 16 kk .. of a K-major tile of `rows` rows; the 16
// rows 16 kb .. of an MN-major one (rows of N values, sub-tiles of 64 `rows` x 128 bytes apart).
__device__ inline uint64_t k_major(const unsigned short* tile, int rows, int kk) {
    return smem_descriptor(shared_address(tile + kk / 4 * rows * SUB + kk % 4 * 16), 16, 1024);
}
__device__ inline uint64_t mn_major(const unsigned short* tile, int rows, int kb) {
    return smem_descriptor(shared_address(tile + kb * 16 * SUB), rows * SUB * 2, 1024);
}

// Byte offset of (row, col) in a tile of rows of 64 16-bit values with the 128-byte swizzle.
__device__ inline int swizzled(int row, int col) {
    return row * 128 + ((col / 8) ^ (row % 8)) * 16 + col % 8 * 2;
}

template <class T, int d>
__global__ void __launch_bounds__(THREADS, 1)
    backward(const __grid_constant__ CUtensorMap tmK, const __grid_constant__ CUtensorMap tmV,
             const __grid_constant__ CUtensorMap tmQ, const __grid_constant__ CUtensorMap tmdO,
             const float* L, const float* D, int N, float scale, bool causal, float* dQ_sum,
             unsigned short* dK, unsigned short* dV, bool deterministic, int* turns) {
    // smem: the block's shared memory (tiles.cuh); its start rounded up to 1024 bytes for the swizzle
    char* base = reinterpret_cast<char*>(smem);
    base += (1024 - shared_address(base) % 1024) % 1024;
    const Tiles<d> t(base);

    const int bh = blockIdx.y, key0 = blockIdx.x * Bc, Tr = ceil_div(N, Br);
    const int i_first = causal ? key0 / Br : 0;  // causal: earlier queries see none of these keys
    const int n = Tr - i_first;                  // query tiles to visit
    L += size_t(bh) * N, D += size_t(bh) * N;

    if (threadIdx.x == 0) {
        mbarrier_init(t.KV_full, 1);
        for (int s = 0; s < STAGES; ++s) mbarrier_init(&t.QdO_full[s], 1), mbarrier_init(&t.QdO_empty[s], 8);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // Alg. 2, line 6: K_j, V_j; then the first tiles of the ring
        mbarrier_arrive_expect_tx(t.KV_full, 2 * Bc * d * 2);
        for (int c = 0; c < d / SUB; ++c) {
            tma_load(t.K + c * Bc * SUB, &tmK, c * SUB, key0, bh, t.KV_full);
            tma_load(t.V + c * Bc * SUB, &tmV, c * SUB, key0, bh, t.KV_full);
        }
        for (int tile = 0; tile < min(n, STAGES); ++tile) load_QdO(t, &tmQ, &tmdO, tile, i_first + tile, bh);
    }

    const int consumer = threadIdx.x / 128, tid = threadIdx.x % 128, w = tid / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, q = lane % 4;
    const int warp_key = key0 + 64 * consumer + 16 * w, key = warp_key + g;  // the lane's keys: key, key + 8
    const unsigned short *K_c = t.K + 64 * consumer * SUB,
                         *V_c = t.V + 64 * consumer * SUB;  // its keys' rows
    unsigned short* dS_c = t.dS + 64 * consumer * SUB;
    float* dQ_c = t.dQ + consumer * Br * d;
    const float c = scale * LOG2E;
    const int bar = 1 + consumer;  // the warpgroup's named barrier: its 128 threads

    float dv[d / 8][4] = {}, dk[d / 8][4] = {};  // Alg. 2, line 7
    mbarrier_wait(t.KV_full, 0);
    for (int tile = 0; tile < n; ++tile) {
        const int i = i_first + tile, q0 = i * Br, s = tile % STAGES;
        // L_i and D_i for this tile's queries, into this warpgroup's buffer of stage s (its last
        // readers, two tiles ago, are past the barriers since). Thread 0 first waits until the copy
        // engine has read the previous tile's dQ share, which the loop below overwrites.
        float* LD_c = t.LD + (consumer * STAGES + s) * 2 * Br;
        if (tid == 0) bulk_wait_read<0>();
        if (tid < 2 * Br) {
            const int row = q0 + tid % Br;
            LD_c[tid] = row < N ? (tid < Br ? L[row] * LOG2E : D[row]) : 0.0f;  // L in log2 units
        }
        named_barrier_sync(bar, 128);
        mbarrier_wait(&t.QdO_full[s], tile / STAGES % 2);
        const unsigned short *Q_t = t.Q_stage(s), *dO_t = t.dO_stage(s);

        // Alg. 2, lines 11 and 13: S^T = K_j Q_i^T and dP^T = V_j dO_i^T, issued together.
        float st[Br / 8][4], dpt[Br / 8][4];
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < d / 16; ++kk)
            wgmma_ss<T, Br>(st, k_major(K_c, Bc, kk), k_major(Q_t, Br, kk), kk > 0);
        wgmma_commit();
#pragma unroll
        for (int kk = 0; kk < d / 16; ++kk)
            wgmma_ss<T, Br>(dpt, k_major(V_c, Bc, kk), k_major(dO_t, Br, kk), kk > 0);
        wgmma_commit();

        // Alg. 2, line 12: P^T = exp(scale S^T - L), masked where the tile crosses the end of the
        // sequence or, causal, the diagonal (KEYS_ARE_ROWS: the rows are keys). Under dP's products.
        wgmma_wait<1>(st);
        if (q0 + Br > N || key0 + Bc > N || (causal && warp_key + 15 > q0))
            mask_fragment<true>(st, key, q0 + 2 * q, N, causal, -INFINITY);
#pragma unroll
        for (int n8 = 0; n8 < Br / 8; ++n8)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                st[n8][e] = fast_exp2(fmaf(st[n8][e], c, -LD_c[8 * n8 + 2 * q + e % 2]));
        // Alg. 2, line 14: dS^T = P^T * (dP^T - D), stored for dQ's product (swizzled, as TMA would).
        wgmma_wait<0>(dpt);
#pragma unroll
        for (int n8 = 0; n8 < Br / 8; ++n8)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                dpt[n8][e] = st[n8][e] * (dpt[n8][e] - LD_c[Br + 8 * n8 + 2 * q + e % 2]);
        unsigned p[Br / 16][4], ds[Br / 16][4];  // as A operands: 16 queries a step
        a_operands<T, Br>(p, st);
        a_operands<T, Br>(ds, dpt);
#pragma unroll
        for (int n8 = 0; n8 < Br / 8; ++n8)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                *reinterpret_cast<unsigned*>(reinterpret_cast<char*>(dS_c) +
                                             swizzled(16 * w + g + 8 * r, 8 * n8 + 2 * q)) =
                    pack<T>(dpt[n8][2 * r], dpt[n8][2 * r + 1]);
        fence_proxy_async();  // the stores, before wgmma reads them
        named_barrier_sync(bar, 128);

        // Alg. 2, lines 15-17: dV_j += P^T dO_i, dK_j += dS^T Q_i (A from registers), and this
        // warpgroup's share of dQ_i = dS K_j (its 64 keys; A = dS read from dS^T, MN-major).
        float dq[d / 8][4];
        wgmma_fence();
#pragma unroll
        for (int kb = 0; kb < Br / 16; ++kb) wgmma_rs<T, d>(dv, p[kb], mn_major(dO_t, Br, kb), true);
#pragma unroll
        for (int kb = 0; kb < Br / 16; ++kb) wgmma_rs<T, d>(dk, ds[kb], mn_major(Q_t, Br, kb), true);
#pragma unroll
        for (int kb = 0; kb < 64 / 16; ++kb)
            wgmma_ss<T, d, true, true>(dq, smem_descriptor(shared_address(dS_c + kb * 16 * SUB), 16, 1024),
                                       mn_major(K_c, Bc, kb), kb > 0);
        wgmma_commit();
        wgmma_wait<0>(dv, dk, dq);
        if (lane == 0) mbarrier_arrive(&t.QdO_empty[s]);  // Q_i, dO_i are free for tile + STAGES
        if (threadIdx.x == 0 && tile + STAGES < n) load_QdO(t, &tmQ, &tmdO, tile + STAGES, i + STAGES, bh);

        // dQ_i's share into the fp32 sums: through shared memory, one copy-engine request (rows past
        // N left out: they belong to the next slice).
#pragma unroll
        for (int n8 = 0; n8 < d / 8; ++n8)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float* to = &dQ_c[(16 * w + g + 8 * r) * d + 8 * n8 + 2 * q];
                to[0] = dq[n8][2 * r], to[1] = dq[n8][2 * r + 1];
            }
        fence_proxy_async();
        named_barrier_sync(bar, 128);
        if (tid == 0) {
            // deterministic: the shares of dQ_i are added in one order, by key: this warpgroup's turn
            // comes after the 2 blockIdx.x + consumer shares of the keys before its own.
            int* turn = turns + size_t(bh) * Tr + i;
            if (deterministic) wait_until_equal(turn, 2 * blockIdx.x + consumer);
            bulk_reduce_add(dQ_sum + (size_t(bh) * N + q0) * d, dQ_c, unsigned(min(Br, N - q0) * d * 4));
            bulk_commit();
            if (deterministic) bulk_wait<0>(), release_increment(turn);  // added: the next may go
        }
    }
    if (tid == 0) bulk_wait<0>();  // the sums are complete when the kernel is

    // Alg. 2, lines 20-21: dK_j (times the scale: dS was taken of the scaled scores), dV_j.
    dK += size_t(bh) * N * d, dV += size_t(bh) * N * d;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int k = key + 8 * r;
        if (k >= N) continue;
#pragma unroll
        for (int n8 = 0; n8 < d / 8; ++n8) {
            *reinterpret_cast<unsigned*>(&dK[size_t(k) * d + 8 * n8 + 2 * q]) =
                pack<T>(scale * dk[n8][2 * r], scale * dk[n8][2 * r + 1]);
            *reinterpret_cast<unsigned*>(&dV[size_t(k) * d + 8 * n8 + 2 * q]) =
                pack<T>(dv[n8][2 * r], dv[n8][2 * r + 1]);
        }
    }
}

}  // namespace flash3_hopper_backward

// FlashAttention-3's backward pass on Hopper (chapter 4): bf16 or fp16 in, fp32 accumulation, dK, dV in
// the input's type, dQ summed in fp32. The loop order of chapter 3's backward (flash2_mma_backward.cu,
// Algorithm 2 of the FlashAttention-2 paper: a block owns keys, walks the query tiles), with chapter
// 4's tools (kernels/hopper.cuh): Q_i and dO_i arrive by TMA in a ring of STAGES buffers counted on
// mbarriers; K_j and V_j once, at the start; all five products are wgmma:
//   S_ij^T  = K_j Q_i^T      SS   64 keys x 64 queries per consumer, from shared memory
//   dP_ij^T = V_j dO_i^T     SS
//   dV_j   += P_ij^T dO_i    RS   P^T from the registers where the softmax left it; dO_i read MN-major
//   dK_j   += dS_ij^T Q_i    RS   dS^T likewise
//   dQ_i    = dS_ij K_j      SS   half of d's columns per consumer, over all Bc keys: dS^T through
//                                 shared memory (A read MN-major), K_j MN-major
// and dQ_i, which sums over every block's keys, is added into fp32 sums of dQ by the copy engine
// (bulk_reduce_add: one request per tile and warpgroup, not an atomic per element as in chapter 3),
// in whatever order blocks get there, so dQ's last bits vary run to run; with `deterministic`, each
// share waits for the shares of the keys before it (a counter per query tile in global memory).
// The sums are kept in the order the warps hold them (see "The fp32 sums of dQ" below), so that a
// warp's stores to shared memory are 512 contiguous bytes; convert_dQ puts them back in rows. D = rowsum(dO * O)
// comes from a pre-pass that also zeroes the sums (preprocess, at the end).
// Names as in the paper; "Alg. 2, line n" numbered as in flash2_backward.cu.
// Q, K, V and dO are read where the caller has them: through 4-D tensor maps (column, row, head,
// batch) with their own strides (version4.cuh), and dO by the pre-pass with the same strides, so a
// model's permuted views and the gradient of its (B, T, H, d) output need no copy. O (the forward's) is
// read, and dQ, dK, dV written, with their strides too, which minimal_flash.py makes those of O's q and
// of q, k, v (a model's (B, T, H, d) layout: its gradients then flow back without a copy); L is
// contiguous.
//
// Who owns what: one block per (batch, head, Bc = 128 keys), 3 warpgroups of 128 threads.
//
//   warpgroup 0, producer   thread 0 issues every copy: K_j, V_j once; the block's t-th Q_i, dO_i
//                           into stage t % STAGES once every consumer thread has released the tile
//                           before; with a mask, it walks the block mask and sends each tile's Step
//                           with it. Its registers go to the consumers (setmaxnreg).
//   warpgroup 1, consumer 0 keys  0- 63: S^T, dP^T (64 x 64) for the tile, dK_j, dV_j (64 x d) for the
//                           whole pass; dQ_i's first d/2 columns (64 x d/2) for the tile, over all
//                           128 keys
//   warpgroup 2, consumer 1 keys 64-127: the same; dQ_i's last d/2 columns
//
//   shared memory (1024-byte aligned; 16-bit tiles in sub-tiles of 64 columns, 128-byte swizzled)
//     K_j, V_j          Bc x d each                TMA, read by both consumers' wgmma
//     Q_i, dO_i         STAGES x (Br x d) each     the ring: TMA writes, wgmma reads
//     dS_ij^T           2 x (Bc x Br)              each consumer its 64 rows, both read all of it;
//                                                  two buffers, tile % 2, as a consumer may store the
//                                                  next tile's while the other still reads this one's
//     dQ_i's share      Br x d fp32                each consumer its columns: stores, then the copy engine
//     L_i, D_i          2 x STAGES x 2 x Br fp32   each consumer its own, by ordinary loads a tile ahead
//     Step              STAGES                     (mask) the producer's walk: it stores, consumers read
//     dK_j, dV_j        2 x Bc rows of d + 8 values at the end, over K_j, V_j and the ring (free by then):
//                                                  each consumer stores its 64 rows, then copies them out
//
//   within a consumer, warp w holds keys 16w .. 16w + 15 of its 64, lane (g, q) keys g and g + 8
//   and, of every 8 query columns, 2q and 2q + 1 (the accumulator layout of kernels/hopper.cuh).
#include "tiles.cuh"   // ceil_div
#include "mma.cuh"     // pack<T>, a_operands, mask_fragment, fast_exp2, LOG2E, warp_sum
#include "hopper.cuh"  // tma_load, mbarrier_*, wgmma_*, named_barrier_*, bulk_reduce_add
#include "mods.cuh"    // chapter 6's hooks: mods::backward_probabilities, mods::Walk (no-ops without mods)

namespace flash3_hopper_backward {

constexpr int CONSUMERS = 2, THREADS = 128 * (1 + CONSUMERS);  // a producer warpgroup, then the consumers
constexpr int Bc = 64 * CONSUMERS, Br = 64;                    // keys per block, queries per tile
constexpr int STAGES = 2;                                      // Q_i, dO_i buffers in the ring
constexpr int SUB = 64;                                        // columns of a swizzled sub-tile: 128 bytes

// The fp32 sums of dQ: query tile by query tile (Tr = ceil(N / Br) a slice, the last one padded),
// Br x d floats each, in the order the warps hold them (kernels/hopper.cuh): by consumer (its d/2
// columns), warp (16 rows), 8 columns, lane, then the lane's 4 values.

// Chapter 6, a mask: what the producer's walk found for the tile in a stage, published beside it (as
// the forward's Step), so that the consumers neither walk the block mask nor read it: the tile walked
// after the next one (`Tr` if none; its L_i, D_i are loaded a tile ahead), and the block mask's tile
// under each consumer's 64 keys and this tile's 64 queries.
struct Step {
    int after;
    mods::Tile state[CONSUMERS];
};

// Shared memory, in bytes from the 1024-aligned start.
template <int d>
struct Shared {
    static constexpr int K = 0, V = K + Bc * d * 2, Q = V + Bc * d * 2, dO = Q + STAGES * Br * d * 2,
                         dS = dO + STAGES * Br * d * 2, dQ = dS + 2 * Bc * Br * 2, LD = dQ + Br * d * 4,
                         BARRIERS = LD + CONSUMERS * STAGES * 2 * Br * 4, STEPS = BARRIERS + (1 + 2 * STAGES) * 8;
    static constexpr int bytes = STEPS + STAGES * sizeof(Step) + 1024;  // + room to align the start
};
inline size_t shared_bytes(int d) { return d == 64 ? Shared<64>::bytes : Shared<128>::bytes; }

// The block's tiles and barriers.
template <int d>
struct Tiles {
    unsigned short *K, *V, *Q, *dO, *dS;  // sub-tile c of Q's stage s: Q + (s * d / SUB + c) * Br * SUB
    float *dQ, *LD;
    uint64_t *KV_full, *QdO_full, *QdO_empty;
    Step* step;  // step[s]: the walk at stage s's tile (mods)

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
        step = reinterpret_cast<Step*>(base + Shared<d>::STEPS);
    }
    __device__ unsigned short* Q_stage(int s) const { return Q + s * Br * d; }
    __device__ unsigned short* dO_stage(int s) const { return dO + s * Br * d; }
    __device__ unsigned short* dS_buffer(int s) const { return dS + s * Bc * Br; }
};

// Alg. 2, lines 8-9 (the copy engine's part): Q_i and dO_i into stage s = it % STAGES of the ring (it:
// the block's it-th tile walked), once every consumer thread has released the tile that used it before.
// The parities as in the forward's load_KV. With a mask, the walk's Step goes with Q_i: the consumers
// read it once QdO_full says Q_i has landed (the arrival releases the store).
template <int d>
__device__ void load_QdO(const Tiles<d>& t, const CUtensorMap* tmQ, const CUtensorMap* tmdO, int it, int i,
                         int h, int b, const Step& step = {}) {
    const int s = it % STAGES;
    mbarrier_wait(&t.QdO_empty[s], (it / STAGES + 1) % 2);
    if constexpr (mods::MASK) t.step[s] = step;
    mbarrier_arrive_expect_tx(&t.QdO_full[s], 2 * Br * d * 2);
    for (int c = 0; c < d / SUB; ++c) {
        tma_load(t.Q_stage(s) + c * Br * SUB, tmQ, c * SUB, i * Br, h, b, &t.QdO_full[s]);
        tma_load(t.dO_stage(s) + c * Br * SUB, tmdO, c * SUB, i * Br, h, b, &t.QdO_full[s]);
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
             const float* L, const float* D, int N, int H, float scale, bool causal, float* dQ_sum,
             unsigned short* dK, Strides dK_strides, unsigned short* dV, Strides dV_strides, bool deterministic,
             int* turns,
             const __grid_constant__ mods::Args mod_args) {
    // smem: the block's shared memory (tiles.cuh); its start rounded up to 1024 bytes for the swizzle
    char* base = reinterpret_cast<char*>(smem);
    base += (1024 - shared_address(base) % 1024) % 1024;
    const Tiles<d> t(base);

    // The block's keys: block j of the slice. Causal and deterministic, the last first (see add_dQ_share).
    const int j = deterministic && causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int bh = blockIdx.y, b = bh / H, h = bh % H, key0 = j * Bc, Tr = ceil_div(N, Br);
    const int i_start = causal ? key0 / Br : 0;  // causal: earlier queries see none of these keys
    // Chapter 6: with a mask_mod, the query tiles that the block mask marks EMPTY for the block's keys
    // are skipped (mods::Walk; without mods, the walk is i = i_start, i_start + 1, ..): the producer
    // walks, and tells the consumers each step ahead (Step). Not when deterministic: a block's turn at
    // a tile of dQ waits for every block before it to have added its share there, so every block walks
    // every tile.
    const int x0 = key0 / mods::TILE, x1 = ceil_div(min(key0 + Bc, N), mods::TILE);
    const auto walk =
        mods::walk(mods::span<true>(mod_args, b, h, x0, x1), 1, Tr, mods::MASK && !deterministic,
                   [&](int i) { return mods::tiles(mod_args, b, h, i, i + 1, x0, x1) == mods::EMPTY; });
    static_assert(Br == mods::TILE && Bc == 2 * mods::TILE, "a query tile is one row of the block mask's");
    const int i_first = walk.first(i_start);
    L += size_t(bh) * N, D += size_t(bh) * N;

    if (threadIdx.x == 0) {
        mbarrier_init(t.KV_full, 1);
        for (int s = 0; s < STAGES; ++s)  // full: 1 arrival (expect_tx) and the bytes; empty: every consumer thread
            mbarrier_init(&t.QdO_full[s], 1), mbarrier_init(&t.QdO_empty[s], 128 * CONSUMERS);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x < 128) {     // the producer warpgroup
        setmaxnreg_dec<24>();    // keeps few registers: the consumers get them
        if (threadIdx.x == 0) {  // Alg. 2, line 6: K_j, V_j; then every tile of the ring, as stages free
            mbarrier_arrive_expect_tx(t.KV_full, 2 * Bc * d * 2);
            for (int c = 0; c < d / SUB; ++c) {
                tma_load(t.K + c * Bc * SUB, &tmK, c * SUB, key0, h, b, t.KV_full);
                tma_load(t.V + c * Bc * SUB, &tmV, c * SUB, key0, h, b, t.KV_full);
            }
            for (int i = i_first, next = walk.next(i), it = 0; i < Tr; ++it) {
                Step step{next < Tr ? walk.next(next) : Tr};
                for (int c = 0; mods::MASK && c < CONSUMERS; ++c)
                    step.state[c] = mods::tile(mod_args, b, h, i, x0 + c);
                load_QdO(t, &tmQ, &tmdO, it, i, h, b, step);
                i = next, next = step.after;
            }
        }
        return;
    }
    setmaxnreg_inc<240>();

    const int consumer = threadIdx.x / 128 - 1, tid = threadIdx.x % 128, w = tid / 32,
              lane = threadIdx.x % 32;
    const int g = lane / 4, q = lane % 4;
    const int warp_key = key0 + 64 * consumer + 16 * w, key = warp_key + g;  // the lane's keys: key, key + 8
    const unsigned short *K_c = t.K + 64 * consumer * SUB,
                         *V_c = t.V + 64 * consumer * SUB;  // its keys' rows
    constexpr int half = d / CONSUMERS;                     // its columns of dQ: half consumer ..
    const unsigned short* K_cols = t.K + half * consumer / SUB * Bc * SUB + half * consumer % SUB;
    float* dQ_c = t.dQ + consumer * Br * half;
    const float c = scale * LOG2E;
    const int bar = 1 + consumer, both = 3;  // named barriers: the consumer's 128 threads; both's 256

    // L_i and D_i (L in log2 units) of query tile i: each thread loads one, a tile ahead of the
    // tile that reads it, so that the load's latency passes under the products; LD_c(s): the
    // warpgroup's buffer of stage s.
    auto load_LD = [&](int i) {
        const int row = i * Br + tid % Br;  // L from threads 0-63, D from 64-127
        return row >= N ? 0.0f : tid < Br ? log2_of_L(L[row]) : D[row];
    };
    static_assert(2 * Br == 128, "each of the warpgroup's threads loads one of L_i, D_i");
    auto LD_c = [&](int s) { return t.LD + (consumer * STAGES + s) * 2 * Br; };

    // The warpgroup's share of dQ_i (its columns), stored in shared memory by the tile before: one
    // copy-engine request adds it into the fp32 sums. deterministic: the shares of these columns of
    // dQ_i are added in one order, by key block: this block's turn comes after the j blocks of the
    // keys before its own. Causal, in the other order, from the last block that sees tile i: the
    // blocks start in that order too (j from the last), each at its own diagonal tile, so that a
    // block's turn comes when the blocks before it, which started earlier and nearer the tile, have
    // passed it (in key order, each block would wait at its first tile for all the blocks before it
    // to get there). It waits for its own request's writes to be complete (bulk_wait, not only read)
    // before the release, which then publishes them to the next block's acquire. A block waits only
    // for blocks of lower index, which the GPU starts first (as FlashAttention-3's deterministic mode
    // also assumes).
    auto add_dQ_share = [&](int i) {
        fence_proxy_async();  // the stores, before the copy engine reads them
        named_barrier_sync(bar, 128);
        if (tid == 0) {
            int* turn = turns + (size_t(bh) * Tr + i) * CONSUMERS + consumer;
            const int last =
                min(int(gridDim.x) - 1, (i * Br + Br - 1) / Bc);  // the last block that sees tile i
            if (deterministic) wait_until_equal(turn, causal ? last - j : j);
            bulk_reduce_add(dQ_sum + (size_t(bh) * Tr + i) * Br * d + consumer * Br * half, dQ_c,
                            Br * half * 4);
            bulk_commit();
            if (deterministic) bulk_wait<0>(), release_increment(turn);  // added: the next may go
        }
    };

    float dv[d / 8][4] = {}, dk[d / 8][4] = {};          // Alg. 2, line 7
    int i = i_first, i_next = walk.next(i), i_prev = 0;  // the tile, the one after it, the one before
    LD_c(0)[tid] = load_LD(i);
    float LD_next = i_next < Tr ? load_LD(i_next) : 0.0f;
    mbarrier_wait(t.KV_full, 0);
    for (int it = 0; i < Tr; ++it) {  // tile i, the it-th walked
        const int q0 = i * Br, s = it % STAGES;
        const unsigned short *Q_t = t.Q_stage(s), *dO_t = t.dO_stage(s);
        const float* LD_t = LD_c(s);

        // Alg. 2, lines 11 and 13: S^T = K_j Q_i^T and dP^T = V_j dO_i^T, issued as two groups once
        // Q_i, dO_i have landed; under them, the last tile's share of dQ is sent off (its barrier
        // also makes this tile's L_i, D_i, stored by the last tile, visible).
        float st[Br / 8][4], dpt[Br / 8][4];
        mbarrier_wait(&t.QdO_full[s], it / STAGES % 2);
        wgmma_fence();
        wgmma_ss_first<T, Br>(st, k_major(K_c, Bc, 0), k_major(Q_t, Br, 0));
#pragma unroll
        for (int kk = 1; kk < d / 16; ++kk)
            wgmma_ss<T, Br>(st, k_major(K_c, Bc, kk), k_major(Q_t, Br, kk), true);
        wgmma_commit();
        wgmma_ss_first<T, Br>(dpt, k_major(V_c, Bc, 0), k_major(dO_t, Br, 0));
#pragma unroll
        for (int kk = 1; kk < d / 16; ++kk)
            wgmma_ss<T, Br>(dpt, k_major(V_c, Bc, kk), k_major(dO_t, Br, kk), true);
        wgmma_commit();
        if (it > 0)
            add_dQ_share(i_prev);
        else
            named_barrier_sync(bar, 128);  // L_i, D_i, stored above
        // Chapter 6, a block mask: the walk's tile after next, and the block mask's tile under the
        // consumer's keys, from the producer's Step, read while the tensor cores run the products.
        // Without a mask, the next tile, and every tile PARTIAL (score_mod's tiles are all taken apart).
        int i_after = i_next < Tr ? i_next + 1 : Tr;
        mods::Tile state = mods::PARTIAL;
        if constexpr (mods::MASK) i_after = t.step[s].after, state = t.step[s].state[consumer];

        // Alg. 2, line 12: P^T = exp(scale S^T - L), masked where the tile crosses the end of the
        // sequence or, causal, the diagonal (KEYS_ARE_ROWS: the rows are keys). Under dP's products.
        wgmma_wait<1>(st);
        float f[Br / 8][4];  // chapter 6: score_mod's derivative (a constant, and no registers, but for
                             // a score_mod whose derivative varies)
        if constexpr (mods::ANY) {  // chapter 6: P^T of the modded scores; the mask after (a score past
            // N or the diagonal may be anything: its P is set to 0)
            mods::backward_probabilities<mods::LATE_P>(st, f, state, mod_args, b, h,
                                                       key, q0 + 2 * q, 0, N, scale, LD_t + 2 * q);
            if (key0 + Bc > N || (causal && warp_key + 15 > q0))
                mask_fragment<true>(st, key, q0 + 2 * q, N, causal, mods::LATE_P ? -INFINITY : 0.0f);
        } else {
            if (q0 + Br > N || key0 + Bc > N || (causal && warp_key + 15 > q0))
                mask_fragment<true>(st, key, q0 + 2 * q, N, causal, -INFINITY);
#pragma unroll
            for (int n8 = 0; n8 < Br / 8; ++n8)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    st[n8][e] = fast_exp2(fmaf(st[n8][e], c, -LD_t[8 * n8 + 2 * q + e % 2])), f[n8][e] = 1.0f;
        }
        // Alg. 2, line 14: dS^T = P^T * (dP^T - D) (times f), stored for dQ's product (swizzled, as TMA
        // would) into buffer it % 2, its rows 64 consumer ..
        wgmma_wait<0>(dpt);
        if constexpr (mods::DROPOUT)  // chapter 6: dP = Z (dO V^T) / (1 - p), Z drawn as the forward did
            mods::dropout<true>(dpt, mod_args, bh, key, q0 + 2 * q);
        if constexpr (mods::LATE_P)  // chapter 6, softcap alone: P^T and f from tanh, now (see mods.cuh)
            mods::late_probabilities(st, f, mod_args, scale, LD_t + 2 * q);
#pragma unroll
        for (int n8 = 0; n8 < Br / 8; ++n8)
#pragma unroll
            for (int e = 0; e < 4; ++e)
                dpt[n8][e] = mods::times_p(st[n8][e], (dpt[n8][e] - LD_t[Br + 8 * n8 + 2 * q + e % 2]) * f[n8][e]);
        if constexpr (mods::DROPOUT)  // dV_j += (Z P_ij / (1 - p))^T dO_i; dS took P itself
            mods::dropout<true>(st, mod_args, bh, key, q0 + 2 * q);
        unsigned p[Br / 16][4], ds[Br / 16][4];  // as A operands: 16 queries a step
        a_operands<T, Br>(p, st);
        a_operands<T, Br>(ds, dpt);
        unsigned short* dS_t = t.dS_buffer(it % 2);
#pragma unroll
        for (int n8 = 0; n8 < Br / 8; ++n8)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                *reinterpret_cast<unsigned*>(reinterpret_cast<char*>(dS_t) +
                                             swizzled(64 * consumer + 16 * w + g + 8 * r, 8 * n8 + 2 * q)) =
                    pack<T>(dpt[n8][2 * r], dpt[n8][2 * r + 1]);
        fence_proxy_async();  // the stores, before wgmma reads them

        // Alg. 2, lines 15-16: dV_j += P^T dO_i, dK_j += dS^T Q_i, A from registers.
        wgmma_fence();
#pragma unroll
        for (int kb = 0; kb < Br / 16; ++kb) wgmma_rs<T, d>(dv, p[kb], mn_major(dO_t, Br, kb), true);
#pragma unroll
        for (int kb = 0; kb < Br / 16; ++kb) wgmma_rs<T, d>(dk, ds[kb], mn_major(Q_t, Br, kb), true);
        wgmma_commit();
        // Alg. 2, line 17: this warpgroup's columns of dQ_i = dS K_j, over both warpgroups' keys, once
        // both have stored dS (A = dS read from dS^T, MN-major). The other buffer is free by now: the
        // other warpgroup read it before it came here. Thread 0 has waited until the copy engine read
        // the last tile's share of dQ out of shared memory, which this tile's overwrites.
        if (tid == 0) bulk_wait_read<0>();
        named_barrier_sync(both, 128 * CONSUMERS);
        float dq[half / 8][4];
        wgmma_fence();
#pragma unroll
        for (int kb = 0; kb < Bc / 16; ++kb)
            wgmma_ss<T, half, true, true>(dq, smem_descriptor(shared_address(dS_t + kb * 16 * SUB), 16, 1024),
                                          mn_major(K_cols, Bc, kb), kb > 0);
        wgmma_commit();
        wgmma_wait<0>(dv, dk, dq);
        mbarrier_arrive(&t.QdO_empty[s]);  // Q_i, dO_i, its Step are free for tile + STAGES (every thread
                                           // arrives: an arrival releases only its own thread's reads)

        // dQ_i's share, into shared memory: each lane's 4 values of 8 columns as one 16-byte store, a
        // warp's 32 side by side; sent off under the next tile's first products. The next tile's L,
        // D go into the other buffer (last read by the tile before this one).
#pragma unroll
        for (int n8 = 0; n8 < half / 8; ++n8)
            *reinterpret_cast<float4*>(&dQ_c[((w * (half / 8) + n8) * 32 + lane) * 4]) =
                float4{dq[n8][0], dq[n8][1], dq[n8][2], dq[n8][3]};
        if (i_next < Tr) LD_c((it + 1) % STAGES)[tid] = LD_next;
        if (i_after < Tr) LD_next = load_LD(i_after);
        i_prev = i, i = i_next, i_next = i_after;
    }
    if (i_first < Tr) add_dQ_share(i_prev);  // (a block whose keys no query sees walked no tile)
    if (tid == 0) bulk_wait<0>();            // the sums are complete when the kernel is

    // Alg. 2, lines 20-21: dK_j (times the scale: dS was taken of the scaled scores), dV_j, through shared
    // memory. Straight from the accumulators, each 4-byte store of a warp would write 16 bytes in each of
    // 8 rows of the output, 8 pieces that the store unit takes one by one, 64 such stores a thread, and the
    // block's end (the next block's start on this multiprocessor) would wait for them. So each thread puts
    // its values into rows of shared memory (free once both consumers' last products are done), and the
    // consumer's 128 threads copy its 64 rows out 16 bytes a thread, a warp's 32 side by side: 2 or 4 whole
    // rows of the output a store (float4: 16 bytes moved as they are).
    named_barrier_sync(both, 128 * CONSUMERS);  // both consumers' last products have read K_j, V_j, Q_i, dO_i
    constexpr int ROW = d * 2 + 16;  // bytes a staged row: 16 more than its values, so that a warp's 8
                                     // rows g fall on different banks
    static_assert(2 * Bc * ROW <= Shared<d>::dS, "dK_j, dV_j staged over K_j, V_j and the ring");
    char* staged = base + Shared<d>::K;  // dK_j's Bc rows, then dV_j's
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = 64 * consumer + 16 * w + g + 8 * r;  // (key = key0 + row)
#pragma unroll
        for (int n8 = 0; n8 < d / 8; ++n8) {
            *reinterpret_cast<unsigned*>(staged + row * ROW + (8 * n8 + 2 * q) * 2) =
                pack<T>(scale * dk[n8][2 * r], scale * dk[n8][2 * r + 1]);
            *reinterpret_cast<unsigned*>(staged + (Bc + row) * ROW + (8 * n8 + 2 * q) * 2) =
                pack<T>(dv[n8][2 * r], dv[n8][2 * r + 1]);
        }
    }
    named_barrier_sync(bar, 128);  // the consumer's rows are staged
    constexpr int CHUNKS = d / 8;   // 16-byte pieces a row
#pragma unroll
    for (int x = tid; x < 2 * 64 * CHUNKS; x += 128) {  // dK's 64 rows of the consumer, then dV's
        const int tensor = x / (64 * CHUNKS), row = 64 * consumer + x / CHUNKS % 64, chunk = x % CHUNKS;
        if (key0 + row >= N) continue;
        const float4 v = *reinterpret_cast<const float4*>(staged + (tensor * Bc + row) * ROW + chunk * 16);
        const long long at = (tensor ? dV_strides : dK_strides).at(b, h, key0 + row);
        *reinterpret_cast<float4*>((tensor ? dV : dK) + at + chunk * 8) = v;
    }
}

// Before the main kernel: D = rowsum(dO * O) (Alg. 2, line 14's D), and what the main kernel adds
// into set to 0, in one pass. A warp per row of the slice padded to whole query tiles (Tr Br rows):
// each lane d / 32 values of the row's dO and O (4-byte loads, a warp's side by side; each row where
// its tensor's strides put it), the sum by shuffles; the row's d floats of dQ's
// sums zeroed (rows past N too: their tile is added into whole) and, by a tile's first row, its
// deterministic counters.
template <class T, int d>
__global__ void preprocess(const unsigned short* O, Strides O_strides, const unsigned short* dO, Strides dO_strides,
                           int H, int N, int Tr, size_t rows, float* D, float* dQ_sum, int* turns) {
    const size_t row = (size_t(blockIdx.x) * blockDim.x + threadIdx.x) / 32;  // of B * H * Tr * Br
    const int lane = threadIdx.x % 32;
    if (row >= rows) return;  // a whole warp: blockDim.x is a multiple of 32
    const size_t bh = row / (size_t(Tr) * Br);
    const int r = row % (size_t(Tr) * Br);  // the row in its slice
    constexpr int PER = d / 32;             // values a lane: 2 or 4
    float sum = 0.0f;
    if (r < N) {  // the lane's values, in pairs
        const auto* o_pairs = reinterpret_cast<const unsigned*>(O + O_strides.at(bh / H, bh % H, r) + lane * PER);
        const auto* g_pairs =
            reinterpret_cast<const unsigned*>(dO + dO_strides.at(bh / H, bh % H, r) + lane * PER);
#pragma unroll
        for (int k = 0; k < PER / 2; ++k) {
            const unsigned o = o_pairs[k], g = g_pairs[k];
            sum += to_float<T>(g & 0xffff) * to_float<T>(o & 0xffff) +
                   to_float<T>(g >> 16) * to_float<T>(o >> 16);
        }
    }
    sum = warp_sum(sum);
    if (lane == 0 && r < N) D[bh * N + r] = sum;
#pragma unroll
    for (int k = 0; k < PER; ++k) dQ_sum[row * d + lane * PER + k] = 0.0f;
    if (r % Br == 0 && lane < CONSUMERS) turns[row / Br * CONSUMERS + lane] = 0;
}

// After the main kernel: dQ from its fp32 sums, back in rows, times the scale left out there, rounded
// to T. A thread takes one lane's 4 values of a tile (16 bytes): rows r and r + 8, 2 columns.
template <class T, int d>
__global__ void convert_dQ(const float* dQ_sum, size_t chunks, int H, int N, int Tr, float scale,
                           unsigned short* dQ, Strides dQ_strides) {
    const size_t x = size_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (x >= chunks) return;
    constexpr int half = d / CONSUMERS;
    const float4 v = reinterpret_cast<const float4*>(dQ_sum)[x];
    const size_t bh_tile = x / (Br * d / 4);
    const int lane = x % 32, n8 = x / 32 % (half / 8), w = x / 32 / (half / 8) % 4,
              consumer = x / 32 / (half / 8) / 4 % CONSUMERS;
    const int row = int(bh_tile % Tr) * Br + 16 * w + lane / 4, col = half * consumer + 8 * n8 + lane % 4 * 2;
    const size_t bh = bh_tile / Tr;
    dQ += dQ_strides.at(bh / H, bh % H, row) + col;
    if (row < N) *reinterpret_cast<unsigned*>(dQ) = pack<T>(scale * v.x, scale * v.y);
    if (row + 8 < N) *reinterpret_cast<unsigned*>(dQ + 8 * dQ_strides.row) = pack<T>(scale * v.z, scale * v.w);
}

}  // namespace flash3_hopper_backward

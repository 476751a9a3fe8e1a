// FlashAttention-3's forward pass on Hopper (chapter 4): bf16 or fp16 in, fp32 accumulation, O in the
// input's type, L in fp32. The loop of chapter 3 (flash2_mma.cu), with each of its parts moved onto the
// hardware Hopper added for it (kernels/hopper.cuh has the instructions and their layouts):
//   - the loads of K_j and V_j: one thread asks the copy engine (TMA) for a whole tile, which lands in
//     shared memory already swizzled, counted on an mbarrier; tiles wait in a ring of STAGES buffers;
//   - the products: wgmma, 64 rows x 128 keys per instruction for a warpgroup of 128 threads, Q_i and
//     K_j read straight from shared memory, P_ij from registers (no ldmatrix);
//   - the schedule: a producer warpgroup only loads, two consumer warpgroups (three, at d = 64 where
//     the work is long) only compute (warp specialization, registers moved to them by setmaxnreg); the
//     consumers take turns on the tensor cores (ping-pong), and each overlaps its own softmax with its
//     next products.
// Names as in the paper; "Alg. 1, line n" marks the FlashAttention-2 paper's Algorithm 1, as in chapter 3.
// Q, K and V are read where the caller has them: each tensor map (version4.cuh) is 4-D, (column, row,
// head, batch), with the tensor's own strides, so a model's permuted views need no copy; a box is
// asked for at (column, row, h, b). O is written with its strides (q's layout, as minimal_flash.py
// allocates it: a model's (B, N, H, d), whose transpose back to (B, N, H d) is then a view, not a
// copy); L contiguous.
//
// Who owns what: a work tile is Br = 64 C query rows of one (batch, head), C = 2 consumers (128 rows; 3
// and 192 rows at d = 64 from step 6, where version4.cuh's consumers() says); a block of 1 + C
// warpgroups of 128 threads takes one (steps 1-4), or, persistent (from step 5), one block per
// multiprocessor takes work tiles one after the other until none is left.
//
//   warpgroup 0, producer   thread 0 issues every copy: Q_i once per work tile, then K_j, V_j into stage
//                           it % STAGES as soon as the consumers have released that stage; it takes
//                           the next work tile (a counter in global memory) and tells the consumers
//                           which with its Q_i; the rest idle
//   warpgroup 1, consumer   query rows  0- 63: S = Q K_j^T (64 x 128) and O (64 x d) in registers
//   warpgroup 2, consumer   query rows 64-127: the same, half a step behind warpgroup 1
//  (warpgroup 3, consumer   query rows 128-191: the same; the three a third of a step apart)
//
//   shared memory (1024-byte aligned; every tile in sub-tiles of 64 columns, 128-byte swizzled)
//     Q_i            Br x d                       written by TMA per work tile, read by the consumers' wgmma
//     K_j, V_j       STAGES x (Bc x d) each       the ring: TMA writes, wgmma reads
//     mbarriers      Q_full, K_full[s], V_full[s] (the copy's bytes have landed), Q_empty,
//                    K_empty[s], V_empty[s] (every consumer thread, or warp, is done with the tile:
//                    it may be refilled)
//     Step           STAGES                       (mask) the producer's walk: it stores, consumers read
//     work           1                            (persistent) the producer's work tile: likewise
//
//   within a consumer, warp w (of 4) holds rows 16w .. 16w + 15 of its 64, and lane (g, q) rows g and
//   g + 8 and, of every 8 columns, columns 2q and 2q + 1: mma.sync's layout, so chapter 3's softmax
//   on fragments (kernels/mma.cuh) applies unchanged.
#include "tiles.cuh"   // ceil_div
#include "mma.cuh"     // pack<T>, a_operands, mask_fragment, online_softmax, rescale, LOG2E
#include "hopper.cuh"  // tma_load, mbarrier_*, wgmma_*, setmaxnreg_*, named_barrier_*
#include "mods.cuh"    // chapter 6's hooks: mods::forward_scores, mods::tiles (no-ops without mods)
#include "timeline.cuh"  // TIMELINE_*: nothing, but in tools/block_timeline.py's build

// The steps of chapter 4, each its own build (-DHOPPER_STEP=n; notebooks/results/h200/
// flash3_hopper_forward_steps.txt measures them):
//   1  TMA, the mbarrier ring and wgmma; both warpgroups compute, and thread 0 also issues the copies
//   2  + warp specialization: a producer warpgroup issues the copies, setmaxnreg
//   3  + ping-pong: the consumers take turns issuing their products
//   4  + intra-warpgroup overlap: S_{j+1} = Q K_{j+1}^T and O += P_j V_j run under the softmax
//   5  + persistent blocks: the producer loads the next work tile's Q_i and K_j while the consumers
//        finish the last one's products and write its O
//   6  + a third consumer at d = 64: work tiles of 192 rows, three warpgroups taking turns, where the
//        work is long and the tiles many (version4.cuh's consumers(); elsewhere two)
#ifndef HOPPER_STEP
#define HOPPER_STEP 6
#endif
static_assert(HOPPER_STEP >= 4 || !mods::HOOKED, "chapter 6's mods hook into the last steps' kernel");

namespace flash3_hopper {

constexpr bool SPECIALIZED = HOPPER_STEP >= 2, PINGPONG = HOPPER_STEP >= 3, OVERLAP = HOPPER_STEP >= 4,
               PERSISTENT = HOPPER_STEP >= 5;
// C, the consumers: warpgroups that compute, 64 query rows each. Two; three at d = 64 from step 6 (not
// with chapter 6's mods, whose block mask is cut in tiles of 2 x 64 rows).
constexpr bool THREE_AT_64 = HOPPER_STEP >= 6 && !mods::HOOKED;
template <int C>
constexpr int THREADS = 128 * (C + SPECIALIZED);  // (step 1: no producer warpgroup)
template <int C>
constexpr int Br = 64 * C;  // query rows per block
constexpr int Bc = 128;     // keys per tile
constexpr int STAGES = 2;   // K_j, V_j buffers in the ring
constexpr int SUB = 64;     // columns of a swizzled sub-tile: 128 bytes
// setmaxnreg's split of the block's registers (one block takes all 64K of the multiprocessor's: 3 x 168
// a thread with two consumers, 4 x 128 with three): the producer keeps few, the consumers get the rest,
// and no more than was given back, or their setmaxnreg.inc waits for good. A mask's producer walks the
// block mask (mods::walk, mods::tile) and would spill in 24; there it keeps 48 and the consumers take
// 224, which they fit in; three consumers fit in 160, their O being 64 x 64 (ptxas -v: no spill in any
// build).
constexpr int PRODUCER_REGISTERS = mods::MASK ? 48 : 24;
template <int C>
constexpr int CONSUMER_REGISTERS = C == 3 ? 160 : mods::MASK ? 224 : 240;
template <int C>
constexpr bool registers_fit =  // at most what the launch gives each thread (a multiple of 8), 1 + C times
    PRODUCER_REGISTERS + C * CONSUMER_REGISTERS<C> <= 65536 / THREADS<C> / 8 * 8 * (1 + C);
static_assert(registers_fit<2> && (!THREE_AT_64 || registers_fit<3>),
              "the consumers would wait for registers that no warpgroup gives back");

// Chapter 6, a mask: what the producer's walk found for the tile in a stage, published beside it, so
// that the consumers neither walk the block mask nor read it: the tile walked after this one (`end`
// if none), and the block mask's two tiles under each consumer's 64 rows and this tile's 128 keys.
template <int C>
struct Step {
    int next;
    mods::Tile state[C][2];
};

// Shared memory, in bytes from the 1024-aligned start: Q_i, the ring of K_j and V_j, the barriers,
// the ring's Steps, the work tile.
template <int d, int C>
struct Shared {
    static constexpr int Q = 0, K = Q + Br<C> * d * 2, V = K + STAGES * Bc * d * 2,
                         BARRIERS = V + STAGES * Bc * d * 2, STEPS = BARRIERS + (2 + 4 * STAGES) * 8,
                         WORK = STEPS + STAGES * sizeof(Step<C>);
    static constexpr int bytes = WORK + 4 + 1024;  // + room to align the start
};
// The most that this build's forwards take at head dim d (version4.cuh reserves it).
inline size_t shared_bytes(int d) {
    return d == 64 ? std::max<size_t>(Shared<64, 2>::bytes, THREE_AT_64 ? Shared<64, 3>::bytes : 0)
                   : Shared<128, 2>::bytes;
}

// The block's tiles and barriers.
template <int d, int C>
struct Tiles {
    unsigned short *Q, *K, *V;  // sub-tile c of K's stage s: K + (s * d / SUB + c) * Bc * SUB
    uint64_t *Q_full, *K_full, *V_full, *Q_empty, *K_empty, *V_empty;
    Step<C>* step;  // step[s]: the walk at stage s's tile (mods)
    int* work;      // the work tile whose Q_i is in Q (persistent)

    __device__ explicit Tiles(char* base) {
        Q = reinterpret_cast<unsigned short*>(base + Shared<d, C>::Q);
        K = reinterpret_cast<unsigned short*>(base + Shared<d, C>::K);
        V = reinterpret_cast<unsigned short*>(base + Shared<d, C>::V);
        Q_full = reinterpret_cast<uint64_t*>(base + Shared<d, C>::BARRIERS);
        K_full = Q_full + 1, V_full = K_full + STAGES, Q_empty = V_full + STAGES, K_empty = Q_empty + 1,
        V_empty = K_empty + STAGES;
        step = reinterpret_cast<Step<C>*>(base + Shared<d, C>::STEPS);
        work = reinterpret_cast<int*>(base + Shared<d, C>::WORK);
    }
    __device__ unsigned short* K_stage(int s) const { return K + s * Bc * d; }
    __device__ unsigned short* V_stage(int s) const { return V + s * Bc * d; }
};

// ---- the producer's part ---------------------------------------------------------------------------
// Alg. 1, line 4: Q_i, d / 64 boxes of Br rows x 64 columns of head h of batch b (rows past N arrive
// as zeros).
template <int d, int C>
__device__ void load_Q(const Tiles<d, C>& t, const CUtensorMap* tmQ, int row0, int h, int b) {
    mbarrier_arrive_expect_tx(t.Q_full, Br<C> * d * 2);
    for (int c = 0; c < d / SUB; ++c) tma_load(t.Q + c * Br<C> * SUB, tmQ, c * SUB, row0, h, b, t.Q_full);
}
// Alg. 1, lines 6-7: K_j and V_j, the it-th tile walked, into stage s = it % STAGES, each once every
// consumer warp has released what it held before (tile it - STAGES): K_j as soon as the products
// S = Q K^T of that tile are done, V_j when its O += P V are. The stage's uses alternate the barriers'
// phases: use u = it / STAGES waits for the end of use u - 1 (parity (u - 1) % 2; the first passes at
// once). (it = j, but where a block mask skips tiles.) With a mask, the walk's Step goes with K_j: the
// consumers read it once K_full says K_j has landed (the arrival releases the store), and are done
// with it when they release K_j.
template <int d, int C>
__device__ void load_KV(const Tiles<d, C>& t, const CUtensorMap* tmK, const CUtensorMap* tmV, int it, int j,
                        int h, int b, const Step<C>& step = {}) {
    const int s = it % STAGES, parity = (it / STAGES + 1) % 2;
    mbarrier_wait(&t.K_empty[s], parity);
    if constexpr (mods::MASK) t.step[s] = step;
    mbarrier_arrive_expect_tx(&t.K_full[s], Bc * d * 2);
    for (int c = 0; c < d / SUB; ++c)
        tma_load(t.K_stage(s) + c * Bc * SUB, tmK, c * SUB, j * Bc, h, b, &t.K_full[s]);
    mbarrier_wait(&t.V_empty[s], parity);
    mbarrier_arrive_expect_tx(&t.V_full[s], Bc * d * 2);
    for (int c = 0; c < d / SUB; ++c)
        tma_load(t.V_stage(s) + c * Bc * SUB, tmV, c * SUB, j * Bc, h, b, &t.V_full[s]);
}

// ---- the consumers' products -------------------------------------------------------------------------
// Descriptor of the 16 columns 16 kk .. 16 kk + 15 of a K-major tile of `rows` rows (Q_i, K_j):
// sub-tile kk / 4, then 32 bytes per step of 16 columns within its 128-byte rows.
__device__ inline uint64_t k_major(const unsigned short* tile, int rows, int kk) {
    return smem_descriptor(shared_address(tile + kk / 4 * rows * SUB + kk % 4 * 16), 16, 1024);
}
// Alg. 1, line 8: S = Q K_j^T for the warpgroup's 64 rows (q: its rows of Q_i), d / 16 wgmma of
// 64 x 128 x 16, the first one overwriting S. Issued, not waited for.
template <class T, int d, int C>
__device__ void issue_S(float (&s)[Bc / 8][4], const unsigned short* q, const unsigned short* K_t) {
#pragma unroll
    for (int kk = 0; kk < d / 16; ++kk) wgmma_ss<T, Bc>(s, k_major(q, Br<C>, kk), k_major(K_t, Bc, kk), kk > 0);
}
// Alg. 1, line 10: O += P V_j, Bc / 16 wgmma of 64 x d x 16: P from registers (p[kb]: keys 16 kb ..
// 16 kb + 15), V_j as B read MN-major: 16 rows of keys (SBO: 1024 bytes from 8 rows to the next 8),
// d columns (LBO: from one 64-column sub-tile to the next).
template <class T, int d>
__device__ void issue_PV(float (&o)[d / 8][4], const unsigned (&p)[Bc / 16][4], const unsigned short* V_t) {
#pragma unroll
    for (int kb = 0; kb < Bc / 16; ++kb)
        wgmma_rs<T, d>(o, p[kb], smem_descriptor(shared_address(V_t + kb * 16 * SUB), Bc * SUB * 2, 1024),
                       true);
}

// Ping-pong: consumer k issues its products only after the one before it (k - 1, or the last for 0) has
// issued its own (named barrier 1 + k, met by its 128 threads and that one's 128 arrivals), and lets the
// next go once it has: one's softmax then runs while the others' products occupy the tensor cores. The
// turns go round: 0, 1, 0, 1, .. or 0, 1, 2, 0, ... The last consumer lets consumer 0 go first, once per
// block; after its last turn consumer 0 takes the turn that the last consumer's last products gave it
// (pingpong_end), so every barrier's arrivals are all met. The consumers take the same work tiles and
// tiles, so their turns go round across work tiles too.
__device__ inline void turn_begin(int consumer) {
    if (PINGPONG) named_barrier_sync(1 + consumer, 256);
}
template <int C>
__device__ inline void turn_end(int consumer) {
    if (PINGPONG) named_barrier_arrive(1 + (consumer + 1) % C, 256);
}
template <int C>
__device__ inline void pingpong_begin(int consumer) {
    if (PINGPONG && consumer == C - 1) named_barrier_arrive(1, 256);
}
__device__ inline void pingpong_end(int consumer) {
    if (PINGPONG && consumer == 0) named_barrier_sync(1, 256);
}

// ---- the work tiles ----------------------------------------------------------------------------------
// Work tile id, of the launch's Tr * BH: Br query rows of one (batch, head) slice. The ids go in the
// order the tiles are taken: the slices in sections of `section` (as many as the L2 cache holds the K
// and V of: version 4's run chooses), each query tile of the section's slices in turn, heaviest first
// where causal (the last rows see the most keys) or with a mask_mod (most likely so too: the masks
// people write narrow towards the first rows). So the tiles taken last are the lightest, and the
// blocks end nearly together; and the blocks at work at one time read the K and V of a few slices, from
// L2, not each its own from memory.
struct Work {
    int b, h, h_kv, row0, j_end;  // the slice, K and V's head (`group` query heads share one), the first
                                  // query row, the key tiles to visit (causal: up to the diagonal)
    int y0, y1;                   // chapter 6: its rows of the block mask's 64 x 64 tiles
};
template <int C>
__device__ inline Work work_tile(int id, int N, int H, int BH, int group, int section, bool causal) {
    const int Tr = ceil_div(N, Br<C>), Tc = ceil_div(N, Bc);
    const int first = id / (section * Tr) * section, slices = min(section, BH - first);  // the section's
    const int bh = first + (id - first * Tr) % slices, rank = (id - first * Tr) / slices;
    const int row0 = (causal || mods::MASK ? Tr - 1 - rank : rank) * Br<C>, rows_end = min(row0 + Br<C>, N);
    const int j_end = causal ? min(Tc, (rows_end - 1) / Bc + 1) : Tc;
    return {bh / H, bh % H, bh % H / group, row0, j_end, row0 / mods::TILE, ceil_div(rows_end, mods::TILE)};
}

template <class T, int d, int C>
__global__ void __launch_bounds__(THREADS<C>, 1)
    forward(const __grid_constant__ CUtensorMap tmQ, const __grid_constant__ CUtensorMap tmK,
            const __grid_constant__ CUtensorMap tmV, int N, int H, int BH, int group, int section, float scale,
            bool causal, unsigned short* O, Strides O_strides, float* L, int* taken,
            const __grid_constant__ mods::Args mod_args) {
    // smem: the block's shared memory (tiles.cuh); its start rounded up to 1024 bytes for the swizzle
    char* base = reinterpret_cast<char*>(smem);
    base += (1024 - shared_address(base) % 1024) % 1024;
    static_assert(C == 2 || (C == 3 && THREE_AT_64 && d == 64), "three consumers: d = 64, step 6, no mods");
    const Tiles<d, C> t(base);
    const int total = ceil_div(N, Br<C>) * BH;  // work tiles
    auto work = [&](int id) { return work_tile<C>(id, N, H, BH, group, section, causal); };
    // Chapter 6: with a mask_mod, the key tiles that the block mask marks EMPTY for the work tile's rows
    // are skipped (mods::Walk; without mods, the walk is j = 0, 1, ..): the producer walks, and tells
    // the consumers each next step (Step). A tile of 128 keys is two columns of the mask's 64 x 64
    // tiles; the work tile's 128 rows, two rows of them, one per consumer.
    auto walk = [&](const Work& u) {
        return mods::walk(mods::span<false>(mod_args, u.b, u.h, u.y0, u.y1), 2, u.j_end, mods::MASK,
                          [&mod_args, b = u.b, h = u.h, y0 = u.y0, y1 = u.y1](int j) {
                              return mods::tiles(mod_args, b, h, y0, y1, 2 * j, 2 * j + 2) == mods::EMPTY;
                          });
    };
    static_assert(Bc == 2 * mods::TILE && (Br<C> == 2 * mods::TILE || !mods::HOOKED),
                  "a tile is 2 x 2 of the block mask's");

    if (threadIdx.x == 0) {
        mbarrier_init(t.Q_full, 1), mbarrier_init(t.Q_empty, C * 128);
        for (int s = 0; s < STAGES; ++s) {  // full: 1 arrival (expect_tx) and the bytes; empty: see release_K
            mbarrier_init(&t.K_full[s], 1), mbarrier_init(&t.V_full[s], 1);
            mbarrier_init(&t.K_empty[s], C * 128), mbarrier_init(&t.V_empty[s], C * 4);
        }
        fence_mbarrier_init();
    }
    __syncthreads();  // the barriers are ready for all; from here on, only mbarriers and named barriers

    if (SPECIALIZED && threadIdx.x < 128) {  // the producer warpgroup
        setmaxnreg_dec<PRODUCER_REGISTERS>();  // keeps few registers: the consumers get them
        if (threadIdx.x == 0) {
            // The block's work tiles: its own, id = blockIdx.x, then (persistent) the next one not
            // taken yet, gridDim.x + the counter `taken` (from 0: the launch zeroes it). The n-th one's
            // id goes to the consumers in `work` once they have released the (n-1)-th's Q_i, published
            // by Q_full's arrival (as a Step is by K_full's); an id past the last says: no more.
            // `it` counts the tiles walked, over all of them: the ring runs on from one to the next.
            for (int n = 0, id = blockIdx.x, it = 0; PERSISTENT || n == 0; ++n) {
                if (PERSISTENT) {
                    mbarrier_wait(t.Q_empty, (n + 1) % 2);
                    *t.work = id;
                    if (id >= total) {
                        mbarrier_arrive(t.Q_full);
                        break;
                    }
                }
                const Work u = work(id);
                const auto walk_u = walk(u);
                load_Q(t, &tmQ, u.row0, u.h, u.b);
                for (int j = walk_u.first(0); j < u.j_end; ++it) {
                    Step<C> step{walk_u.next(j)};
                    for (int c = 0; mods::MASK && c < C; ++c)
                        for (int e = 0; e < 2; ++e)
                            step.state[c][e] = mods::tile(mod_args, u.b, u.h, u.y0 + c, 2 * j + e);
                    load_KV(t, &tmK, &tmV, it, j, u.h_kv, u.b, step);
                    j = step.next;
                }
                // (while the consumers still compute the last tiles: the atomic's latency is hidden)
                if (PERSISTENT) id = gridDim.x + atomicAdd(taken, 1);
            }
        }
        return;
    }
    if (SPECIALIZED) setmaxnreg_inc<CONSUMER_REGISTERS<C>>();
    if (!SPECIALIZED && threadIdx.x == 0) {  // step 1: thread 0 issues the first STAGES tiles now,
        const Work u = work(blockIdx.x);      // the others as its own loop frees their stages (no mods)
        load_Q(t, &tmQ, u.row0, u.h, u.b);
        for (int j = 0; j < min(u.j_end, STAGES); ++j) load_KV(t, &tmK, &tmV, j, j, u.h_kv, u.b);
    }

    const int consumer = threadIdx.x / 128 - SPECIALIZED, w = threadIdx.x % 128 / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, q = lane % 4;
    const unsigned short* Q_c = t.Q + 64 * consumer * SUB;  // the consumer's rows of Q_i
    // The softmax's scale: with a score_mod, the scores come to it scaled already (mods::softmax_scale).
    const float softmax_scale = mods::softmax_scale(mod_args, scale), c = softmax_scale * LOG2E;
    const bool bounded = mods::bounded<T>(c);  // chapter 6, softcap alone: each row's max fixed at tanh's 1
    int it = 0;  // the ring's position: tiles walked, over all the block's work tiles
    pingpong_begin<C>(consumer);

    for (int n = 0; PERSISTENT || n == 0; ++n) {  // the block's work tiles
        TIMELINE_START();
        mbarrier_wait(t.Q_full, n % 2);  // Q_i has landed, and the producer's word of its work tile
        const int id = PERSISTENT ? *t.work : blockIdx.x;
        if (id >= total) break;
        TIMELINE_MARK(q_landed);
        const Work u = work(id);
        const auto walk_u = walk(u);
        const int j_first = walk_u.first(0), j_end = u.j_end, bh = u.b * H + u.h;
        const int warp_row = u.row0 + 64 * consumer + 16 * w, row = warp_row + g;  // the lane's rows: row, row + 8

        const float m0 = bounded ? 1.0f : -INFINITY;
        float o[d / 8][4] = {}, m[2] = {m0, m0}, l[2] = {};  // Alg. 1, line 5 (m: -inf, or the bound)
        unsigned p[Bc / 16][4];                               // P_ij as the A operand of O += P V_j

        // Chapter 6: the tile walked after tile j (in stage s), and state, the block mask's two tiles under
        // the consumer's 64 rows and tile j's 128 keys, each taken apart (mask_mod is called only in a
        // PARTIAL one): the producer's Step, read while the tensor cores run a product. Without a mask,
        // j + 1.
        auto read_step = [&](int s, int j, mods::Tile(&state)[2]) {
            if constexpr (!mods::MASK) {
                return j + 1;
            } else {
                const Step<C>& step = t.step[s];
                state[0] = step.state[consumer][0], state[1] = step.state[consumer][1];
                return step.next;
            }
        };
        // S_ij masked where the tile crosses the end of the sequence or, causal, the diagonal (Alg. 1,
        // line 9's mask), then its softmax: P_ij, and alpha, what O must be rescaled by.
        auto softmax = [&](float (&s)[Bc / 8][4], int j, const mods::Tile(&state)[2], float (&alpha)[2]) {
            if constexpr (mods::ANY)
                mods::forward_scores(s, state, mod_args, u.b, u.h, row, j * Bc + 2 * q, 0, scale);
            if ((j + 1) * Bc > N || (causal && (j + 1) * Bc > warp_row + 1))
                mask_fragment<false>(s, row, j * Bc + 2 * q, N, causal, -INFINITY);
            online_softmax<false>(s, m, l, o, alpha, c, bounded);  // O is rescaled later, by rescale
            if constexpr (mods::DROPOUT)  // chapter 6: P's kept elements, scaled; l has them all
                mods::dropout<false>(s, mod_args, bh, row, j * Bc + 2 * q);
        };
        // Persistent: Q_i may be overwritten (by the next work tile's) once the work tile's last
        // S = Q K^T is done: the producer then loads it during the last O += P V and the epilogue.
        // Every thread arrives: each has read `work` too.
        auto release_Q = [&] {
            if (PERSISTENT) mbarrier_arrive(t.Q_empty);
        };
        // The it-th tile's K_j, V_j may be overwritten once this warp's products that read them are done
        // (and Q_i once the last tile's S is). (Step 1: thread 0 then refills the stage itself, waiting
        // for the others' releases too.) K_j's release is every thread's: with a mask, each thread has
        // read the stage's Step too, and an arrival releases only its own thread's reads. V_j's, a
        // warp's: only wgmma read V_j, which the warp waited for.
        auto release_K = [&](int it, bool last) {
            mbarrier_arrive(&t.K_empty[it % STAGES]);
            if (last) release_Q();
        };
        auto release_V = [&](int it) {
            if (lane == 0) mbarrier_arrive(&t.V_empty[it % STAGES]);
            if (!SPECIALIZED && threadIdx.x == 0 && it + STAGES < j_end)  // (no mods, one work tile: it = j)
                load_KV(t, &tmK, &tmV, it + STAGES, it + STAGES, u.h_kv, u.b);
        };
        if (j_first >= j_end) release_Q();  // (mods: a work tile with no key to see)

        if (!OVERLAP) {  // steps 1-3: S_ij, its softmax, O += P_ij V_j, one after the other
            for (int j = j_first, after; j < j_end; j = after, ++it) {
                const int s_j = it % STAGES, parity = it / STAGES % 2;
                float s[Bc / 8][4], alpha[2];
                mods::Tile state[2];
                mbarrier_wait(&t.K_full[s_j], parity);  // K_j has landed
                turn_begin(consumer);
                wgmma_fence();  // S's registers were last written by ordinary instructions
                issue_S<T, d, C>(s, Q_c, t.K_stage(s_j));
                wgmma_commit();
                turn_end<C>(consumer);
                after = read_step(s_j, j, state);  // (mods) under the product
                wgmma_wait<0>(s);
                release_K(it, after >= j_end);
                softmax(s, j, state, alpha);
                if (!bounded) rescale(o, alpha);
                a_operands<T, Bc>(p, s);
                mbarrier_wait(&t.V_full[s_j], parity);
                turn_begin(consumer);
                wgmma_fence();  // O and P were written by ordinary instructions
                issue_PV<T, d>(o, p, t.V_stage(s_j));
                wgmma_commit();
                turn_end<C>(consumer);
                wgmma_wait<0>(o);
                release_V(it);
            }
        } else {  // step 4 (FlashAttention-3's Algorithm 2): S_i,j+1 = Q K_j+1^T is issued with O += P_ij V_j,
                  // and the softmax of S_i,j+1 runs while the tensor cores compute that product into O
            float alpha[2];        // what O must be rescaled by before P_ij V_j is added: exp(m_i,j-1 - m_ij)
            int j = j_first, next = j_end;  // the tile whose P is in p (the it-th walked); the one after
            mods::Tile state[2];            // (mods) the block mask's tiles of the next softmax's key tile
            if (j < j_end) {
                float s[Bc / 8][4];
                mbarrier_wait(&t.K_full[it % STAGES], it / STAGES % 2);
                turn_begin(consumer);
                wgmma_fence();
                issue_S<T, d, C>(s, Q_c, t.K_stage(it % STAGES));
                wgmma_commit();
                turn_end<C>(consumer);
                next = read_step(it % STAGES, j, state);
                wgmma_wait<0>(s);
                release_K(it, next >= j_end);
                softmax(s, j, state, alpha);
                a_operands<T, Bc>(p, s);
            }
            for (int after; next < j_end; j = next, next = after, ++it) {
                const int s_next = (it + 1) % STAGES, s_prev = it % STAGES;  // S of tile `next`; P V of j
                float s[Bc / 8][4];
                mbarrier_wait(&t.K_full[s_next], (it + 1) / STAGES % 2);
                turn_begin(consumer);
                wgmma_fence();
                issue_S<T, d, C>(s, Q_c, t.K_stage(s_next));  // group 1: S_i,next
                wgmma_commit();
                if (!bounded) rescale(o, alpha);  // while S_i,next runs
                mbarrier_wait(&t.V_full[s_prev], it / STAGES % 2);
                wgmma_fence();                            // O was just rescaled
                issue_PV<T, d>(o, p, t.V_stage(s_prev));  // group 2: O += P V of tile j
                wgmma_commit();
                turn_end<C>(consumer);
                after = read_step(s_next, next, state);  // (mods) under the products
                wgmma_wait<1>(s);  // S_i,next is in; the product into O may still run
                release_K(it + 1, after >= j_end);
                softmax(s, next, state, alpha);
                wgmma_wait<0>(o);  // O is in, and p free to be overwritten
                release_V(it);
                a_operands<T, Bc>(p, s);
            }
            if (j < j_end) {
                mbarrier_wait(&t.V_full[it % STAGES], it / STAGES % 2);
                turn_begin(consumer);
                if (!bounded) rescale(o, alpha);
                wgmma_fence();
                issue_PV<T, d>(o, p, t.V_stage(it % STAGES));
                wgmma_commit();
                turn_end<C>(consumer);
                wgmma_wait<0>(o);
                release_V(it++);
            }
        }
        TIMELINE_MARK(loop_done);

        // Alg. 1, lines 12-15: a row's l is its 4 lanes' shares added up; O = O / l, L = m + log(l).
        unsigned short* O_bh = O + O_strides.at(u.b, u.h, 0);
        float* L_bh = L + size_t(bh) * N;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l_row = l[r];
            l_row += __shfl_xor_sync(0xffffffffu, l_row, 1);
            l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
            const int i = row + 8 * r;
            if (i >= N) continue;
            // A row that sees no key (mods) has l = 0 and m = -inf: O = 0, L = -inf, the log of an empty sum.
            const float inv_l = l_row > 0.0f ? 1.0f / l_row : 0.0f;
#pragma unroll
            for (int n8 = 0; n8 < d / 8; ++n8)  // columns 8 n8 + 2q, 8 n8 + 2q + 1: one 4-byte store
                *reinterpret_cast<unsigned*>(&O_bh[i * O_strides.row + 8 * n8 + 2 * q]) =
                    pack<T>(o[n8][2 * r] * inv_l, o[n8][2 * r + 1] * inv_l);
            if (q == 0) L_bh[i] = m[r] * softmax_scale + logf(l_row);
        }
        TIMELINE_END(L_bh, u.row0 + 64 * consumer, N, C);
    }
    pingpong_end(consumer);
}

}  // namespace flash3_hopper

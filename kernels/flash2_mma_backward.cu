// FlashAttention-2 backward pass on tensor cores (chapter 3): bf16 or fp16 in, fp32 accumulation,
// dQ, dK, dV in the input's type. The loop order of flash2_backward.cu (Algorithm 2 of the
// FlashAttention-2 paper) with the arithmetic of flash2_mma.cu: mma.sync, 16 x 8 x 16 per warp
// (kernels/mma.cuh). The products are taken transposed, S_ij^T = K_j Q_i^T and dP_ij^T = V_j dO_i^T,
// so that the warp's keys are the rows of its accumulators: a lane turns them into P_ij^T and
// dS_ij^T in registers, and those accumulators are straight away the A operands of dV_j += P_ij^T
// dO_i and dK_j += dS_ij^T Q_i, whose rows are the same keys. The query tiles are double-buffered,
// as flash2_mma.cu does K_j and V_j: tile i + 1's copies (cp.async) fly while tile i is multiplied.
// P_ij^T comes from one exp2 per element, the scale folded into its exponent as in flash2_mma.cu,
// and only tiles at the end of the sequence or on the causal diagonal are masked.
//
// Who owns what: one block per (batch, head, Bc = 128 keys), 8 warps, walking the query tiles i of
// Br = 64 rows:
//
//            S_ij^T, dP_ij^T (128 x 64), dK_j, dV_j (128 x d)          dQ_i += dS_ij K_j (64 x d)
//   keys   0- 15 [ warp 0 ]  in registers, the whole pass               cols 0 .. d/2-1   d/2 .. d-1
//   keys  16- 31 [ warp 1 ]                                rows  0-15 [ warp 0        | warp 4       ]
//   ...                                                    rows 16-31 [ warp 1        | warp 5       ]
//   keys 112-127 [ warp 7 ]                                rows 32-63 [ warps 2, 3    | warps 6, 7   ]
//
// Above d = 128: 64 keys a block, and two warps on each 16 of them, each taking half of the columns of
// dK_j and dV_j (else a lane would hold d / 2 fp32 values of each, more than its 255 registers; and
// tiles of 128 keys would not fit in shared memory). Both compute all of S_ij^T and dP_ij^T for their
// keys (their sums run over every column): 7 products' work, not 5, but the block keeps 8 warps, which
// share the loads of every tile, two to a scheduler (one block fits a multiprocessor at d = 256):
//
//   keys  0-15 [ warps 0, 4 ]  dK_j, dV_j columns 0 .. d/2-1: warps 0-3;  d/2 .. d-1: warps 4-7
//   ...
//   keys 48-63 [ warps 3, 7 ]
//
// dQ_i sums over keys, which the other warps and blocks hold: dS_ij^T goes through shared memory,
// and each warp adds its product into an fp32 copy of dQ with atomics, two floats at a time, as
// flash2_backward.cu does (the price: the order of the additions varies, so do dQ's last bits).
// Two small kernels go around it: D = rowsum(dO * O) before, and dQ's conversion to T after. Packed
// sequences (flash_attn_varlen_func) run the same three: tiles.cuh's slice_rows has their rows.
// Names as in the paper; "Alg. 2, line n" marks each phase, numbered as in flash2_backward.cu.
#include "tiles.cuh"    // ceil_div
#include "vectors.cuh"  // atomic_add2
#include "mma.cuh"      // stride16, ldmatrix_x4_trans, mma_ABt, mma_AB, a_operands, pack<T>, to_float<T>, ...
#include "mods.cuh"     // chapter 6's hooks: mods::backward_scores, mods::tile(s) (no-ops without mods)

namespace flash2_mma_backward {

// 128 keys per block, 8 warps: each query tile that a block loads, and each row of dQ_i that it adds
// into by atomics, then serves 128 keys, not 64: half the global traffic and half the atomics. Above
// d = 128, 64 keys, two warps on each 16 of them, each with half of the columns (above).
constexpr int Br = 64, WARPS = 8;                                              // queries per tile, warps
__host__ __device__ constexpr int keys(int d) { return d <= 128 ? 128 : 64; }  // Bc: keys per block
__host__ __device__ constexpr int halves(int d) { return d <= 128 ? 1 : 2; }   // warps per 16 keys
// Above d = 128 the two warps on the same keys hold the same dS_ij^T, and the first stores it. At d =
// 256 that branch costs registers the warps do not have (a spill): there each half stores a copy of its
// own instead, 9 KB more shared memory (within Hopper's 227 KB; an A100's 163 KB takes neither).
__host__ __device__ constexpr int dS_copies(int d) { return d > 192 ? 2 : 1; }

// Shared memory: two buffers each (the n-th query tile walked in buffer n % 2) of L_i and D_i (fp32) and of
// the 16-bit tiles Q_i, dO_i (Br rows), then K_j, V_j (Bc rows each) and dS_ij^T (Bc rows of Br queries;
// dS_copies(d) of them). Why K_j, V_j stay here, not in registers as the forward keeps Q_i: a warp's
// fragments of both would take d / 2 registers per lane, on top of d for dK_j and dV_j and 64 for S_ij^T
// and dP_ij^T; at d = 128 that is more than the 255 a thread may have. Each product re-reads them from
// shared memory with ldmatrix instead.
__host__ __device__ inline int shared_bytes(int d) {
    return 2 * 2 * Br * 4 +
           ((2 * 2 * Br + 2 * keys(d)) * stride16(d) + dS_copies(d) * keys(d) * stride16(Br)) * 2;
}

// Alg. 2, line 4: D = rowsum(dO * O) in fp32, one thread per row,
// before the main kernel: every block needs D_i for every query tile, and this costs one read of O.
template <class T, int d>
__global__ void rowsum_D(const unsigned short* O, const unsigned short* dO, size_t rows, float* D) {
    const size_t row = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (row >= rows) return;
    float sum = 0.0f;
    for (int x = 0; x < d; ++x) sum += to_float<T>(dO[row * d + x]) * to_float<T>(O[row * d + x]);
    D[row] = sum;
}

// After the main kernel: dQ from its fp32 sums, times the scale left out there, rounded to T; a
// thread takes 2 values (d is even), one 4-byte store.
template <class T>
__global__ void convert_dQ(const float* dQ_sum, size_t pairs, float scale, unsigned short* dQ) {
    const size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (e < pairs)
        *reinterpret_cast<unsigned*>(&dQ[2 * e]) = pack<T>(scale * dQ_sum[2 * e], scale * dQ_sum[2 * e + 1]);
}

template <class T, int d>
__global__ void __launch_bounds__(32 * WARPS)
    backward(const unsigned short* Q, const unsigned short* K, const unsigned short* V,
             const unsigned short* dO, const float* L, const float* D, int N, const int* cu_seqlens_q,
             const int* cu_seqlens_k, int H, float scale, bool causal, float* dQ_sum, unsigned short* dK,
             unsigned short* dV, mods::Args mod_args) {
    constexpr int LS = stride16(d), LP = stride16(Br), Bc = keys(d), KEY_WARPS = Bc / 16;
    static_assert(KEY_WARPS * halves(d) == WARPS, "each 16 keys, halves(d) warps");
    // smem: the block's shared memory, declared in tiles.cuh
    float* stats_i = smem;                                                          // two of L_i, D_i: 2 x Br
    unsigned short* Q_i = reinterpret_cast<unsigned short*>(stats_i + 2 * 2 * Br);  // two of Br x LS
    unsigned short* dO_i = Q_i + 2 * Br * LS;                                       // two of Br x LS
    unsigned short* K_j = dO_i + 2 * Br * LS;                                       // Bc x LS
    unsigned short* V_j = K_j + Bc * LS;                                            // Bc x LS
    unsigned short* dS_T = V_j + Bc * LS;  // Bc x LP (x dS_copies(d)): dS^T
    // Lane (g, q) of warp w holds, of the warp's 16 keys, keys g and g + 8, and of each 8 columns of an
    // accumulator, columns 2q and 2q + 1 (kernels/mma.cuh).
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    // The warp's 16 keys, kw .. kw + 15 of the block's, and its columns of dK_j, dV_j: c0 .. c0 + DC - 1
    constexpr int DC = d / halves(d);
    const int kw = (halves(d) > 1 ? w % KEY_WARPS : w) * 16, c0 = halves(d) > 1 ? w / KEY_WARPS * DC : 0;
    // The copy of dS_ij^T the warp reads, and whether it stores its own dS_ij^T there (dS_copies)
    unsigned short* dS_w = dS_T + (dS_copies(d) > 1 ? c0 / DC : 0) * Bc * LP;
    const bool stores_dS = dS_copies(d) > 1 || halves(d) == 1 || w < KEY_WARPS;

    // This block's (batch, head) slice, fixed-length or packed (tiles.cuh): its rows of Q, dO, dQ, L, D
    // and of K, V, dK, dV (with q's heads here: group 1).
    const Slice slice = slice_rows(blockIdx.y, N, d, 1, cu_seqlens_q, cu_seqlens_k, H);
    const int Nq = slice.Nq, Nk = slice.Nk, ld_q = slice.ld_q, ld_kv = slice.ld_kv;
    Q += slice.q, dO += slice.q, dQ_sum += slice.q;
    const float* stats = (threadIdx.x < Br ? L : D) + slice.q / d;  // what this thread copies to stats_i
    K += slice.kv, V += slice.kv, dK += slice.kv, dV += slice.kv;
    const int key0 = blockIdx.x * Bc;
    if (key0 >= Nk) return;  // past its sequence's end (packed: the grid fits the longest)
    // Causal, aligned at the bottom right (flash2_mma.cu): query i sees keys j <= i + shift. Query tiles
    // wholly before the first query that sees the block's first key are skipped. Block 0 has the most
    // work, and blocks start roughly in launch order: the heaviest first.
    const int shift = Nk - Nq;
    // Chapter 6: with a mask_mod, the query tiles that the block mask marks empty for the block's keys
    // are skipped (a window's: by arithmetic; mods::Walk; without mods, the walk is i = i0, i0 + 1, ..).
    const int b = mods::ANY ? blockIdx.y / mod_args.H : 0, h = mods::ANY ? blockIdx.y % mod_args.H : 0;
    const int x0 = key0 / mods::TILE, x1 = ceil_div(min(key0 + Bc, Nk), mods::TILE);
    const mods::Span span = mods::span<true>(mod_args, b, h, x0, x1, shift);  // the query tiles that are not EMPTY
    // (shift by value: taken by reference, it changed the code of every build, where only a window reads it)
    const auto walk = mods::walk(span, 1, ceil_div(Nq, Br), mods::MASK, [&, shift](int i) {
        return mods::tiles(mod_args, b, h, i, i + 1, x0, x1, shift) == mods::EMPTY;
    });
    static_assert(Br == mods::TILE && Bc % mods::TILE == 0, "a query tile is one row of the block mask's");
    const int i0 = walk.first(causal ? max(key0 - shift, 0) / Br : 0);
    // The buffer of query tile i, the it-th walked: with skipping, by turns; without, i % 2 (no
    // counter kept: at d = 128 the registers are full, and one more spills).
    const auto buffer = [](int i, int it) { return (mods::MASK ? it : i) % 2; };

    // Alg. 2, lines 8-9 for query tile i: Q_i, dO_i, L_i, D_i into a buffer by cp.async, not
    // waited for here. L_i and D_i go 4 bytes a thread, thread y < Br copying L's row y and thread
    // Br + y d's: the slice of L (and of d) of (batch, head) bh starts at bh N floats, 16-byte
    // aligned only when 4 divides N, and a 16-byte copy needs a 16-byte aligned source (packed, its
    // rows are not even adjacent). Rows past Nq land as zeros, L_i = D_i = 0 included: their P is
    // exp(0 - 0) = 1 on visible keys, not 0, and still nothing they add is wrong. Their dO rows are
    // zero, so dP = 0 and dS = P (dP - d) = 0: dK += dS^T Q and dV += P^T dO add zero. (Keys past Nk
    // still get P = 0 from the mask, and dQ's rows past Nq are never stored.)
    static_assert(32 * WARPS >= 2 * Br, "a thread per row of L_i and of D_i");
    auto load_query_tile = [&](int i, int buffer) {  // tile i into buffer 0 or 1
        const int row0 = i * Br, y = threadIdx.x % Br;
        load_tile16_async<d>(Q_i + buffer * Br * LS, Q, row0, Br, Nq, ld_q);
        load_tile16_async<d>(dO_i + buffer * Br * LS, dO, row0, Br, Nq, ld_q);
        const bool valid = row0 + y < Nq;
        if (threadIdx.x < 2 * Br)
            cp_async4(stats_i + buffer * 2 * Br + threadIdx.x, stats + (valid ? (row0 + y) * (ld_q / d) : 0),
                      valid);
    };
    load_tile16_async<d>(K_j, K, key0, Bc, Nk, ld_kv);  // Alg. 2, line 6
    load_tile16_async<d>(V_j, V, key0, Bc, Nk, ld_kv);
    load_query_tile(i0, buffer(i0, 0));
    cp_async_commit();
    const unsigned short *K_w = K_j + kw * LS, *V_w = V_j + kw * LS;  // the warp's 16 keys
    float dK_j[DC / 8][4] = {}, dV_j[DC / 8][4] = {};                 // Alg. 2, line 7
    const float c = scale * LOG2E;

    for (int i = i0, it = 0; i * Br < Nq; ++it) {  // tile i in buffer(i, it)
        // Double buffering: the next tile's copies fly (into the buffers the tile before used) while
        // tile i is multiplied, so the wait for memory overlaps the tensor cores' work.
        const int next = walk.next(i);
        if (next * Br < Nq) {
            load_query_tile(next, buffer(next, it + 1));
            cp_async_commit();
            cp_async_wait<1>();  // tile i (and K_j, V_j) has landed
        } else {
            cp_async_wait<0>();
        }
        // L_i lands as L: thread y, which copied row y, turns it into L log2(e) for P's exponent,
        // once per tile, before the barrier (only the issuing thread is sure its copy has landed).
        float *L_t = stats_i + buffer(i, it) * 2 * Br, *D_t = L_t + Br;
        if (threadIdx.x < Br) L_t[threadIdx.x] = log2_of_L(L_t[threadIdx.x]);
        __syncthreads();  // ... for every thread's share of it
        const int row0 = i * Br;
        const unsigned short *Q_t = Q_i + buffer(i, it) * Br * LS, *dO_t = dO_i + buffer(i, it) * Br * LS;

        float s[Br / 8][4] = {}, dp[Br / 8][4] = {};  // Alg. 2, lines 10 and 13
        mma_ABt<T, d, Br>(s, K_w, Q_t, LS);           // S_ij^T = K_j Q_i^T
        mma_ABt<T, d, Br>(dp, V_w, dO_t, LS);         // dP_ij^T = V_j dO_i^T
        if constexpr (mods::DROPOUT)  // chapter 6: dP = Z (dO V^T) / (1 - p), Z drawn as the forward did
            mods::dropout<true>(dp, mod_args, blockIdx.y, key0 + kw + g, row0 + 2 * q);
        // Alg. 2, lines 11 and 14: element e of tile n is key g + 8 (e / 2), query 8n + 2q + e % 2.
        // P = exp(scale S - L) = exp2(S c - L log2(e)) with c = scale log2(e): one fused multiply-add
        // and one exp2 (kernels/mma.cuh's fast_exp2, a single instruction) per element.
        if constexpr (mods::ANY) {  // chapter 6: P_ij^T of the modded scores, dp = (dP - D) score_mod'
            const mods::Tile state =
                mods::MASK ? mods::tile(mod_args, b, h, i, (key0 + kw) / mods::TILE, shift) : mods::PARTIAL;
            mods::backward_scores(s, dp, state, mod_args, b, h, key0 + kw + g, row0 + 2 * q, shift, Nq, scale,
                                  L_t + 2 * q, D_t + 2 * q);
        } else {
#pragma unroll
            for (int n = 0; n < Br / 8; ++n)
#pragma unroll
                for (int e = 0; e < 4; ++e)
                    s[n][e] = fast_exp2(fmaf(s[n][e], c, -L_t[8 * n + 2 * q + e % 2]));  // P_ij^T
        }
        // Only a tile where one of the warp's keys is past the end of the sequence or, causal, later
        // than the tile's first query sees needs the mask: the others skip its index arithmetic on
        // every element. (A query row past Nq needs none: its dO row is zero, see load_query_tile. A
        // row that sees no key has P = 0 already: log2_of_L.)
        const int last_key = key0 + kw + 15;
        if (last_key >= Nk || (causal && last_key > row0 + shift))
            mask_fragment<true>(s, key0 + kw + g, row0 + shift + 2 * q, Nk, causal, 0.0f);
#pragma unroll
        for (int n = 0; n < Br / 8; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e)  // dS_ij^T = P_ij^T * (dP_ij^T - D_i) (with mods, dp has the -D_i)
                dp[n][e] = mods::times_p(s[n][e], mods::ANY ? dp[n][e] : dp[n][e] - D_t[8 * n + 2 * q + e % 2]);
        unsigned pf[Br / 16][4], dsf[Br / 16][4];  // P_ij^T, dS_ij^T as A operands, in T
        if constexpr (mods::DROPOUT)               // dV_j += (Z P_ij / (1 - p))^T dO_i; dS took P itself
            mods::dropout<true>(s, mod_args, blockIdx.y, key0 + kw + g, row0 + 2 * q);
        a_operands<T, Br>(pf, s);
        a_operands<T, Br>(dsf, dp);
        mma_AB<T, Br, DC>(dV_j, pf, dO_t + c0, LS);  // Alg. 2, line 12: dV_j += P_ij^T dO_i
        mma_AB<T, Br, DC>(dK_j, dsf, Q_t + c0, LS);  // Alg. 2, line 16: dK_j += dS_ij^T Q_i (scale: later)

        // Alg. 2, line 15: dQ_i += dS_ij K_j. dsf[kb][e] holds key g + 8 (e % 2), queries 16 kb +
        // 8 (e / 2) + 2q and the next: one 4-byte store each into dS_ij^T's rows (dS_copies: who).
        if (stores_dS)
#pragma unroll
            for (int kb = 0; kb < Br / 16; ++kb)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = kw + g + 8 * (e % 2), y = 16 * kb + 8 * (e / 2) + 2 * q;
                    *reinterpret_cast<unsigned*>(&dS_w[key * LP + y]) = dsf[kb][e];
                }
        // dS_ij^T is complete, and every warp is done with tile i's buffers: the next tile's copies
        // may fill them (and the next dS_ij^T is written only after the next tile's barrier, when
        // every warp is done reading this one).
        __syncthreads();
        // Warp w takes query rows 16 (w % 4) .. 16 (w % 4) + 15 over all the block's keys, and half of
        // dQ_i's columns (w / 4). Those rows of dS_ij are columns of dS_T: their A operands come
        // transposed. 16 columns of dQ_i at a time keep 8 accumulators per lane, not d / 2.
        constexpr int ROW_TILES = Br / 16, COLS = d / (WARPS / ROW_TILES);  // a warp's columns of dQ_i
        const int y0 = w % ROW_TILES * 16, x0 = w / ROW_TILES * COLS;
        unsigned ds[Bc / 16][4];
#pragma unroll
        for (int kb = 0; kb < Bc / 16; ++kb)
            ldmatrix_x4_trans(ds[kb],
                              &dS_w[(kb * 16 + lane % 8 + lane / 16 * 8) * LP + y0 + lane / 8 % 2 * 8]);
#pragma unroll 4  // (d <= 128: every step; d = 256's 8, all unrolled, would spill registers)
        for (int x = x0; x < x0 + COLS; x += 16) {
            float dq[2][4] = {};
            mma_AB<T, Bc, 16>(dq, ds, K_j + x, LS);
#pragma unroll
            for (int t = 0; t < 2; ++t)
#pragma unroll
                for (int r = 0; r < 2; ++r) {  // rows g, g + 8; columns 2q, 2q + 1: one 2-float atomic
                    const int row = row0 + y0 + g + 8 * r;
                    if (row < Nq)
                        atomic_add2(&dQ_sum[(size_t)row * ld_q + x + 8 * t + 2 * q], dq[t][2 * r],
                                    dq[t][2 * r + 1]);
                }
        }
        i = next;
    }
    cp_async_wait<0>();  // a block that no query sees (causal, or Nq = 0) ran no tile: its copies land
    // Alg. 2, line 18: the warp's keys g and g + 8 of dK_j (times the scale left out above), dV_j.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int key = key0 + kw + g + 8 * r;
        if (key >= Nk) continue;
#pragma unroll
        for (int n = 0; n < DC / 8; ++n) {  // columns c0 + 8n + 2q and the next: one 4-byte store each
            const size_t at = (size_t)key * ld_kv + c0 + 8 * n + 2 * q;
            *reinterpret_cast<unsigned*>(&dK[at]) =
                pack<T>(scale * dK_j[n][2 * r], scale * dK_j[n][2 * r + 1]);
            *reinterpret_cast<unsigned*>(&dV[at]) = pack<T>(dV_j[n][2 * r], dV_j[n][2 * r + 1]);
        }
    }
}

// The host side, for the versions whose backward this is (3, and 4): D, dQ's sums zeroed, the pass,
// dQ converted, in the call's stream. Call, launch and bits are kernels/bindings.cu's: this part is
// compiled where bindings.cu includes the file (through a version's home), not where it stands alone.
#ifdef MINIMAL_FLASH_BINDINGS
template <class T, int d>
std::string run(const Call& c) {
    const long long rows = c.packed() ? c.rows : c.BH * c.N;  // of q, dQ; one float of D each
    float *dQ_sum = c.scratch, *D = c.scratch + rows * d;
    std::string err = launch("flash2_mma_backward::rowsum_D", rowsum_D<T, d>, dim3((rows + 255) / 256), 256,
                             0, c, bits(c.O), bits(c.dO), size_t(rows), D);
    if (err.empty() && cudaMemsetAsync(dQ_sum, 0, sizeof(float) * rows * d, c.stream) != cudaSuccess)
        err = "zeroing dQ failed: " + std::string(cudaGetErrorString(cudaGetLastError()));
    if (err.empty())
        err = launch("flash2_mma_backward::backward", backward<T, d>,
                     dim3(ceil_div(c.packed() ? c.Nk : c.N, keys(d)), c.BH), 32 * WARPS,
                     shared_bytes(d), c, bits(c.Q), bits(c.K), bits(c.V), bits(c.dO), c.L, D, c.N,
                     c.cu_seqlens_q, c.cu_seqlens_k, c.H, c.scale, c.causal, dQ_sum, bits(c.dK), bits(c.dV),
                     mods::of(c.mods));
    const size_t pairs = rows * d / 2;
    if (err.empty())
        err = launch("flash2_mma_backward::convert_dQ", convert_dQ<T>, dim3((pairs + 255) / 256), 256, 0, c,
                     dQ_sum, pairs, c.scale, bits(c.dQ));
    return err;
}
#endif

}  // namespace flash2_mma_backward

// Decoding with a KV cache (chapter 5): attention of a few new query positions per sequence (often
// one) against every key a sequence has cached, bf16 or fp16 in, fp32 accumulation, on chapter 3's
// mma.sync fragments (kernels/mma.cuh). minimal_flash.flash_attn_with_kvcache calls it.
//
// Why a kernel of its own. Chapter 3's forward gives a block 128 query rows of one (batch, head); at
// decode time a sequence has one query row, so that grid is batch * heads blocks of one useful row
// each, far fewer blocks than an H200 has multiprocessors (132), each reading its whole K and V
// alone. Two changes fix it, both of flash-decoding (Dao, Haziza, Massa, Sizov, "Flash-Decoding for
// long-context inference", 2023; FlashAttention-2.2):
//   1. Grouped heads become rows. The query heads that share a head of K and V (grouped-query
//      attention: group = nheads / nheads_k; multi-query: all of them) and the query positions are
//      the rows of one block, so a head of K and V is read once for its whole group, not group times:
//      block row r is position s = r / group of query head h = kv_head * group + r % group.
//   2. Split-KV. The keys of a sequence are cut into `splits` ranges of whole tiles, each its own
//      block, so batch * nheads_k * splits blocks share the reading of the cache. The kernel is
//      bound by memory (each key is used by a handful of rows), so the grid must keep every
//      multiprocessor reading. Each split writes its rows' O normalized by its own sum, and its
//      log-sum-exp, into fp32 scratch; `combine` then merges the splits of a row:
//          lse = log sum_s exp(lse_s),   O = sum_s exp(lse_s - lse) O_s
//      (the same rescaling the online softmax does tile by tile, done once per split). One split:
//      the decode kernel writes O and lse itself and combine does not run.
//
// Who owns what: one block per (row tile, batch * nheads_k + kv head, split), 4 warps, all of which
// load. The split's key tiles K_j, V_j (Bc = 64 keys) pass through STAGES buffers in shared memory;
// S_ij, P_ij and O stay in registers, as in flash2_mma.cu (lane (g, q) holds rows g and g + 8 of a
// warp's 16; mma.cuh has the layout). Who multiplies what depends on the rows:
//   * 16 rows, when a block's rows fit (one query row and up to 16 heads in a group: every decode
//     step of Llama-like models). The 4 warps split each tile's keys, 16 each, every warp with its
//     own m, l and O for all 16 rows, as the splits split a sequence; at the end they merge in shared
//     memory by the same rule as `combine`. Four warps, not one, run the products and the softmax
//     of a tile: one warp alone takes longer over a tile than the memory takes to deliver the
//     next, and it would be the kernel's critical path (its share of the copies and, paged, of the
//     page lookups, on top).
//   * 64 rows (a 16-row tile each warp): as in flash2_mma.cu, a warp's rows against all 64 keys.
//
//   16-row block (group = 4, seqlen_q = 3: 12 rows; rows 12-15 zeros, never written out)
//                         keys of K_j:  0-15     16-31    32-47    48-63
//   S_ij = Q_i K_j^T (16 x 64)        [warp 0] [warp 1] [warp 2] [warp 3]
//   O_w += P_w V_j[16w .. 16w + 15]    O_0      O_1      O_2      O_3     merged at the end into O
//   rows: (s 0, h 0..3) (s 1, h 0..3) (s 2, h 0..3)
//
//   keys of a sequence (L_b of them):  | split 0: tiles 0 .. t-1 | split 1: tiles t .. 2t-1 | ...
//
// Why STAGES buffers. Decoding reads the cache once and does little arithmetic with it, so its speed
// is how many bytes are on their way from memory at any moment: a block that waits for each tile
// before asking for the next one reads one tile per memory latency (about 2 us under load): with one
// such block per multiprocessor, under half the bandwidth. With STAGES buffers, STAGES - 1 tiles are in
// flight while one is multiplied; with 16-row tiles two blocks fit on a multiprocessor, so about 4
// tiles (128 KB at d = 128) are in flight on each.
//
// The causal mask aligns the queries with the end of the sequence (as the official package does):
// position s of seqlen_q sees key j iff j <= s + L_b - seqlen_q. Chapter 6's mods (a build with them:
// the official window_size, softcap, alibi_slopes, or a score_mod and mask_mod) see the same alignment,
// shift = L_b - seqlen_q, and b, h, q_idx = s, kv_idx = j of each row's own query head; a window alone
// also narrows the keys the splits cut to its band (mods::span), so that a step reads only those.
//
// The cache. A key row is found row by row: key j of sequence b is its row pad + j (pad =
// cache_leftpad[b], the rows a left-padded batch keeps before a sequence's first key; 0 without it),
// and row r is, contiguous, row r of sequence b's slice; paged, row r % page of page
// block_table[b][r / page]. A row of one head is d contiguous values either way, and reaches shared
// memory by cp.async, 16 bytes a thread (Copies below). Keys past the sequence's end (or a causal
// row's last) are masked to -inf; tiles wholly past the block's rows' are never loaded. Rows, heads
// and pages may lie at any strides of 16 bytes (Params::row_stride, head_stride, page_step), as the
// official package allows: transformers' cache, (batch, nheads_k, seqlen, d), is read in place through
// its transposed view, not copied into (batch, seqlen, nheads_k, d) first.
//
// Head dims. The kernels are compiled for d = 64, 128 and 256; the tensors' head dim (Params::dim) may be
// any multiple of 8 up to 256, and runs in the next kernel up: the columns of Q_i, K_j and V_j from dim on
// are zeros in shared memory (cp.async's zero fill: nothing read), which change no score q_i . k_j and give
// O zero columns, not written out. The cache is read as it lies, its own bytes and no more.
//
// Misuse. The kernel reads only what cache_seqlens and block_table say a sequence has, so it checks
// them first: a sequence whose length is out of the cache's range (or below its pad), or whose pages
// are not pages of the cache, reads nothing and gets NaN in all its output rows (minimal_flash checks
// the same on the host and raises, except while a CUDA graph is being captured, when only this check
// is left). Each block checks the pages of its split's share of the sequence and of its own tiles; a
// NaN in one split's lse makes the combined row NaN.
// A row that sees no key at all (L_b = 0, or causal with s + L_b - seqlen_q < 0) gets O = 0 and
// lse = -inf, the log of an empty sum.
// Names as in the paper; "Alg. 1, line n" marks the FlashAttention-2 paper's Algorithm 1.
#include "tiles.cuh"  // ceil_div
#include "mma.cuh"    // stride16, Padded, Swizzled, mma_ABt, a_operands, mma_AB, online_softmax, pack<T>, warp_sum
#include "hopper.cuh"  // launch_dependents, wait_for_prior_grid (combine launched early, sm_90)
#include "mods.cuh"    // chapter 6's hooks: mods::forward_score, span (no-ops without mods)

namespace flash_decode {

constexpr int WARPS = 4, THREADS = 32 * WARPS, Bc = 64;  // warps (all load), threads, keys per tile
constexpr int MAX_SPLITS = 128;                          // as the official package allows
// Rows per block: 16 (one warp's) when the block's rows fit, else 64. minimal_flash mirrors both
// (its split heuristic counts 2 blocks per multiprocessor for 16 rows up to d = 128, else 1).
__host__ __device__ constexpr int rows_per_block(int rows) { return rows <= 16 ? 16 : 64; }
// Buffers of K_j and V_j: up to d = 128 about 100 KB of them, so that two 16-row blocks share a
// multiprocessor. At d = 256 a tile of K and V is 64 KB: three buffers take 192 KB, one block to a
// multiprocessor (Hopper's 227 KB), with as many bytes in flight on it as two blocks at d = 128.
__host__ __device__ constexpr int stages(int d) { return d == 64 ? 5 : 3; }

// What a launch needs; the tensors' addresses and sizes (minimal_flash.py checked them).
struct Params {
    const unsigned short *Q, *K, *V;  // q (B, Sq, H, d); the caches (B, S_cache, Hk, d), or paged
                                      // (pages, page, Hk, d), each row's d values contiguous
    const int* cache_seqlens;         // (B,): the keys each sequence had before this call's new ones
    const int* block_table;           // (B, max_pages): the pages of each sequence; null: contiguous
    const int* cache_leftpad;         // (B,): where each sequence's keys start in its rows; null: at 0
    unsigned short* O;                // (B, Sq, H, d), in T
    float* L;                         // (B, H, Sq): the rows' log-sum-exp
    float *O_split, *L_split;         // splits > 1: (splits, B, Sq, H, dim) and (splits, B, H, Sq), fp32
    int B, Sq, H, Hk, group;          // group = H / Hk
    int dim;                          // the tensors' head dim: the kernel's d or less, a multiple of 8
    int seqlen_new;                   // keys appended this call: L_b = cache_seqlens[b] + seqlen_new
    int capacity;                     // the most keys a sequence may have: S_cache, or max_pages * page
    int page;                         // rows per page (contiguous: S_cache, one page per sequence)
    int max_pages, pages;             // block_table's columns; pages in the cache
    long long row_stride, head_stride;  // the caches' strides in values: from a row to the next, a head to the next
    int page_step;                      // and from a page (a sequence's slice) to the next, in rows
    int splits;
    float scale;
    bool causal;
};

// Shared memory: the row tile Q_i (padded rows, stride16), STAGES buffers each of K_j and V_j (16-bit
// rows of d values, swizzled), and one int for the check of the block table.
__host__ __device__ inline int shared_bytes(int Br, int d) {
    return (Br * stride16(d) + 2 * stages(d) * Bc * d) * 2 + 16;
}

// Where row j of sequence b lies in the cache, counted in rows (row_stride values each; page n's
// rows start at row n page_step: page_step = page for a contiguous cache).
__device__ inline int cache_row(const Params& p, int b, int j) {
    if (!p.block_table) return b * p.page_step + j;
    return p.block_table[(size_t)b * p.max_pages + j / p.page] * p.page_step + j % p.page;
}

// The cache rows of COUNT keys j0 + offset(k) of sequence b (-1: past `end`, not read). With pages of
// a tile or more, the tile's keys lie in at most two pages: one division and two reads of the block
// table for them, not one of each per key (the second page read only if a key of the sequence is in it).
template <int COUNT, class Offset>
__device__ void look_up_rows(int (&row)[COUNT], const Params& p, int b, int j0, int end, Offset offset) {
    if (p.block_table && p.page >= Bc) {
        const int* pages = p.block_table + (size_t)b * p.max_pages;
        const int first = j0 / p.page, o0 = j0 - first * p.page;
        const int page0 = pages[first];
        const int page1 = o0 + Bc > p.page && (first + 1) * p.page < end ? pages[first + 1] : 0;
#pragma unroll
        for (int k = 0; k < COUNT; ++k) {
            const int o = o0 + offset(k);
            row[k] = j0 + offset(k) >= end ? -1
                     : o < p.page          ? page0 * p.page_step + o
                                           : page1 * p.page_step + o - p.page;
        }
        return;
    }
#pragma unroll
    for (int k = 0; k < COUNT; ++k) {
        const int j = j0 + offset(k);
        row[k] = j < end ? cache_row(p, b, j) : -1;
    }
}

// How a block's tiles of K and V reach shared memory, into STAGES buffers (tile t of the split in
// buffer (t - t_begin) % STAGES), on one schedule (the loop in `decode`): the first STAGES - 1 tiles
// asked for at the start; then, for each tile, wait(): it has landed; a barrier; issue(): the copies
// of the tile STAGES - 1 further, into the buffer every warp has just finished with. Every thread
// copies the same 16-byte column of a few rows of each tile, by cp.async, a commit group per tile;
// rows swizzled (mma.cuh's Swizzled), so that 8 lanes' copies of a row fill a whole 128-byte line of
// shared memory. A tile's cache rows are looked up a tile ahead of its copies, so a read of the block
// table (paged) is never waited for; rows past the keys' end come as zeros (V's must: P is 0 there,
// and 0 x NaN is not).
struct Tiles {
    const Params& p;
    int b, h, pad, end, t_end;  // keys j < end of sequence b, in its rows pad + j
    unsigned short *K, *V;  // the buffers
};

template <int d>
struct Copies {
    static constexpr int CHUNKS = d / 8, STEP = THREADS / CHUNKS, COUNT = Bc / STEP, TILE = Bc * d;
    static __device__ Swizzled<d> layout() { return {}; }
    const Tiles& at;
    int row[COUNT];  // the cache rows of the thread's rows of the next tile to copy

    __device__ void look_up(int t) {
        look_up_rows(row, at.p, at.b, at.pad + t * Bc, at.pad + at.end,
                     [](int k) { return int(threadIdx.x) / CHUNKS + k * STEP; });
    }
    // Tile t into buffer `buffer` by cp.async, a commit group (empty past the split's end).
    __device__ void copy(int t, int buffer) {
        if (t < at.t_end) {
            const int x = threadIdx.x % CHUNKS * 8;
            const bool column = x < at.p.dim;  // a column of the cache's rows (else zeros)
            // cache row r's values of head h from column x on: r row_stride + h head_stride + x
            const size_t offset = at.h * at.p.head_stride + (column ? x : 0);
#pragma unroll
            for (int k = 0; k < COUNT; ++k) {
                const int r = threadIdx.x / CHUNKS + k * STEP, to = buffer * TILE + Swizzled<d>{}(r, x);
                const size_t from = max(row[k], 0) * at.p.row_stride + offset;
                cp_async16_first(at.K + to, at.p.K + from, row[k] >= 0 && column);  // read once: L2 evicts first
                cp_async16_first(at.V + to, at.p.V + from, row[k] >= 0 && column);
            }
        }
        cp_async_commit();
        if (t + 1 < at.t_end) look_up(t + 1);  // used at the next copy
    }
    __device__ void start(int t_begin) {  // the first tiles, the first group with what came before (Q_i)
        if (t_begin < at.t_end) look_up(t_begin);
        for (int i = 0; i < stages(d) - 1; ++i) copy(t_begin + i, i);
    }
    // Groups committed: S - 1 + i. All but the newest S - 2 landed: tile t has (this thread's part;
    // the barrier after makes it every thread's).
    __device__ void wait(int, int) { cp_async_wait<stages(d) - 2>(); }
    __device__ void issue(int t, int i) { copy(t + stages(d) - 1, (i + stages(d) - 1) % stages(d)); }
    __device__ void finish() { cp_async_wait<0>(); }  // nothing may land after the block is done
};

// Are the pages of sequence b's keys [j0, j1) pages of the cache (contiguous: yes)? The whole block
// checks them together (a flag in shared memory), and agrees.
__device__ inline bool pages_in_range(const Params& p, int b, int j0, int j1, int* flag) {
    if (!p.block_table) return true;
    if (threadIdx.x == 0) *flag = 0;
    __syncthreads();  // the flag is cleared before anyone sets it
    for (int i = j0 / p.page + threadIdx.x; i < ceil_div(j1, p.page); i += blockDim.x) {
        const int page = p.block_table[(size_t)b * p.max_pages + i];
        if (page < 0 || page >= p.pages) *flag = 1;
    }
    __syncthreads();  // every thread's pages are checked
    return *flag == 0;
}

// The warps of a 16-row block each hold, for all 16 rows, m, l and O over their own keys of every
// tile; warp 0 gets the merge, by the rule that `combine` applies to splits:
//     m = max_w m_w,   l = sum_w f_w l_w,   O = sum_w f_w O_w,   f_w = exp(scale (m_w - m))
// (f_w = 0 for a warp whose keys a row never saw: m_w = -inf). `scratch`: shared memory the tiles are
// done with, WARPS * (d / 8 * 4 * 32 + 2 * 16) floats. Returns true in warp 0, which then holds the
// merged m, l, O.
template <int d>
__device__ bool merge_warps(float (&m)[2], float (&l)[2], float (&o)[d / 8][4], float* scratch, float c) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4;
    float* parts = scratch;                // [warp][n][e][lane]: each lane's own, no bank conflict
    float* rows = parts + WARPS * d * 16;  // [warp][m, l][row]
    __syncthreads();                       // every warp is done with the tiles' buffers
#pragma unroll
    for (int n = 0; n < d / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) parts[((w * (d / 8) + n) * 4 + e) * 32 + lane] = o[n][e];
    if (lane % 4 == 0)
#pragma unroll
        for (int r = 0; r < 2; ++r)
            rows[(w * 2 + 0) * 16 + g + 8 * r] = m[r], rows[(w * 2 + 1) * 16 + g + 8 * r] = l[r];
    __syncthreads();  // every warp's part is written
    if (w != 0) return false;
    float f[WARPS][2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float m_all = -INFINITY;
        for (int v = 0; v < WARPS; ++v) m_all = fmaxf(m_all, rows[(v * 2) * 16 + g + 8 * r]);
        l[r] = 0.0f;
        for (int v = 0; v < WARPS; ++v) {
            const float m_v = rows[(v * 2) * 16 + g + 8 * r];
            f[v][r] = m_v == -INFINITY ? 0.0f : fast_exp2((m_v - m_all) * c);
            l[r] += f[v][r] * rows[(v * 2 + 1) * 16 + g + 8 * r];
        }
        m[r] = m_all;
    }
#pragma unroll
    for (int n = 0; n < d / 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            float sum = 0.0f;
#pragma unroll
            for (int v = 0; v < WARPS; ++v)
                sum += f[v][e / 2] * parts[((v * (d / 8) + n) * 4 + e) * 32 + lane];
            o[n][e] = sum;
        }
    return true;
}

template <class T, int d, int Br>
__global__ void __launch_bounds__(THREADS) decode(const Params p, const mods::Args mod_args) {
    constexpr int LS = stride16(d), S = stages(d), TILE = Copies<d>::TILE;
    unsigned short* Q_i = reinterpret_cast<unsigned short*>(smem);  // Br x LS
    unsigned short* K_j = Q_i + Br * LS;  // S buffers of TILE values: the split's i-th tile in i % S
    unsigned short* V_j = K_j + S * TILE;
    int* flag = reinterpret_cast<int*>(V_j + S * TILE);
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
    launch_dependents();  // combine, if it runs, may be launched now: it waits for this kernel's end

    // This block's sequence b, kv head h_kv, rows [row0, row0 + Br) of its Sq * group, and split.
    const int b = blockIdx.x / p.Hk, h_kv = blockIdx.x % p.Hk, split = blockIdx.z;
    const int rows = p.Sq * p.group, row0 = blockIdx.y * Br;
    // Its keys: rows pad .. cache_seqlens[b] + seqlen_new - 1 of its cache (cache_leftpad: the rows
    // before pad are not its own), key j in row pad + j; if in range.
    const int seqlen = p.cache_seqlens[b], pad = p.cache_leftpad ? p.cache_leftpad[b] : 0;
    const bool length_ok = 0 <= pad && pad <= seqlen && (long long)seqlen + p.seqlen_new <= p.capacity;
    int L = length_ok ? seqlen + p.seqlen_new - pad : 0;

    // The keys a row sees end at `L`, or, causal, at its position's limit s + L - Sq + 1; this block's
    // tiles end at its last row's. They are cut into `splits` ranges, this split taking its share.
    // Chapter 6 (a build with mods): a window alone also starts them at the block's first row's first
    // key, and ends them at its last row's last (mods::span; the positions' diagonal is at shift = L - Sq,
    // as causal's), so that the splits cut only the window's keys; any other mask: every key, each
    // score asked.
    const int last_s = (min(row0 + Br, rows) - 1) / p.group, shift = L - p.Sq;
    int end = p.causal ? max(0, min(L, last_s + L - p.Sq + 1)) : L, t_first = 0;
    if constexpr (mods::WINDOW_ONLY) {
        static_assert(Bc == mods::TILE, "a tile is a column of the mods' tiles");
        const int first_s = row0 / p.group;
        const mods::Span band =  // (its rows: the positions, in tiles of TILE)
            mods::span<false>(mod_args, b, 0, first_s / mods::TILE, last_s / mods::TILE + 1, shift);
        end = ((long long)band.last + 1) * Bc < end ? (band.last + 1) * Bc : end;  // (no right side: 2^30 tiles)
        t_first = min(band.first, ceil_div(end, Bc));
    }
    const int tiles = ceil_div(end, Bc) - t_first, per_split = ceil_div(tiles, p.splits);
    const int t_begin = t_first + min(tiles, split * per_split);
    int t_end = min(t_first + tiles, t_begin + per_split);
    // The pages the block checks before it reads any: those of its own tiles, and those of its
    // split's share of all L keys (which the splits of every row tile together cover, so that a bad
    // page anywhere makes every row of the sequence NaN). Its tiles can reach outside its share when
    // a causal row tile ends early (fewer tiles, cut into the same number of splits).
    const int share = ceil_div(ceil_div(L, Bc), p.splits) * Bc;
    const int j1 = min(max((split + 1) * share, t_end * Bc), L),
              j0 = min(min(split * share, t_begin * Bc), j1);
    const bool bad = !length_ok || !pages_in_range(p, b, pad + j0, pad + j1, flag);
    if (bad) L = 0, t_end = t_begin;  // reads nothing

    // Row `row` of the block: position s of query head h.
    auto q_at = [&](int row) {
        return ((size_t)b * p.Sq + row / p.group) * p.H + h_kv * p.group + row % p.group;
    };
    // Alg. 1, line 4: Q_i, by cp.async; lines 6-7 for the first S - 1 tiles.
    for (int e = threadIdx.x; e < Br * d / 8; e += blockDim.x) {
        const int r = e / (d / 8), x = e % (d / 8) * 8;
        const bool valid = row0 + r < rows && x < p.dim;  // (columns from dim on: zeros)
        cp_async16(Q_i + r * LS + x, p.Q + (valid ? q_at(row0 + r) * p.dim + x : 0), valid);
    }
    const Tiles tiles_at{p, b, h_kv, pad, end, t_end, K_j, V_j};
    Copies<d> copies{tiles_at};
    copies.start(t_begin);

    // The lane's two rows, g and g + 8 of the warp's 16: the end of the keys each sees.
    // This warp's rows, from `first`, and keys of each tile, from `k0`, KW of them (see the drawing).
    constexpr bool SPLIT_KEYS = Br == 16;
    constexpr int KW = SPLIT_KEYS ? Bc / WARPS : Bc;
    const int first = row0 + (SPLIT_KEYS ? 0 : w * 16), k0 = SPLIT_KEYS ? w * KW : 0;
    const bool has_rows = first < rows;  // warp-uniform
    int row_end[2];
#pragma unroll
    for (int r = 0; r < 2; ++r)
        row_end[r] = p.causal ? min(L, (first + g + 8 * r) / p.group + L - p.Sq + 1) : L;

    float o[d / 8][4] = {}, m[2] = {-INFINITY, -INFINITY}, l[2] = {};  // Alg. 1, line 5
    // The softmax's scale: with a score_mod, the scores come to it scaled already (mods::forward_score;
    // mods::softmax_scale).
    const float softmax_scale = mods::softmax_scale(mod_args, p.scale), c = softmax_scale * LOG2E;
    for (int t = t_begin; t < t_end; ++t) {
        const int i = t - t_begin;
        // Tile t has landed, for every thread past the barrier; past it every warp is also done with
        // tile t - 1, whose buffer, (i + S - 1) % S, takes tile t + S - 1.
        copies.wait(t, i);
        __syncthreads();
        copies.issue(t, i);
        const unsigned short *K_t = K_j + i % S * TILE, *V_t = V_j + i % S * TILE;
        if (has_rows) {
            float s[KW / 8][4] = {};
            // Alg. 1, line 8: S_ij = Q_i K_j^T (the warp's KW keys from k0: whole groups of 8 rows, so
            // the swizzle is the tile's)
            mma_ABt<T, d, KW>(s, Q_i + (first - row0) * LS, Padded{LS}, K_t + k0 * TILE / Bc,
                              Copies<d>::layout());
            // Keys past a row's end: -inf. Only keys that cross one of the lane's ends need it.
            const int key0 = t * Bc + k0;
            if constexpr (mods::ANY)  // chapter 6: each score scaled and modded, masked keys -inf
#pragma unroll
                for (int n = 0; n < KW / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {  // row (position s, query head h) against key j
                        const int row = first + g + 8 * (e / 2), s_pos = row / p.group;
                        const int h = h_kv * p.group + row % p.group, j = key0 + 8 * n + 2 * q + e % 2;
                        s[n][e] = mods::forward_score<mods::MASK>(s[n][e], mod_args, b, h, s_pos, j, shift, p.scale);
                    }
            if (key0 + KW > min(row_end[0], row_end[1]))
#pragma unroll
                for (int n = 0; n < KW / 8; ++n)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        if (key0 + 8 * n + 2 * q + e % 2 >= row_end[e / 2]) s[n][e] = -INFINITY;
            float alpha[2];
            online_softmax<true>(s, m, l, o, alpha, c);  // Alg. 1, line 9
            unsigned pf[KW / 16][4];
            a_operands<T, KW>(pf, s);
            mma_AB<T, KW, d>(o, pf, V_t + k0 * TILE / Bc,
                             Copies<d>::layout());  // Alg. 1, line 10: O += P_ij V_j
        }
    }
    copies.finish();        // nothing may still be landing when the block exits, or is overwritten below
    if (!has_rows) return;  // block-uniform for 16-row blocks: no barrier below is skipped by some warps
    // A row's l is its 4 lanes' shares.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    if constexpr (SPLIT_KEYS) {  // the 4 warps' m, l and O merged into warp 0's; the others are done
        static_assert(WARPS * (d / 8 * 4 * 32 + 2 * 16) * 4 <= 2 * S * TILE * 2, "the merge fits in K_j, V_j");
        if (!merge_warps<d>(m, l, o, reinterpret_cast<float*>(K_j), c)) return;
    }

    // Alg. 1, lines 12-15: O = O / l, lse = m + log(l). A row that saw no key (l = 0) gets O = 0 and
    // lse = -inf; a sequence out of range, NaN.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float l_row = l[r];
        const int row = first + g + 8 * r;
        if (row >= rows) continue;
        const float inv_l = bad ? NAN : l_row > 0.0f ? 1.0f / l_row : 0.0f;
        const float lse = bad ? NAN : l_row > 0.0f ? m[r] * softmax_scale + logf(l_row) : -INFINITY;
        const size_t at = q_at(row);                                              // (b, s, h) of O
        const size_t at_L = ((size_t)b * p.H + at % p.H) * p.Sq + row / p.group;  // (b, h, s) of L
        if (p.splits == 1) {
#pragma unroll
            for (int n = 0; n < d / 8; ++n)  // columns 8n + 2q, 8n + 2q + 1: one 4-byte store
                if (8 * n < p.dim)
                    *reinterpret_cast<unsigned*>(&p.O[at * p.dim + 8 * n + 2 * q]) =
                        pack<T>(o[n][2 * r] * inv_l, o[n][2 * r + 1] * inv_l);
            if (q == 0) p.L[at_L] = lse;
        } else {  // this split's share, in fp32, for combine
            const size_t at_split = (size_t)split * p.B * p.Sq * p.H + at;
#pragma unroll
            for (int n = 0; n < d / 8; ++n)
                if (8 * n < p.dim)
                    *reinterpret_cast<float2*>(&p.O_split[at_split * p.dim + 8 * n + 2 * q]) =
                        make_float2(o[n][2 * r] * inv_l, o[n][2 * r + 1] * inv_l);
            if (q == 0) p.L_split[(size_t)split * p.B * p.H * p.Sq + at_L] = lse;
        }
    }
}

// The splits of each row merged: lse = log sum_s exp(lse_s), O = sum_s exp(lse_s - lse) O_s. A block
// of 4 warps takes a row. Each warp finds the row's lse by itself: lane l reads lse_s of splits l,
// l + 32, l + 64, l + 96 (MAX_SPLITS = 128) and the warp reduces them by shuffles, so no warp waits
// for another until the end (a butterfly leaves the same max and sum in every lane, and every warp
// does the same sums: the four agree to the bit). Warp w then sums splits w, w + 4, w + 8, ... of O_s
// (each lane d / 32 columns), each weighed by exp(lse_s - lse), reading those lse_s once more (one
// value for the whole warp); the four warps' sums are added in shared memory. A warp reads its first
// PREFETCH splits of O_s and their lse_s with the row's lse_s, before the weights are known, and the
// rest without waiting for one another (unrolled): a row costs one trip to memory up to 64 splits (32
// at d = 256, whose lanes hold twice the columns; a decode step of batch 1 with 8 key/value heads has
// 32 on an H200), two beyond. An empty split
// (lse_s = -inf) weighs 0; a row with no key in any split gets O = 0 and lse = -inf, not the NaN of
// -inf - (-inf); a NaN from a sequence out of range stays NaN.
//
//   lane l of each warp:  lse_s, s = l, l + 32, ...  --(max, sum over the warp)-->  the row's lse
//   warp w:    sum of exp(lse_s - lse) O_s over s = w, w + 4, ...   (lane: columns C lane .. C lane + C - 1)
//   block:     O = warp 0's + warp 1's + warp 2's + warp 3's        (the one __syncthreads)
constexpr int COMBINE_WARPS = 4, COMBINE_THREADS = 32 * COMBINE_WARPS, LSE_PER_LANE = MAX_SPLITS / 32;
// The splits of O_s a warp asks for before the weights are known: 64 registers at d = 128 and 256.
__host__ __device__ constexpr int prefetch(int d) { return d == 256 ? 8 : 16; }
static_assert(MAX_SPLITS % 32 == 0, "a whole number of splits' lse per lane");
__host__ __device__ constexpr int combine_shared_bytes(int d) { return COMBINE_WARPS * d * 4; }

// C consecutive floats (8, 4 or 2) from `at` on, as one load (two of 4 for 8).
template <int C>
__device__ inline void load_columns(const float* from, size_t at, float (&o)[C]) {
    if constexpr (C >= 4) {
#pragma unroll
        for (int c = 0; c < C; c += 4) {
            const float4 v = *reinterpret_cast<const float4*>(&from[at + c]);
            o[c] = v.x, o[c + 1] = v.y, o[c + 2] = v.z, o[c + 3] = v.w;
        }
    } else {
        const float2 v = *reinterpret_cast<const float2*>(&from[at]);
        o[0] = v.x, o[1] = v.y;
    }
}

template <class T, int d>
__global__ void combine(const float* O_split, const float* L_split, int splits, int B, int Sq, int H, int dim,
                        unsigned short* O, float* L) {
    constexpr int C = d / 32, PREFETCH = prefetch(d);  // columns per lane: 8, 4 or 2
    static_assert(C == 8 || C == 4 || C == 2, "d = 256, 128 or 64");
    float* parts = smem;                                       // [warp][d]: each warp's sum
    const size_t rows = (size_t)B * Sq * H, row = blockIdx.x;  // (b, s, h) of O
    const int t = threadIdx.x, w = t / 32, lane = t % 32, h = row % H, s = row / H % Sq;
    const size_t at_L = (row / H / Sq * H + h) * Sq + s;  // (b, h, s) of L
    const bool columns = C * lane < dim;                   // the lane's columns are O's (dim < d: not all)
    wait_for_prior_grid();  // launched while the decode kernel ran (LAUNCH_AFTER): its results, now

    // Everything the warp needs up to PREFETCH of its splits, asked for at once: the row's lse_s, and
    // this warp's splits' O_s and lse_s (which need not wait for the row's lse).
    float pre[PREFETCH][C] = {}, lse_pre[PREFETCH], lse_l[LSE_PER_LANE];
#pragma unroll
    for (int k = 0; k < PREFETCH; ++k)
        if (const int i = w + COMBINE_WARPS * k; i < splits) {
            if (columns) load_columns(O_split, (i * rows + row) * dim + C * lane, pre[k]);
            lse_pre[k] = L_split[i * rows + at_L];
        }
#pragma unroll
    for (int j = 0; j < LSE_PER_LANE; ++j)
        lse_l[j] = lane + 32 * j < splits ? L_split[(lane + 32 * j) * rows + at_L] : -INFINITY;

    float m = -INFINITY, nan_flag = 0.0f;  // fmaxf skips a NaN: the flag keeps it
#pragma unroll
    for (int j = 0; j < LSE_PER_LANE; ++j) m = fmaxf(m, lse_l[j]), nan_flag += lse_l[j] != lse_l[j];
    m = warp_max(m);
    const bool nan = warp_max(nan_flag) != 0.0f, none = m == -INFINITY || nan;  // none: every weight is 0
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < LSE_PER_LANE; ++j) sum += none ? 0.0f : expf(lse_l[j] - m);
    sum = warp_sum(sum);
    const float lse = nan ? NAN : none ? -INFINITY : m + logf(sum);
    auto weight = [&](float lse_s) { return none ? 0.0f : expf(lse_s - lse); };  // 0 for lse_s = -inf

    float out[C] = {};
#pragma unroll
    for (int k = 0; k < PREFETCH; ++k)
        if (w + COMBINE_WARPS * k < splits) {
            const float weight_k = weight(lse_pre[k]);
#pragma unroll
            for (int c = 0; c < C; ++c) out[c] += weight_k * pre[k][c];
        }
#pragma unroll 8
    for (int i = w + COMBINE_WARPS * PREFETCH; i < splits; i += COMBINE_WARPS) {
        float o[C] = {};
        if (columns) load_columns(O_split, (i * rows + row) * dim + C * lane, o);
        const float weight_i = weight(L_split[i * rows + at_L]);
#pragma unroll
        for (int c = 0; c < C; ++c) out[c] += weight_i * o[c];
    }
#pragma unroll
    for (int c = 0; c < C; ++c) parts[w * d + C * lane + c] = out[c];
    __syncthreads();                                          // every warp's sum is written
    for (int x = 2 * t; x < dim; x += 2 * COMBINE_THREADS) {  // two columns a thread: one 4-byte store
        float o[2] = {};
        for (int v = 0; v < COMBINE_WARPS; ++v) o[0] += parts[v * d + x], o[1] += parts[v * d + x + 1];
        if (nan) o[0] = o[1] = NAN;
        *reinterpret_cast<unsigned*>(&O[row * dim + x]) = pack<T>(o[0], o[1]);
    }
    if (t == 0) L[at_L] = lse;
}

}  // namespace flash_decode

// The host side: the C function minimal_flash.Kernels calls, in version 3's build (Call, launch, bits,
// half_precision_error and OnDevice are kernels/bindings.cu's). Errors come back as a message, "" on
// success.
#ifdef MINIMAL_FLASH_BINDINGS
namespace flash_decode {
template <class T, int d, int Br>
std::string run(const Params& p, const Call& c) {
    std::string err = launch("flash_decode::decode", decode<T, d, Br>,
                             dim3(p.B * p.Hk, ceil_div(p.Sq * p.group, Br), p.splits), THREADS,
                             shared_bytes(Br, d), c, p, mods::of(c.mods));
    if (err.empty() && p.splits > 1)  // a block per row of O
        err = launch<true>("flash_decode::combine", combine<T, d>, dim3(p.B * p.Sq * p.H), COMBINE_THREADS,
                           combine_shared_bytes(d), c, p.O_split, p.L_split, p.splits, p.B, p.Sq, p.H, p.dim,
                           p.O, p.L);
    return err;
}
template <class T, int d>
std::string run(const Params& p, const Call& c) {
    return rows_per_block(p.Sq * p.group) == 16 ? run<T, d, 16>(p, c) : run<T, d, 64>(p, c);
}
}  // namespace flash_decode

extern "C" const char* mf_decode(const float* Q, const float* K, const float* V, const int* cache_seqlens,
                                 const int* block_table, const int* cache_leftpad, float* O, float* L,
                                 float* O_split, float* L_split, int B, int Sq, int H, int Hk, int d,
                                 int seqlen_new, int capacity, int page, int max_pages, int pages,
                                 long long row_stride, long long head_stride, int page_step, int splits,
                                 float scale, bool causal, int dtype, int device, void* stream,
                                 const void* mod_args) {
    static thread_local std::string message;  // lives until the next call from this thread
    namespace fd = flash_decode;
    Call c{};  // what launch() reads: the device and the stream (and, for the checks, d, dtype, scale)
    c.d = d, c.dtype = dtype, c.scale = scale, c.device = device, c.stream = cudaStream_t(stream);
    c.mods = mod_args;  // a build with mods: the window_size, softcap, alibi_slopes (or mods) of the call
    const int group = Hk > 0 ? H / Hk : 0;
    const fd::Params p{bits(Q), bits(K), bits(V), cache_seqlens, block_table, cache_leftpad, bits(O), L,
                       O_split, L_split, B, Sq, H, Hk, group, d, seqlen_new, capacity, page, max_pages, pages,
                       row_stride, head_stride, page_step, splits, scale, causal};
    message = half_precision_error(c, 3, d >= 8 && d <= 256 && d % 8 == 0, "a multiple of 8 up to 256 (the decode "
                                   "kernels)");
    if (message.empty() && (Hk < 1 || H % Hk != 0 || splits < 1 || splits > fd::MAX_SPLITS ||
                            mods::HOOKED != (mod_args != nullptr)))
        message = "internal error: " + std::to_string(H) + " query heads, " + std::to_string(Hk) +
                  " kv heads, " + std::to_string(splits) + " splits" +
                  (mods::HOOKED != (mod_args != nullptr) ? ", mods and the build disagree" : "");
    else if (message.empty() && (long long)Sq * p.group > 65535LL * 64)
        message = "seqlen_q * nheads / nheads_k = " + std::to_string((long long)Sq * p.group) +
                  ": more than the 65535 row tiles of 64 a grid column may have";
    if (!message.empty()) return message.c_str();
    const OnDevice on(device);
    // A head dim between the kernels' runs in the next one up, its columns from d on zeros (fd::Params::dim).
    if (dtype == BFLOAT16)
        message = d <= 64    ? fd::run<__nv_bfloat16, 64>(p, c)
                  : d <= 128 ? fd::run<__nv_bfloat16, 128>(p, c)
                             : fd::run<__nv_bfloat16, 256>(p, c);
    else
        message = d <= 64    ? fd::run<__half, 64>(p, c)
                  : d <= 128 ? fd::run<__half, 128>(p, c)
                             : fd::run<__half, 256>(p, c);
    return message.c_str();
}
#endif

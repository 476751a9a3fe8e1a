// Your own attention (chapter 6): a score_mod and a mask_mod, written by the user as C++ expressions,
// compiled into the kernels of versions 3 and 4. As in PyTorch's FlexAttention:
//
//   score  = softmax_scale * q_i . k_j                       (the score, scaled)
//   score  = score_mod(score, b, h, q_idx, kv_idx)           (a bias, a cap, ...)
//   keep   = mask_mod(b, h, q_idx, kv_idx)                   (false: the key is masked, as -inf)
//   P      = softmax over the kept keys;   O = P V
//
// minimal_flash.py writes the two functions into a header of the build (mods_header: the user's
// expressions, the official options window_size, softcap and alibi_slopes as mods of their own, and
// an accessor per extra tensor) and compiles with -DMODS_FILE=that header; without it, the defaults
// below: no mod, the kernels as chapters 3 and 4 left them (`if constexpr` removes every hook). The
// functions also get `shift`, the sequence's keys minus its queries (0 but for packed sequences of
// flash_attn_varlen_func and KV caches of flash_attn_with_kvcache, on version 3's build), from which
// the official window and ALiBi measure distance: query q_idx's diagonal is key q_idx + shift, as
// causal's is.
//
// Where the hooks run (version 3: flash2_mma.cu, flash2_mma_backward.cu; version 4: flash3_hopper.cu,
// flash3_hopper_backward.cu):
//   forward   after S_ij = Q_i K_j^T, before the online softmax: each score modded, masked keys -inf
//   backward  after S_ij^T = K_j Q_i^T: the same mod, by Dual numbers, gives the score and its
//             derivative d score_mod / d score at once; dS = P (dP - D) times that derivative
//   both      tiles that the block mask (block_mask below) marks empty are skipped; full ones skip
//             mask_mod; only partial tiles call it per element (a window alone: window_tiles)
#pragma once
#include <climits>
#include <cmath>
#include <type_traits>
#include "mma.cuh"     // LOG2E, fast_tanh
#include "philox.cuh"  // dropout's mask, drawn again in the backward

namespace mods {

// What a call hands the hooks at run time (minimal_flash.Kernels fills it, ctypes: ModArgs):
// the extra tensors' addresses, shapes and strides (mod_tensors), the official options' values (so
// that another window size does not recompile), the batch and heads (b = bh / H, h = bh % H), and
// the block mask, if any.
struct Args {
    const void* tensors[4];
    long long shapes[4][4], strides[4][4];  // in elements; a tensor of n < 4 dims has n of each
    int ints[4];                            // window_size's left and right (-1: unlimited)
    float floats[4];                        // softcap
    int H;                                  // query heads
    const unsigned char* block_mask;        // EMPTY / PARTIAL / FULL per 64 x 64 tile; null: all partial
    const int* ranges;     // per row of tiles, its first and last tile not EMPTY; per column too
    int mask_zb, mask_zh;  // (b, h)'s mask: number b zb + h zh (0: the same for all b, or h)
    int mask_tiles;        // tiles per row and per column
    unsigned seed[2];      // dropout: Philox's key, drawn from torch's generator per call
    unsigned threshold;    // dropout: a pair is kept when its random word is >= p 2^32
    float keep_scale;      // dropout: 1 / (1 - p)
};

// The block mask's tiles: 64 queries x 64 keys, so that every pass's tiles are unions of them
// (version 3's forward 128 queries x 64 keys, version 4's 128 x 128; both backwards 64 queries x 128
// keys).
constexpr int TILE = 64;
enum Tile : unsigned char { EMPTY = 0, PARTIAL = 1, FULL = 2 };

// A mod tensor's elements as the mod reads them: name[i] (1-D) or name(i, j, ...), one index per dim
// (DIMS; another count does not compile), as a T (float, int, long long); an index outside the tensor
// reads 0, never out of bounds.
template <class T, class Stored, int DIMS>
struct Tensor {
    const Args& a;
    int t;  // which of Args' tensors
    __device__ T operator[](long long i) const { return (*this)(i); }
    template <class... I>
    __device__ T operator()(I... index) const {
        static_assert(sizeof...(I) == DIMS, "a mod tensor takes one index per dim: name(i, j) for 2 dims, "
                                            "name[i] or name(i) for 1");
        const long long at[] = {(long long)index...};
        long long offset = 0;
        bool inside = true;
        for (int x = 0; x < int(sizeof...(I)); ++x) {
            inside = inside & (at[x] >= 0) & (at[x] < a.shapes[t][x]);
            offset += at[x] * a.strides[t][x];
        }
        // Outside, element 0 is read (a tensor has one: minimal_flash._mod_args gives an empty one a zero)
        // and 0 returned: a select, not a branch around the load. Then a read whose index is the same for
        // every score (alibi_slopes[h]) is the same instruction on the same address, which the compiler
        // makes once, not once per score behind its own branch.
        const T value = T(convert(load(static_cast<const Stored*>(a.tensors[t]) + (inside ? offset : 0))));
        return inside ? value : T(0);
    }
    // A plain read (bool as its byte). The tensor is a constant while the kernel runs, and with no branch
    // around the read (above), a read whose address is the same for every score (alibi_slopes[h]) is made
    // once and kept. Not __ldg, CUDA's read through the read-only cache: its headers make it `asm
    // volatile`, which no compiler pass merges, so it would be made again for every score.
    __device__ static Stored load(const Stored* p) {
        if constexpr (std::is_same_v<Stored, bool>)
            return *reinterpret_cast<const unsigned char*>(p) != 0;
        else
            return *p;
    }
    template <class S>
    __device__ static auto convert(S value) {
        if constexpr (std::is_same_v<S, __nv_bfloat16>)
            return __bfloat162float(value);
        else if constexpr (std::is_same_v<S, __half>)
            return __half2float(value);
        else
            return value;
    }
};

// Dual numbers: a value and its derivative with respect to the score. The backward calls the same
// score_mod on Dual(score, 1) and gets f(score) and f'(score) in one go (forward-mode automatic
// differentiation), so a mod written for the forward needs no hand-written gradient. Enough
// arithmetic and math functions for the common mods; a mod that calls another function does not
// compile for the backward, and the compiler's message names it.
struct Dual {
    float v, d;
    __device__ Dual(float v = 0.0f, float d = 0.0f) : v(v), d(d) {}
};
__device__ inline Dual operator+(Dual a, Dual b) { return {a.v + b.v, a.d + b.d}; }
__device__ inline Dual operator-(Dual a, Dual b) { return {a.v - b.v, a.d - b.d}; }
__device__ inline Dual operator-(Dual a) { return {-a.v, -a.d}; }
__device__ inline Dual operator*(Dual a, Dual b) { return {a.v * b.v, a.d * b.v + a.v * b.d}; }
// A constant factor (derivative 0): without these, Dual(c) would add a.v * 0 that the compiler must keep
// (it is NaN for an infinite a.v).
__device__ inline Dual operator*(Dual a, float c) { return {a.v * c, a.d * c}; }
__device__ inline Dual operator*(float c, Dual a) { return a * c; }
__device__ inline Dual operator/(Dual a, Dual b) {
    return {a.v / b.v, (a.d * b.v - a.v * b.d) / (b.v * b.v)};
}
__device__ inline bool operator<(Dual a, Dual b) { return a.v < b.v; }
__device__ inline bool operator>(Dual a, Dual b) { return a.v > b.v; }
__device__ inline bool operator<=(Dual a, Dual b) { return a.v <= b.v; }
__device__ inline bool operator>=(Dual a, Dual b) { return a.v >= b.v; }
__device__ inline bool operator==(Dual a, Dual b) { return a.v == b.v; }
__device__ inline bool operator!=(Dual a, Dual b) { return a.v != b.v; }
using ::expf, ::exp2f, ::logf, ::tanhf, ::fast_tanh, ::sqrtf, ::fabsf, ::fminf, ::fmaxf;  // the float ones
__device__ inline Dual expf(Dual a) {
    const float e = ::expf(a.v);
    return {e, a.d * e};
}
__device__ inline Dual exp2f(Dual a) {
    const float e = ::exp2f(a.v);
    return {e, a.d * e * 0.69314718f};
}
__device__ inline Dual logf(Dual a) { return {::logf(a.v), a.d / a.v}; }
__device__ inline Dual tanhf(Dual a) {
    const float t = ::tanhf(a.v);
    return {t, a.d * (1.0f - t * t)};
}
__device__ inline Dual fast_tanh(Dual a) {  // mma.cuh's one instruction, within 2^-11 of tanhf
    const float t = ::fast_tanh(a.v);
    return {t, a.d * (1.0f - t * t)};
}
__device__ inline Dual sqrtf(Dual a) {
    const float s = ::sqrtf(a.v);
    return {s, a.d * 0.5f / s};
}
__device__ inline Dual fabsf(Dual a) { return a.v < 0.0f ? -a : a; }
__device__ inline Dual fminf(Dual a, Dual b) { return b.v < a.v ? b : a; }
__device__ inline Dual fmaxf(Dual a, Dual b) { return b.v > a.v ? b : a; }

// window_size's test of one score (offset = kv_idx - q_idx - shift; a side < 0 is unlimited), as `&`
// of two compares: no branch, so that the lanes of a tile the window cuts do not diverge.
__device__ inline bool in_window(int offset, const Args& a) {
    const int lo = a.ints[0] < 0 ? INT_MIN : -a.ints[0], hi = a.ints[1] < 0 ? INT_MAX : a.ints[1];
    return (offset >= lo) & (offset <= hi);
}
}  // namespace mods

#ifdef MODS_FILE
#include MF_FILE(MODS_FILE)  // minimal_flash.mods_header's: SCORE, MASK, score_mod, mask_mod
#else
namespace mods {
constexpr bool SCORE = false, MASK = false, DROPOUT = false;  // no mod: chapter 3's kernels
constexpr bool WINDOW_ONLY = false;   // the mask is window_size's alone (see window_tiles)
constexpr bool SOFTCAP_ONLY = false;  // the score_mod is softcap's alone (see softmax_scale)
template <class F>
__device__ inline F score_mod(F score, int, int, int, int, int, const Args&) {
    return score;
}
__device__ inline bool mask_mod(int, int, int, int, int, const Args&) { return true; }
}  // namespace mods
#endif

namespace mods {

constexpr bool ANY = SCORE || MASK;
constexpr bool HOOKED = ANY || DROPOUT;  // a build that takes a mods::Args

// The scale a raw score q_i . k_j gets before score_mod, and the softmax's own after it (in the
// exponent's multiply-add, and in L = m softmax_scale + log l). With a score_mod: scale, then 1, so
// that the mod sees the scaled score, as FlexAttention's does. Without one: the softmax's scale alone,
// the kernels as chapters 3 and 4 left them. softcap alone, cap tanh(score / cap), is folded into
// the two: its mod is tanh (of scale / cap times q_i . k_j), and the cap multiplies in the exponent's
// multiply-add, which the softmax does anyway: two multiplies a score fewer than cap * tanh(score *
// (1 / cap)). Its derivative is the same either way: d(cap tanh(x / cap)) / dx = d tanh(y) / dy at
// y = x / cap, 1 - tanh^2, which the backward takes as it is.
__device__ inline float score_scale(const Args& a, float scale) {
    return SOFTCAP_ONLY ? scale * a.floats[1] : scale;
}
__device__ inline float softmax_scale(const Args& a, float scale) {
    return !SCORE ? scale : SOFTCAP_ONLY ? a.floats[0] : 1.0f;
}

// Softcap alone bounds every score the softmax sees: tanh's, at most 1 (the cap multiplies in the
// exponent, c = cap log2 e). Version 4's forward then fixes each row's running max at that bound from
// the first tile on (online_softmax's fixed_max), and a max that never moves rescales neither l nor O:
// no max per score, no shuffles, no multiply of O's 64 floats a thread a tile. But P = exp2((t - 1) c)
// then lies anywhere in [2^-2c, 1], however far below the cap a row's scores lie, and it goes to the
// tensor cores in T: it must stay a normal number there, 2^-126 and up in bf16 (a cap up to 43.6),
// 2^-14 in fp16 (a cap up to 4.8: fp16 has 5 exponent bits). A larger cap keeps the running max.
template <class T>
__device__ inline bool bounded(float c) {
    return SOFTCAP_ONLY && c <= (std::is_same_v<T, __half> ? 7.0f : 63.0f);
}

// Call::mods as the kernels take it: by value (no mods: all zero).
inline Args of(const void* args) { return args ? *static_cast<const Args*>(args) : Args{}; }

// A window alone (window_size, no mask_mod) needs no block mask: its tiles' states are arithmetic, as
// in the official kernels, for fixed-length and packed sequences alike (whose lengths differ, so that
// no one block mask would do). Query i keeps keys i + shift - left .. i + shift + right, so rows
// r0 .. r1 keep, together, keys r0 + shift - left .. r1 + shift + right (a band), and each of them the
// keys r1 + shift - left .. r0 + shift + right. Rows y0 .. y1 - 1 and columns x0 .. x1 - 1, in TILE
// units (past the sequence's end too: the kernels mask keys past it themselves). In 32 bits: windows
// are below 2^30 (minimal_flash.py takes a larger one as no limit), and so are sequences.
__device__ inline Tile window_tiles(const Args& a, int shift, int y0, int y1, int x0, int x1) {
    const int left = a.ints[0], right = a.ints[1], r0 = y0 * TILE + shift, r1 = y1 * TILE - 1 + shift;
    const int c0 = x0 * TILE, c1 = x1 * TILE - 1;
    const bool some = (left < 0 || c1 >= r0 - left) && (right < 0 || c0 <= r1 + right);
    const bool all = (left < 0 || c0 >= r1 - left) && (right < 0 || c1 <= r0 + right);
    return !some ? EMPTY : all ? FULL : PARTIAL;
}

// The block mask's entry for query tile y and key tile x (in TILE units) of (b, h): PARTIAL where
// there is no block mask (a call without a mask: every tile goes through the mask, which then has
// nothing to mask; KV caches; packed sequences that no one block mask serves); EMPTY past the mask's
// last tile (a block's tile of 128 that reaches past N covers one there; nothing is read out of the
// mask's bounds). A window alone: window_tiles, shift the sequence's keys minus its queries (0 but for
// packed sequences).
__device__ inline Tile tile(const Args& a, int b, int h, int y, int x, int shift = 0) {
    if constexpr (WINDOW_ONLY) return window_tiles(a, shift, y, y + 1, x, x + 1);
    if (!MASK || !a.block_mask) return PARTIAL;
    const long long T = a.mask_tiles;
    if (y >= T || x >= T) return EMPTY;
    return Tile(a.block_mask[(b * a.mask_zb + h * a.mask_zh) * T * T + y * T + x]);
}
// The tiles not EMPTY lie in [first, last] of a row of tiles (rows y0 .. y1 - 1 taken together; COLUMNS:
// of columns, that is rows of the backward's walk over query tiles): the walks start and stop there, so
// that the empty tiles before and after a band (causal as a mask_mod, say) are never read one by one.
// Without a block mask, everything: [0, a large number]. A window alone: its band (window_tiles), rows
// r0 .. r1 keep keys r0 + shift - left .. r1 + shift + right, and keys c0 .. c1 are kept by queries
// c0 - shift - right .. c1 - shift + left.
struct Span {
    int first, last;
};
template <bool COLUMNS>
__device__ inline Span span(const Args& a, int b, int h, int y0, int y1, int shift = 0) {
    if constexpr (WINDOW_ONLY) {
        // rows (COLUMNS: keys) y0 TILE .. y1 TILE - 1 see keys (queries) from lo to hi
        const int before = COLUMNS ? a.ints[1] : a.ints[0], after = COLUMNS ? a.ints[0] : a.ints[1];
        const int offset = COLUMNS ? -shift : shift;
        const int from = y0 * TILE + offset - before, to = y1 * TILE - 1 + offset + after;
        const int lo = before < 0 || from < 0 ? 0 : from, hi = after < 0 ? 1 << 30 : to;
        return hi < lo ? Span{1 << 30, -1} : Span{lo / TILE, hi / TILE};
    }
    if (!MASK || !a.block_mask) return {0, 1 << 30};
    const int* r = a.ranges + ((b * a.mask_zb + h * a.mask_zh) * 2 + COLUMNS) * 2 * a.mask_tiles;
    Span s{1 << 30, -1};
    for (int y = y0; y < y1; ++y) s.first = min(s.first, r[2 * y]), s.last = max(s.last, r[2 * y + 1]);
    return s;
}
// A block's walk over its row (or column) of tiles, `end` of them: the tiles that empty(j) does not
// call EMPTY, in order, within the span (per: the block mask's tiles to one tile walked, 1 or 2);
// every tile where skip is false (no mask_mod; version 4's deterministic backward). first(start): the
// first tile walked from tile `start` on; next(j): the one after j; `end` when there is none.
template <class Empty>
struct Walk {
    int from, stop, end;  // the span's first tile, and past its last (skip: else 0 and end)
    bool skip;
    Empty empty;
    __device__ int next(int j) const {
        if constexpr (!MASK) {
            return j + 1;  // (a build without a mask_mod: nothing else to keep in registers)
        } else {
            do ++j;
            while (skip && j < stop && empty(j));
            return skip && j >= stop ? end : j;
        }
    }
    __device__ int first(int start) const { return MASK ? next(max(start, from) - 1) : start; }
};
template <class Empty>
__device__ inline Walk<Empty> walk(Span span, int per, int end, bool skip, Empty empty) {
    return {skip ? span.first / per : 0, skip ? min(end, span.last / per + 1) : end, end, skip, empty};
}

// A run of tiles (rows y0 .. y1 - 1, columns x0 .. x1 - 1) as one: EMPTY if all are, FULL if all
// are, else PARTIAL. The forward's tile of 128 queries is 2 rows; the backward's 128 keys, 2 columns.
__device__ inline Tile tiles(const Args& a, int b, int h, int y0, int y1, int x0, int x1, int shift = 0) {
    if constexpr (WINDOW_ONLY) return window_tiles(a, shift, y0, y1, x0, x1);
    bool all_empty = true, all_full = true;
    for (int y = y0; y < y1; ++y)
        for (int x = x0; x < x1; ++x) {
            const Tile t = tile(a, b, h, y, x);
            all_empty &= t == EMPTY, all_full &= t == FULL;
        }
    return all_empty ? EMPTY : all_full ? FULL : PARTIAL;
}

// The block mask, before the passes: one block per (tile of 64 queries, tile of 64 keys, (b, h)),
// a thread per query of the tile, each asking mask_mod about its 64 keys. grid.z runs over the
// (b, h) that the mask tells apart: B * H if it reads both, B or H if one, 1 if neither (mods_header
// sees which). N queries and keys; tiles past N are never asked for. shift: the sequences' keys minus
// queries (0 for a fixed-length batch; packed sequences share one block mask only where it is one
// shift for all of them, or the mask does not read it: minimal_flash.py's _packed_block_mask).
__global__ void block_mask(Args a, int N, int shift, int B_mask, int H_mask, unsigned char* out) {
    int* counts = reinterpret_cast<int*>(smem);  // the block's kept (query, key) pairs, [0]
    const int y = blockIdx.y, x = blockIdx.x, z = blockIdx.z, b = z / H_mask, h = z % H_mask;
    const int row = y * TILE + threadIdx.x;
    int kept = 0, asked = 0;
    if (row < N)
        for (int col = x * TILE; col < min(x * TILE + TILE, N); ++col)
            kept += mask_mod(b, h, row, col, shift, a), ++asked;
    counts[threadIdx.x] = kept, counts[TILE + threadIdx.x] = asked;
    __syncthreads();
    if (threadIdx.x == 0) {
        int all_kept = 0, all_asked = 0;
        for (int t = 0; t < TILE; ++t) all_kept += counts[t], all_asked += counts[TILE + t];
        out[(long long)z * gridDim.y * gridDim.x + y * gridDim.x + x] = all_kept == 0           ? EMPTY
                                                                        : all_kept == all_asked ? FULL
                                                                                                : PARTIAL;
    }
}
__host__ __device__ inline int block_mask_shared_bytes() { return 2 * TILE * sizeof(int); }

// The forward's hook, on one accumulator tile of S (16 rows x NT tiles of 8 keys, mma.cuh's layout:
// rows `row` and row + 8, columns col + 8n and col + 8n + 1): with a score_mod, each score scaled and
// modded (the softmax that follows then takes its scale as 1); with a mask_mod, -inf where it says no.
// state: the block mask's tile of each 64 of those keys in turn (NT / 8 of them): FULL keeps every
// score without a call; PARTIAL calls mask_mod score by score, and EMPTY takes the same code with
// `none` set, so that the -inf comes from one select for both and the kernel holds one copy of the
// loop, not two. A state is the same for the whole warp, so each 64 keys take one branch, not a test
// per score. A mask alone leaves the kept scores as they are: the softmax's exponent applies the scale
// in its multiply-add, as without mods.
template <bool ASK>  // one raw score of (q_idx, kv_idx): score_mod on it scaled; ASK: -inf where mask_mod says no
__device__ inline float forward_score(float x, const Args& a, int b, int h, int q_idx, int kv_idx, int shift,
                                      float scale, bool none = false) {  // none: -inf whatever mask_mod says
    if constexpr (SCORE) x = score_mod(x * score_scale(a, scale), b, h, q_idx, kv_idx, shift, a);
    if constexpr (ASK) x = (!none & mask_mod(b, h, q_idx, kv_idx, shift, a)) ? x : -INFINITY;
    return x;
}
template <bool ASK, int NT>  // 64 keys from tile n0 on: score_mod on each score; ASK: mask_mod too
__device__ inline void forward_keys(float (&s)[NT][4], int n0, const Args& a, int b, int h, int row, int col,
                                    int shift, float scale, bool none = false) {
#pragma unroll
    for (int n = n0; n < n0 + 8; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e)
            s[n][e] = forward_score<ASK>(s[n][e], a, b, h, row + 8 * (e / 2), col + 8 * n + e % 2, shift, scale,
                                         none);
}
template <int NT>
__device__ inline void forward_scores(float (&s)[NT][4], const Tile (&state)[NT / 8], const Args& a, int b,
                                      int h, int row, int col, int shift, float scale) {
    static_assert(NT % 8 == 0, "whole tiles of 64 keys");
#pragma unroll
    for (int t = 0; t < NT / 8; ++t) {
        const Tile kind = MASK ? state[t] : FULL;
        if (kind != FULL)  // PARTIAL or EMPTY: only a mask makes them
            forward_keys<MASK>(s, 8 * t, a, b, h, row, col, shift, scale, kind == EMPTY);
        else if (SCORE)  // FULL: a mask alone has nothing to do
            forward_keys<false>(s, 8 * t, a, b, h, row, col, shift, scale);
    }
}

// The backward's hook, on one accumulator tile of S^T (keys are rows: `key` and key + 8; queries
// col + 8n, col + 8n + 1): s becomes P^T = exp(score_mod(scale s) - L), 0 where masked (and for
// queries past Nq, whose L is a stand-in: see flash2_mma_backward.cu), and f score_mod's derivative,
// so that P (dP - D) f is dS with respect to the scaled score. L2: log2_of_L of L. Apart from dP, so that
// a kernel can run it while dP's product is still on the tensor cores (version 4); where score_mod's
// derivative is a constant (none, a bias, ALiBi), f is one too, and takes no registers. LATE (version
// 4, softcap alone): s becomes score_mod's value (tanh) instead, -inf where masked, and late_probabilities
// takes it from there after dP's product.
template <bool LATE = false, int NT>
__device__ inline void backward_probabilities(float (&s)[NT][4], float (&f)[NT][4], Tile state, const Args& a,
                                              int b, int h, int key, int col, int shift, int Nq, float scale,
                                              const float* L2) {
    const float c = softmax_scale(a, scale) * LOG2E;  // a mask alone: the scale in the multiply-add
    // ASK: test each score (mask_mod, the end of the queries); else keep them all
    const auto probabilities = [&](auto ask) {
#pragma unroll
        for (int n = 0; n < NT; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kv_idx = key + 8 * (e / 2), y = 8 * n + e % 2, q_idx = col + y;
                Dual x(SCORE ? s[n][e] * score_scale(a, scale) : s[n][e], 1.0f);
                if constexpr (SCORE) x = score_mod(x, b, h, q_idx, kv_idx, shift, a);
                bool keep = true;
                if constexpr (decltype(ask)::value) {
                    keep = q_idx < Nq;  // (a row that sees no key: its L2 is +inf, log2_of_L, and P = 0)
                    if constexpr (MASK) keep = keep & mask_mod(b, h, q_idx, kv_idx, shift, a);
                }
                // Not `keep ? exp2(...) : 0`, nor the exponent computed inside the test, nor `&&`: those
                // compile to branches per score around the exponential and the mask's tests, and in a tile
                // the mask cuts (a window's edge) a warp's lanes take both sides. Here every lane computes
                // the same instructions, and a select gives -inf, whose exp2 is 0.
                if constexpr (LATE) {
                    s[n][e] = keep ? x.v : -INFINITY;  // tanh, for late_probabilities
                } else {
                    const float exponent = x.v * c - L2[y];
                    s[n][e] = fast_exp2(keep ? exponent : -INFINITY);
                }
                f[n][e] = x.d;
            }
    };
    // With a mask, most tiles are FULL, and all of the lane's queries before Nq: they take a loop with
    // no test in it. In one loop, each score would pay for its tests even in a FULL tile: a compare and a
    // branch, or the test predicated, whose instructions take their issue slots where they do nothing
    // (the state is the same for the whole warp: one branch a tile here). Without a mask, one loop: the
    // second copy would cost a score_mod's registers more than its one test a score.
    if (MASK && state == FULL && col + 8 * (NT - 1) + 1 < Nq)
        probabilities(std::false_type{});
    else
        probabilities(std::true_type{});
}
// dS = P (dP - D) f, as times_p(P, (dP - D) f), but 0 where P is 0 (a masked pair, a key or query past
// the sequence): score_mod was asked there too, and its derivative f may be anything (a mod tensor read
// out of range is 0, and score / 0 has f = inf), which 0 times would make NaN. Only a score_mod's f
// varies: other builds just multiply.
__device__ inline float times_p(float p, float rest) {
    if constexpr (SCORE) return p == 0.0f ? 0.0f : p * rest;
    return p * rest;
}
// Version 4's backward with softcap alone (LATE_P): backward_probabilities left t = tanh in s, under dP's
// product, and here, once dP is in, s becomes P = exp2(c t - L2) (c the cap times log2 e) and f = 1 - t^2,
// softcap's derivative. Not P under dP's product and f beside it: f would be 32 more floats a thread held
// across the product (at d = 128 they spilled). Nor f recovered from P afterwards, t = (log2 P + L2) / c:
// that is a third special-function instruction a score (tanh, exp2, log2), on the unit that already
// limits softcap's backward. Masked: t = -inf, so P = 0 and f = -inf, which times_p never multiplies.
constexpr bool LATE_P = SOFTCAP_ONLY;
template <int NT>
__device__ inline void late_probabilities(float (&s)[NT][4], float (&f)[NT][4], const Args& a, float scale,
                                          const float* L2) {
    const float c = softmax_scale(a, scale) * LOG2E;
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const float t = s[n][e];
            f[n][e] = 1.0f - t * t;
            s[n][e] = fast_exp2(t * c - L2[8 * n + e % 2]);
        }
}
// The same, and dp becomes (dP - D) f (version 3, whose dP is in already).
template <int NT>
__device__ inline void backward_scores(float (&s)[NT][4], float (&dp)[NT][4], Tile state, const Args& a,
                                       int b, int h, int key, int col, int shift, int Nq, float scale,
                                       const float* L2, const float* D) {
    float f[NT][4];
    backward_probabilities(s, f, state, a, b, h, key, col, shift, Nq, scale, L2);
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int e = 0; e < 4; ++e) dp[n][e] = (dp[n][e] - D[8 * n + e % 2]) * f[n][e];
}

// Dropout, as the FlashAttention paper's Algorithms 2 and 4 do it: P's element (query i, key j) of
// slice bh is kept with probability 1 - p, and scaled by 1 / (1 - p) (so that O's expectation is
// dropout's absence), by a word of Philox for the call's seed. The forward drops from P after its row
// sum l has taken it in (O = (Z P / (1 - p)) V, L unchanged); the backward draws the same Z for
// dV = (Z P / (1 - p))^T dO and dP = Z (dO V^T) / (1 - p).
// A Philox call, ten rounds of 64-bit multiplies, gives four words: one call serves four pairs, those
// of i and j with bit 3 cleared, i0 and j0, and 8 past each. The counter is (j0, i0, bh, 0), and
//     (i0, j0): x    (i0, j0 + 8): y    (i0 + 8, j0): z    (i0 + 8, j0 + 8): w
// Those four are one lane's in both passes' tiles: it holds rows g and g + 8 of each 16 (mma.cuh's
// layout), and columns 8n + 2q (+ 1) of tiles n = 0, 1, .., so tiles n and n + 1 are 8 columns apart;
// the backward's transposed tiles alike, keys as rows.
__device__ inline Philox dropout_words(const Args& a, int bh, int i0, int j0) {
    return philox({unsigned(j0), unsigned(i0), unsigned(bh), 0u}, a.seed[0], a.seed[1]);
}
// On one accumulator tile, mma.cuh's layout (rows `row`, row + 8, row a multiple of 16 plus g; columns
// col + 8n, col + 8n + 1, col a multiple of 16 plus 2q): each element times Z / (1 - p).
// KEYS_ARE_ROWS: the backward's transposed tiles (rows keys j, columns queries i).
template <bool KEYS_ARE_ROWS, int NT>
__device__ inline void dropout(float (&c)[NT][4], const Args& a, int bh, int row, int col) {
    static_assert(NT % 2 == 0, "tiles in pairs, 8 columns apart");
    const auto drop = [&](float& x, unsigned word) { x = word >= a.threshold ? x * a.keep_scale : 0.0f; };
#pragma unroll
    for (int n = 0; n < NT; n += 2)
#pragma unroll
        for (int e = 0; e < 2; ++e) {  // elements e and 2 + e of tiles n and n + 1
            const int r = row, k = col + 8 * n + e;  // (bit 3 clear in both)
            const Philox z = KEYS_ARE_ROWS ? dropout_words(a, bh, k, r) : dropout_words(a, bh, r, k);
            drop(c[n][e], z.x), drop(c[n + 1][2 + e], z.w);  // (r, k), (r + 8, k + 8)
            drop(KEYS_ARE_ROWS ? c[n][2 + e] : c[n + 1][e], z.y);  // (i0, j0 + 8)
            drop(KEYS_ARE_ROWS ? c[n + 1][e] : c[n][2 + e], z.z);  // (i0 + 8, j0)
        }
}

}  // namespace mods

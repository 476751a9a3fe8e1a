// FlashAttention-2 forward pass on tensor cores (chapter 3): bf16 or fp16 in, fp32 accumulation,
// O in the input's type, L in fp32. The loop order of flash2.cu; the arithmetic moves from one
// multiply-add per thread per instruction to mma.sync, a 16 x 8 x 16 matrix product per warp
// (kernels/mma.cuh has the instructions and their lane layouts). For each key tile j a warp computes
// its rows of S_ij, the online softmax on those fragments in registers (a row's max and sum over the
// 4 lanes that hold it, by shuffles), and O += P_ij V_j, with P_ij taken straight from the
// accumulators of S_ij into the A operand: no round trip through shared memory.
// Names as in the paper; "Alg. 1, line n" marks each phase of the FlashAttention-2 paper's Algorithm 1.
//
// Who owns what: one block per (batch, head, Br = 128 query rows), 4 warps (8 above d = 128); K_j, V_j
// (Bc = 64 keys) in shared memory, read by every warp; S_ij, P_ij and O in the registers of the warp
// that owns the rows.
// Sequences of different lengths packed without padding (flash_attn_varlen_func) run the same kernel:
// a (batch, head) is then a sequence's head, its rows where tiles.cuh's slice_rows says.
//
//            S_ij = Q_i K_j^T (128 x 64)                      O (128 x d)
//   rows   0- 31 [ warp 0: 2 tiles of 16 rows x 64 keys ]     [ warp 0 ]
//   rows  32- 63 [ warp 1                               ]     [ warp 1 ]
//   rows  64- 95 [ warp 2                               ]     [ warp 2 ]
//   rows  96-127 [ warp 3                               ]     [ warp 3 ]
//   above d = 128: warps 0-7 of one tile each, warp w on rows 16w .. 16w + 15
//   within a 16-row tile, lane (g, q) = (lane / 4, lane % 4) holds rows g and g + 8 and, of every 8
//   columns, columns 2q and 2q + 1 (mma.cuh's accumulator layout).
#include "tiles.cuh"  // ceil_div
#include "mma.cuh"   // stride16, ldmatrix_x4(_trans), mma16816<T>, pack<T>, load_tile16_async, mask_fragment,
                     // online_softmax
#include "mods.cuh"  // chapter 6's hooks: mods::forward_scores, mods::tiles (no-ops without mods)

namespace flash2_mma {

// A warp owns TILES = 2 tiles of 16 query rows: each fragment of K_j or V_j it reads from shared
// memory then feeds two mma instead of one, which halves the shared-memory traffic per product.
// Above d = 128 one tile: two would hold 2 x 16 x d fp32 values of O per warp, more than its lanes'
// 255 registers can. The block keeps its 128 rows there with 8 warps instead of 4, so that each K_j,
// V_j it loads still serves 128 rows; and since at d = 192 or 256 its shared memory leaves room for
// one block per multiprocessor, 8 warps are two per scheduler, not one: one warp alone leaves the
// tensor cores idle while it waits on shared memory or on its softmax.
__host__ __device__ constexpr int tiles(int d) { return d <= 128 ? 2 : 1; }  // row tiles per warp
__host__ __device__ constexpr int warps(int d) { return 8 / tiles(d); }
constexpr int Br = 128;  // rows per block: warps(d) * tiles(d) * 16
// Keys per tile. At d = 128 a lane's share of O (2 x 16 x 4 floats) and of a 64-key S (2 x 8 x 4)
// fill 254 of its 255 registers, none spilled; tiles of 32 keys there, with room to spare, measured
// slower (every K_j and V_j fragment serves half as many rows of S).
constexpr int Bc = 64;
// Shared memory: Q_i, and two buffers each of K_j and V_j, in 16-bit values.
__host__ __device__ inline int shared_bytes(int d) { return (Br + 4 * Bc) * stride16(d) * 2; }

template <class T, int d>
__global__ void __launch_bounds__(32 * warps(d))
    forward(const unsigned short* Q, const unsigned short* K, const unsigned short* V, int N, int group,
            const int* cu_seqlens_q, const int* cu_seqlens_k, int H, float scale, bool causal,
            unsigned short* O, float* L, mods::Args mod_args) {
    constexpr int LS = stride16(d), TILES = tiles(d);
    static_assert(warps(d) * TILES * 16 == Br, "the warps' row tiles make the block's rows");
    // smem: the block's shared memory, declared in tiles.cuh
    unsigned short* Q_i = reinterpret_cast<unsigned short*>(smem);  // Br x LS
    unsigned short* K_j = Q_i + Br * LS;  // two buffers of Bc x LS: the n-th tile walked in buffer n % 2
    unsigned short* V_j = K_j + 2 * Bc * LS;
    // Lane (g, q) of warp w holds, of each of its tiles of 16 rows, rows g and g + 8, and of each 8 columns
    // of an accumulator, columns 2q and 2q + 1 (kernels/mma.cuh).
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;

    // This block's (batch, head) slice, fixed-length or packed (tiles.cuh): its rows of Q, O, L, and
    // of K and V, which `group` query heads share (grouped-query heads).
    const Slice slice = slice_rows(blockIdx.y, N, d, group, cu_seqlens_q, cu_seqlens_k, H);
    const int Nq = slice.Nq, Nk = slice.Nk, ld_q = slice.ld_q, ld_kv = slice.ld_kv;
    Q += slice.q, K += slice.kv, V += slice.kv;
    // Heaviest first, as in flash2.cu (with a mask_mod, most likely so too, as in flash3_hopper.cu)
    const int tile = causal || mods::MASK ? gridDim.x - 1 - blockIdx.x : blockIdx.x;
    const int row0 = tile * Br;
    if (row0 >= Nq) return;  // past its sequence's end (packed: the grid fits the longest)
    // Causal, aligned at the bottom right as in the official package: query i sees keys j <= i + shift,
    // shift = Nk - Nq (0 when Nq = Nk: the lower triangle). The block's last row sees the most keys,
    // perhaps none (packed, Nq > Nk).
    const int shift = Nk - Nq, last_row = min(row0 + Br, Nq) - 1;
    const int j_end = ceil_div(causal ? min(max(last_row + shift + 1, 0), Nk) : Nk, Bc);
    // Chapter 6: with a mask_mod, the key tiles that the block mask marks empty for these rows are
    // skipped (a window's: by arithmetic; mods::Walk; without mods, the walk is j = 0, 1, ..). (shift by
    // value: taken by reference, it changed the code of every mask's build, where only a window reads it.)
    const int b = mods::ANY ? blockIdx.y / mod_args.H : 0, h = mods::ANY ? blockIdx.y % mod_args.H : 0;
    const auto state = [&, shift](int j) {
        return mods::tiles(mod_args, b, h, row0 / mods::TILE, ceil_div(min(row0 + Br, Nq), mods::TILE), j,
                           j + 1, shift);
    };
    const mods::Span span =
        mods::span<false>(mod_args, b, h, row0 / mods::TILE, ceil_div(min(row0 + Br, Nq), mods::TILE), shift);
    const auto walk = mods::walk(span, 1, j_end, mods::MASK, [&](int j) { return state(j) == mods::EMPTY; });
    static_assert(Bc == mods::TILE && Br % mods::TILE == 0, "a tile is one column of the block mask's");

    int j = walk.first(0);
    load_tile16_async<d>(Q_i, Q, row0, Br, Nq, ld_q);     // Alg. 1, line 4
    load_tile16_async<d>(K_j, K, j * Bc, Bc, Nk, ld_kv);  // Alg. 1, lines 6-7 for the first tile
    load_tile16_async<d>(V_j, V, j * Bc, Bc, Nk, ld_kv);
    cp_async_commit();

    float o[TILES][d / 8][4] = {}, m[TILES][2], l[TILES][2] = {};  // Alg. 1, line 5
#pragma unroll
    for (int t = 0; t < TILES; ++t) m[t][0] = m[t][1] = -INFINITY;
    // The softmax's scale: with a score_mod, the scores come to it scaled already (mods::softmax_scale).
    const float softmax_scale = mods::softmax_scale(mod_args, scale), c = softmax_scale * LOG2E;
    for (int it = 0; j < j_end; ++it) {  // tile j in buffer it % 2
        // Double buffering: the next tile's copies fly (into the buffers the tile before used) while
        // tile j is multiplied, so the wait for memory overlaps the tensor cores' work.
        const int next = walk.next(j);
        if (next < j_end) {  // Alg. 1, lines 6-7 for the next tile
            load_tile16_async<d>(K_j + (it + 1) % 2 * Bc * LS, K, next * Bc, Bc, Nk, ld_kv);
            load_tile16_async<d>(V_j + (it + 1) % 2 * Bc * LS, V, next * Bc, Bc, Nk, ld_kv);
            cp_async_commit();
            cp_async_wait<1>();  // tile j (and Q_i) has landed
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();  // ... for every thread's share of it
        const unsigned short *K_t = K_j + it % 2 * Bc * LS, *V_t = V_j + it % 2 * Bc * LS;

        // Alg. 1, line 8: S_ij = Q_i K_j^T, per row tile Bc / 8 accumulators of 16 x 8. A fragment of
        // Q_i (rows, 16 columns) serves all keys; one of K_j, read as its rows (B = K_j^T), both row tiles.
        float s[TILES][Bc / 8][4] = {};
#pragma unroll
        for (int kk = 0; kk < d / 16; ++kk) {
            unsigned qf[TILES][4];
#pragma unroll
            for (int t = 0; t < TILES; ++t)
                ldmatrix_x4(qf[t], &Q_i[((w * TILES + t) * 16 + lane % 16) * LS + kk * 16 + lane / 16 * 8]);
#pragma unroll
            for (int kb = 0; kb < Bc / 16; ++kb) {
                unsigned kf[4];  // keys 16 kb .. 16 kb + 15, columns 16 kk .. 16 kk + 15
                ldmatrix_x4(kf, &K_t[(kb * 16 + lane % 8 + lane / 16 * 8) * LS + kk * 16 + lane / 8 % 2 * 8]);
#pragma unroll
                for (int t = 0; t < TILES; ++t) {
                    mma16816<T>(s[t][2 * kb], qf[t], kf[0], kf[1]);
                    mma16816<T>(s[t][2 * kb + 1], qf[t], kf[2], kf[3]);
                }
            }
        }
        // Alg. 1, line 9. Only a tile that crosses the end of the sequence or, causal, the diagonal
        // needs the mask: the others skip its index arithmetic on every element. (Chapter 6: a
        // mask_mod's, the block's tile of the block mask.)
        const mods::Tile tile_state[1] = {mods::MASK ? state(j) : mods::PARTIAL};
#pragma unroll
        for (int t = 0; t < TILES; ++t) {
            const int row = row0 + (w * TILES + t) * 16 + g;
            if constexpr (mods::ANY)  // chapter 6: score_mod, mask_mod
                mods::forward_scores(s[t], tile_state, mod_args, b, h, row, j * Bc + 2 * q, shift, scale);
            if ((j + 1) * Bc > Nk || (causal && (j + 1) * Bc > row - g + 1 + shift))
                mask_fragment<false>(s[t], row + shift, j * Bc + 2 * q, Nk, causal, -INFINITY);
            float alpha[2];
            online_softmax<true>(s[t], m[t], l[t], o[t], alpha, c);
            if constexpr (mods::DROPOUT)  // chapter 6: P's kept elements, scaled; l has them all
                mods::dropout<false>(s[t], mod_args, blockIdx.y, row, j * Bc + 2 * q);
        }
        // Alg. 1, line 10: O += P_ij V_j. The accumulators of S's tiles 2 kb and 2 kb + 1 are, in the
        // same lanes, the A operand for keys 16 kb .. 16 kb + 15; V_j's columns come transposed.
#pragma unroll
        for (int kb = 0; kb < Bc / 16; ++kb) {
            unsigned pf[TILES][4];
#pragma unroll
            for (int t = 0; t < TILES; ++t)
                pf[t][0] = pack<T>(s[t][2 * kb][0], s[t][2 * kb][1]),
                pf[t][1] = pack<T>(s[t][2 * kb][2], s[t][2 * kb][3]),
                pf[t][2] = pack<T>(s[t][2 * kb + 1][0], s[t][2 * kb + 1][1]),
                pf[t][3] = pack<T>(s[t][2 * kb + 1][2], s[t][2 * kb + 1][3]);
#pragma unroll
            for (int dn = 0; dn < d / 16; ++dn) {
                unsigned vf[4];  // keys 16 kb .. 16 kb + 15, columns 16 dn .. 16 dn + 15
                ldmatrix_x4_trans(vf, &V_t[(kb * 16 + lane % 16) * LS + dn * 16 + lane / 16 * 8]);
#pragma unroll
                for (int t = 0; t < TILES; ++t) {
                    mma16816<T>(o[t][2 * dn], pf[t], vf[0], vf[1]);
                    mma16816<T>(o[t][2 * dn + 1], pf[t], vf[2], vf[3]);
                }
            }
        }
        __syncthreads();  // every warp is done with tile j's buffers before the copies after next fill them
        j = next;
    }
    cp_async_wait<0>();  // a block whose rows see no key ran no tile: its copies must land before it ends
    // The slice's rows of O and L: read again, not held in registers through the loop, which at d = 128
    // takes 255 of them (the reads hit the cache; held, its values would spill to local memory).
    const Slice out = slice_rows(blockIdx.y, N, d, group, cu_seqlens_q, cu_seqlens_k, H);
    O += out.q, L += out.q / d;
    // Alg. 1, lines 12-15: a row's l is its 4 lanes' shares added up; O = O / l, L = m + log(l).
#pragma unroll
    for (int t = 0; t < TILES; ++t)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float l_row = l[t][r];
            l_row += __shfl_xor_sync(0xffffffffu, l_row, 1);
            l_row += __shfl_xor_sync(0xffffffffu, l_row, 2);
            const int row = row0 + (w * TILES + t) * 16 + g + 8 * r;
            if (row >= out.Nq) continue;
            // A row that sees no key has l = 0 and m = -inf: O = 0 and L = -inf, the log of an empty sum.
            const float inv_l = l_row > 0.0f ? 1.0f / l_row : 0.0f;
#pragma unroll
            for (int n = 0; n < d / 8; ++n)  // columns 8n + 2q, 8n + 2q + 1: one 4-byte store
                *reinterpret_cast<unsigned*>(&O[(size_t)row * out.ld_q + 8 * n + 2 * q]) =
                    pack<T>(o[t][n][2 * r] * inv_l, o[t][n][2 * r + 1] * inv_l);
            if (q == 0) L[(size_t)row * (out.ld_q / d)] = m[t][r] * softmax_scale + logf(l_row);
        }
}

}  // namespace flash2_mma

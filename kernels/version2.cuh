// Version 2, chapter 2: FlashAttention-2's loop order in fp32, register-tiled.
//
//   forward   flash2.cu           one block per (batch, head, G tiles of Br query rows), TILE_THREADS
//                                 threads per tile (a thread: TM x TN of S_ij, TM x OC of O)
//   backward  flash2_backward.cu  D = rowsum(dO * O) and dQ = 0 (a warp per row), then one block per
//                                 (batch, head, 64 keys) of 128 threads, adding into dQ by atomics
//
// Block sizes: Br and Bc shape the forward only (Br a multiple of 4, Bc = 16, 32 or 64); the
// backward's tiles are its own. Any head dim d whose tiles fit in shared memory.
// Scratch (fp32, per row): none (forward), D (backward).
// bindings.cu includes this file in its middle: Call, launch and thread_groups are defined there.
#include <numeric>  // std::gcd
#include "flash2.cu"
#include "flash2_backward.cu"

struct Version {
    static constexpr bool GROUPED_HEADS = false;  // the forward reads K, V by group (Call::group)
    static constexpr bool STRIDED = false;  // reads contiguous q, k, v, dO only (Call's strides checked)
    static constexpr bool MODS = false;     // score_mod, mask_mod: version 3's
    static size_t forward_bytes(int d, int G) { return sizeof(float) * flash2::shared_floats(d, G * Br); }
    static size_t backward_bytes(int d) { return sizeof(float) * flash2_backward::shared_floats(d); }
    // The kernel's shuffles take all 32 lanes of a warp, so a block is whole warps: G tiles of
    // TILE_THREADS threads, G a multiple of WARP_TILES (1 when a tile is whole warps itself).
    static constexpr int WARP_TILES = 32 / std::gcd(32, flash2::TILE_THREADS);

    static size_t shared_bytes(Pass pass, int d) {  // the least a block needs
        return pass == FORWARD ? forward_bytes(d, WARP_TILES) : backward_bytes(d);
    }
    static long long scratch_floats(Pass pass, int N, int) { return pass == FORWARD ? 0 : N; }

    // Blocks are independent, so the grid has plenty; up to 4 warps per block give each
    // multiprocessor's schedulers warps to switch between while one waits for memory. Whole warps
    // only: the kernel's shuffles take all 32 lanes.
    static std::string forward(const Call& c) {
        if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
        if (!flash2::takes_block_sizes)
            return "version 2 takes Br a multiple of 4 and Bc = 16, 32 or 64; these kernels have Br = " +
                   std::to_string(Br) + ", Bc = " + std::to_string(Bc);
        constexpr int tile_threads = flash2::TILE_THREADS;
        // as many tiles as fit, in whole warps (shared_bytes: WARP_TILES of them fit, checked before)
        const int fit = thread_groups(flash2::forward, c, Br, tile_threads, forward_bytes, 128);
        const int G = std::max(fit / WARP_TILES, 1) * WARP_TILES;
        return launch("flash2::forward", flash2::forward, dim3(ceil_div(c.N, G * Br), c.BH), G * tile_threads,
                      forward_bytes(c.d, G), c, c.Q, c.K, c.V, c.N, c.d, c.scale, c.causal, c.O, c.L);
    }

    // D first (a warp per row, into the scratch; the same kernel zeroes dQ, into which the blocks
    // add), then one block per (batch, head, tile of 64 keys).
    static std::string backward(const Call& c) {
        namespace bw = flash2_backward;
        if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
        const long long rows = c.BH * c.N;
        std::string err = launch("flash2_backward::rowsum_D", bw::rowsum_D, dim3((rows + 7) / 8), 256, 0, c,
                                 c.O, c.dO, size_t(rows), c.d, c.scratch, c.dQ);
        if (!err.empty()) return err;
        return launch("flash2_backward::backward", bw::backward, dim3(ceil_div(c.N, bw::Bc), c.BH),
                      bw::THREADS, backward_bytes(c.d), c, c.Q, c.K, c.V, c.dO, c.L, c.scratch, c.N, c.d,
                      c.scale, c.causal, c.dQ, c.dK, c.dV);
    }
};

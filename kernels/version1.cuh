// Version 1, chapter 1: the FlashAttention paper's Algorithms 1 and 4 in fp32, as written.
//
//   forward   flash.cu            one block per (batch, head): its G groups of Br threads take G query
//                                 tiles of the inner loop at once, one thread per row of Q_i
//   backward  flash_backward.cu   the same schedule; D = rowsum(dO * O) first, in the same kernel
//
// Block sizes: Br (rows of Q_i, so threads per group) and Bc (keys of K_j, a thread's row of S_ij in
// registers), compile-time constants (-DBR, -DBC). Any head dim d whose tiles fit in shared memory.
// Scratch (fp32, per row of the B * H * N): the running l and m of Algorithm 1 (forward), D (backward).
// bindings.cu includes this file in its middle: Call, launch and thread_groups are defined there.
#include "flash.cu"
#include "flash_backward.cu"

struct Version {
    static constexpr bool GROUPED_HEADS = false;  // the forward reads K, V by group (Call::group)
    static constexpr bool STRIDED = false;  // reads contiguous q, k, v, dO only (Call's strides checked)
    static constexpr bool MODS = false;     // score_mod, mask_mod: version 3's
    // Shared memory of a block of G thread groups, in bytes, from each kernel's own layout.
    static size_t forward_bytes(int d, int G) { return sizeof(float) * forward_shared_floats(d, G); }
    static size_t backward_bytes(int d, int G) { return sizeof(float) * backward_shared_floats(d, G); }

    static size_t shared_bytes(Pass pass, int d) {
        return pass == FORWARD ? forward_bytes(d, 1) : backward_bytes(d, 1);
    }
    static long long scratch_floats(Pass pass, int N, int) { return pass == FORWARD ? 2LL * N : N; }

    static std::string forward(const Call& c) {
        const int G = thread_groups(flash_forward, c, Br, Br, forward_bytes, 1024);
        float *l = c.scratch, *m = c.scratch + c.BH * c.N;
        return launch("flash_forward", flash_forward, dim3(c.BH), G * Br, forward_bytes(c.d, G), c, c.Q, c.K,
                      c.V, c.N, c.d, c.scale, c.causal, c.O, l, m, c.L);
    }

    static std::string backward(const Call& c) {
        const int G = thread_groups(flash_backward, c, Br, Br, backward_bytes, 1024);
        return launch("flash_backward", flash_backward, dim3(c.BH), G * Br, backward_bytes(c.d, G), c, c.Q,
                      c.K, c.V, c.O, c.dO, c.L, c.N, c.d, c.scale, c.causal, c.scratch, c.dQ, c.dK, c.dV);
    }
};

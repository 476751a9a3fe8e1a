// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC 2011): a counter-
// based generator. Four 32-bit words of counter and two of key give four random words, with no state:
// the same (counter, key) gives the same words, on any thread, in any order, on the GPU and in the
// CPU emulation alike. That is what dropout in FlashAttention needs: the forward draws the mask of
// each (query, key) pair, and the backward draws the very same mask again instead of storing N x N
// bits (kernels/mods.cuh, mods::kept).
#pragma once

struct Philox {
    unsigned x, y, z, w;
};

// Ten rounds; each multiplies two words into 64-bit products and mixes their halves with the others
// and the key, which grows by the Weyl constants between rounds.
__host__ __device__ inline Philox philox(Philox c, unsigned k0, unsigned k1) {
    for (int round = 0; round < 10; ++round) {
        const unsigned long long p0 = 0xD2511F53ull * c.x, p1 = 0xCD9E8D57ull * c.z;
        c = {unsigned(p1 >> 32) ^ c.y ^ k0, unsigned(p1), unsigned(p0 >> 32) ^ c.w ^ k1, unsigned(p0)};
        k0 += 0x9E3779B9u, k1 += 0xBB67AE85u;
    }
    return c;
}

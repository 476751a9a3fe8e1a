// 16-byte and 8-byte accesses, for the kernels of chapters 2 and 3: one instruction moves or adds
// four (or two) floats, a quarter (a half) of the instructions of single ones.
#pragma once

// Four consecutive floats at a 16-byte-aligned address, read as one 16-byte load.
__device__ inline void load4(float* to, const float* from) {
    const float4 v = *reinterpret_cast<const float4*>(from);
    to[0] = v.x, to[1] = v.y, to[2] = v.z, to[3] = v.w;
}

// *to += (a, b, c, e), four consecutive floats at a 16-byte-aligned address, by other threads and
// blocks at the same time: one vector atomic on sm_90 and later (Hopper); elsewhere, and in the CPU
// emulation, four single ones. atomic_add2 likewise for two floats at an 8-byte-aligned address.
__device__ inline void atomic_add4(float* to, float a, float b, float c, float e) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float4*>(to), float4{a, b, c, e});
#else
    atomicAdd(to, a), atomicAdd(to + 1, b), atomicAdd(to + 2, c), atomicAdd(to + 3, e);
#endif
}
__device__ inline void atomic_add2(float* to, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2*>(to), float2{a, b});
#else
    atomicAdd(to, a), atomicAdd(to + 1, b);
#endif
}

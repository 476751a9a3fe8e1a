// A fragment-level program: one warp loads A, K and V (16 x 16 each, bf16 or fp16) into shared
// memory; with ldmatrix and mma.sync (kernels/mma.cuh) it computes S = A K^T and O = A V in fp32,
// each as two 16 x 8 tiles, and with shuffles each row's max of S, the steps of attention on tensor
// cores. It also writes out what each lane holds: its registers after the ldmatrix calls and its
// accumulators of S, so that the lane layouts can be read directly (notebook 6 does). nvcc builds it
// for the GPU, g++ against kernels/cpu_cuda.h for the CPU (tools/fragments_cpu.cpp); tools/fragments.py
// builds and runs either, and tests/test_fragments.py runs both on the same inputs and compares them,
// lane layouts included. special_values, beside it: mma.cuh's fast_tanh or fast_exp2 of a
// vector of values, compared the same way.
#include "mma.cuh"
#ifdef __CUDACC__
#define LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#endif

template <bool BF16>
__global__ void fragments(const unsigned short* A, const unsigned short* K, const unsigned short* V,
                          float* S, float* O, float* row_max, unsigned* registers, float* accumulators) {
    // smem: the block's shared memory, declared in tiles.cuh (through mma.cuh)
    unsigned short *a = reinterpret_cast<unsigned short*>(smem), *k = a + 256, *v = k + 256;
    const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
    for (int e = lane; e < 256; e += 32) a[e] = A[e], k[e] = K[e], v[e] = V[e];
    __syncthreads();
    // A: tiles (rows 0-7, columns 0-7), (8-15, 0-7), (0-7, 8-15), (8-15, 8-15): a[0] .. a[3].
    // K: B = K^T, so b is row g of K: tiles (keys 0-7, 0-7), (0-7, 8-15) for keys 0-7, then 8-15.
    // V: B = V, columns of V: the same tiles as A's, transposed.
    unsigned af[4], kf[4], vf[4];
    ldmatrix_x4(af, &a[lane % 16 * 16 + lane / 16 * 8]);
    ldmatrix_x4(kf, &k[(lane % 8 + lane / 16 * 8) * 16 + lane / 8 % 2 * 8]);
    ldmatrix_x4_trans(vf, &v[lane % 16 * 16 + lane / 16 * 8]);
    for (int i = 0; i < 4; ++i)  // the lane's 12 registers: af, kf, vf
        registers[lane * 12 + i] = af[i], registers[lane * 12 + 4 + i] = kf[i], registers[lane * 12 + 8 + i] = vf[i];
    float m[2] = {-INFINITY, -INFINITY};  // rows g and g + 8
    for (int n = 0; n < 2; ++n) {        // columns 8n .. 8n + 7 of S and O
        float s[4], o[4];
        const float zero[4] = {};
        if constexpr (BF16) {
            mma_bf16_m16n8k16(s, af, {kf[2 * n], kf[2 * n + 1]}, zero);
            mma_bf16_m16n8k16(o, af, {vf[2 * n], vf[2 * n + 1]}, zero);
        } else {
            mma_f16_m16n8k16(s, af, {kf[2 * n], kf[2 * n + 1]}, zero);
            mma_f16_m16n8k16(o, af, {vf[2 * n], vf[2 * n + 1]}, zero);
        }
        for (int i = 0; i < 4; ++i) {
            const int row = g + 8 * (i / 2), col = 8 * n + 2 * q + i % 2;
            S[row * 16 + col] = s[i], O[row * 16 + col] = o[i];
            accumulators[(lane * 2 + n) * 4 + i] = s[i];  // the lane's s[i] of S's columns 8n .. 8n + 7
            m[i / 2] = fmaxf(m[i / 2], s[i]);
        }
    }
    for (int i = 0; i < 2; ++i) {  // a row's 16 values are with its 4 lanes q = 0 .. 3
        m[i] = fmaxf(m[i], __shfl_xor_sync(0xffffffffu, m[i], 1));
        m[i] = fmaxf(m[i], __shfl_xor_sync(0xffffffffu, m[i], 2));
        if (q == 0) row_max[g + 8 * i] = m[i];
    }
}

// D = A V + C with C not zero, the form of mma.sync that the kernels' O += P V takes (above, C is 0):
// C, a 16 x 16 fp32 tile, goes into each lane's registers in the accumulators' layout, and D comes
// out of them the same way.
template <bool BF16>
__global__ void accumulate(const unsigned short* A, const unsigned short* V, const float* C, float* D) {
    unsigned short *a = reinterpret_cast<unsigned short*>(smem), *v = a + 256;
    const int lane = threadIdx.x, g = lane / 4, q = lane % 4;
    for (int e = lane; e < 256; e += 32) a[e] = A[e], v[e] = V[e];
    __syncthreads();
    unsigned af[4], vf[4];
    ldmatrix_x4(af, &a[lane % 16 * 16 + lane / 16 * 8]);
    ldmatrix_x4_trans(vf, &v[lane % 16 * 16 + lane / 16 * 8]);
    for (int n = 0; n < 2; ++n) {  // columns 8n .. 8n + 7
        float c[4], d[4];
        for (int i = 0; i < 4; ++i) c[i] = C[(g + 8 * (i / 2)) * 16 + 8 * n + 2 * q + i % 2];
        if constexpr (BF16)
            mma_bf16_m16n8k16(d, af, {vf[2 * n], vf[2 * n + 1]}, c);
        else
            mma_f16_m16n8k16(d, af, {vf[2 * n], vf[2 * n + 1]}, c);
        for (int i = 0; i < 4; ++i) D[(g + 8 * (i / 2)) * 16 + 8 * n + 2 * q + i % 2] = d[i];
    }
}

// The special-function unit's tanh or 2^x, by `function` 0 or 1 (one instruction each on the GPU; std::tanh,
// std::exp2 in the emulation).
__global__ void special_values(int function, const float* x, float* y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = function == 0 ? fast_tanh(x[i]) : fast_exp2(x[i]);
}

extern "C" {
// Runs the program on one warp; "" on success.
const char* run_fragments(int bf16, const unsigned short* A, const unsigned short* K, const unsigned short* V,
                          float* S, float* O, float* row_max, unsigned* registers, float* accumulators) {
    if (bf16)
        LAUNCH(fragments<true>, dim3(1), dim3(32), 3 * 256 * 2, 0)(A, K, V, S, O, row_max, registers, accumulators);
    else
        LAUNCH(fragments<false>, dim3(1), dim3(32), 3 * 256 * 2, 0)(A, K, V, S, O, row_max, registers, accumulators);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// D = A V + C on one warp (accumulate above); "" on success.
const char* run_accumulate(int bf16, const unsigned short* A, const unsigned short* V, const float* C, float* D) {
    if (bf16)
        LAUNCH(accumulate<true>, dim3(1), dim3(32), 2 * 256 * 2, 0)(A, V, C, D);
    else
        LAUNCH(accumulate<false>, dim3(1), dim3(32), 2 * 256 * 2, 0)(A, V, C, D);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// y = fast_tanh(x) or fast_exp2(x) (kernels/mma.cuh; function 0 or 1) for n values, a thread
// per value; "" on success.
const char* run_special(int function, const float* x, float* y, int n) {
    LAUNCH(special_values, dim3((n + 255) / 256), dim3(256), 0, 0)(function, x, y, n);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// Rounds n floats to bf16 (or fp16) bits with this build's conversions, and back.
void round_to_half(int bf16, const float* in, unsigned short* bits, float* back, long n) {
    for (long i = 0; i < n; ++i) {
        bits[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16(in[i])) : __half_as_ushort(__float2half(in[i]));
        back[i] = bf16 ? __bfloat162float(__ushort_as_bfloat16(bits[i])) : __half2float(__ushort_as_half(bits[i]));
    }
}
}

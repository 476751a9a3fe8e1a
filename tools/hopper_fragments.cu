// Hopper's instructions on one block (kernels/hopper.cuh), for checking the emulation against the
// hardware: one warpgroup (128 threads) whose thread 0 loads 5 boxes of 64 x 64 16-bit values (bf16
// or fp16) by TMA with the 128-byte swizzle from a tensor X of shape (2, rows, 128), one of them past
// the tensor's last row, and then
//   (a) writes the 5 boxes out as they are in shared memory, swizzled;
//   (b) D = A B^T with wgmma_ss, N = 128 and 64: A = X[0, 0:64, 0:64] and B = X[1, 0:128, 0:64], both
//       K-major, 4 steps of k16, each descriptor 32 bytes further;
//   (c) D = P V with wgmma_rs, N = 64 and 128: P (64 x 64) from registers, 4 steps of k16, and
//       V = X[0, 0:64, 0:128] read as an MN-major B: two 64-column boxes side by side, SBO = 1024
//       (from 8 rows of k to the next 8), LBO = 8192 (from columns 0-63 to 64-127);
// and writes each D out, and each thread's accumulators as it holds them. nvcc builds it for sm_90a,
// g++ against kernels/cpu_cuda.h (tools/hopper_fragments_cpu.cpp); tools/hopper_fragments.py builds
// and runs either; tests/test_hopper_fragments.py compares them with torch and with each other.
#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif
#include "hopper.cuh"
#ifdef __CUDACC__
#define LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
#endif

// The barrier, then the 5 boxes from byte 1024 on, counted from the first 1024-byte boundary of the
// block's shared memory (hence 1024 bytes more than they take).
constexpr int kBoxBytes = 64 * 64 * 2, kTilesAt = 1024, kSharedBytes = 1024 + kTilesAt + 5 * kBoxBytes;

// Thread t's accumulators of a 64 x N tile into D (row-major) and raw[t][0 .. N / 2), as it holds them.
template <int N>
__device__ void write_out(const float (&d)[N / 8][4], float* D, float* raw) {
    const int t = threadIdx.x, w = t / 32, g = t % 32 / 4, q = t % 4;
    for (int n = 0; n < N / 8; ++n)
        for (int j = 0; j < 4; ++j) {
            raw[t * (N / 2) + 4 * n + j] = d[n][j];
            D[(16 * w + g + 8 * (j / 2)) * N + 8 * n + 2 * q + j % 2] = d[n][j];
        }
}

template <class T>
__global__ void hopper_fragments(const __grid_constant__ CUtensorMap map, const unsigned short* P,
                                 unsigned short* boxes, float* ss128, float* ss64, float* rs64, float* rs128,
                                 float* raw) {
    // smem: the block's shared memory, declared in tiles.cuh (through hopper.cuh)
    char* base = reinterpret_cast<char*>(smem) + (1024 - shared_address(smem) % 1024) % 1024;
    uint64_t* bar = reinterpret_cast<uint64_t*>(base);
    auto tile = [&](int i) { return base + kTilesAt + i * kBoxBytes; };
    const int t = threadIdx.x;
    if (t == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (t == 0) {  // (x: columns, y: rows, z)
        mbarrier_arrive_expect_tx(bar, 5 * kBoxBytes);
        tma_load(tile(0), &map, 0, 0, 0, bar);     // A, and V's columns 0-63
        tma_load(tile(1), &map, 64, 0, 0, bar);    // V's columns 64-127
        tma_load(tile(2), &map, 0, 0, 1, bar);     // B's rows 0-63
        tma_load(tile(3), &map, 0, 64, 1, bar);    // B's rows 64-127
        tma_load(tile(4), &map, 64, 128, 1, bar);  // rows 128-191: past the end of the rows
    }
    mbarrier_wait(bar, 0);
    // (a)
    const unsigned short* tiles = reinterpret_cast<const unsigned short*>(tile(0));
    for (int i = t; i < 5 * 64 * 64; i += 128) boxes[i] = tiles[i];
    // (b)
    const unsigned a_at = shared_address(tile(0)), b_at = shared_address(tile(2));
    float d128[16][4], d64[8][4];
    wgmma_fence();
    for (int s = 0; s < 4; ++s)
        wgmma_ss<T, 128>(d128, smem_descriptor(a_at + 32 * s, 0, 1024),
                         smem_descriptor(b_at + 32 * s, 0, 1024), s > 0);
    for (int s = 0; s < 4; ++s)
        wgmma_ss<T, 64>(d64, smem_descriptor(a_at + 32 * s, 0, 1024), smem_descriptor(b_at + 32 * s, 0, 1024),
                        s > 0);
    wgmma_commit();
    wgmma_wait<0>();
    write_out<128>(d128, ss128, raw);
    write_out<64>(d64, ss64, raw + 128 * 64);
    // (c) thread (w, g, q), step s: a[j] = P[16w + g + 8 (j % 2)][16s + 2q + 8 (j / 2), + 1]
    const int w = t / 32, g = t % 32 / 4, q = t % 4;
    unsigned a[4][4];
    for (int s = 0; s < 4; ++s)
        for (int j = 0; j < 4; ++j) {
            const int r = 16 * w + g + 8 * (j % 2), k = 16 * s + 2 * q + 8 * (j / 2);
            a[s][j] = P[r * 64 + k] | unsigned(P[r * 64 + k + 1]) << 16;
        }
    float r64[8][4], r128[16][4];
    wgmma_fence();
    for (int s = 0; s < 4; ++s)  // 16 rows of V further: two groups of 8 rows, SBO each
        wgmma_rs<T, 64>(r64, a[s], smem_descriptor(a_at + 2048 * s, kBoxBytes, 1024), s > 0);
    for (int s = 0; s < 4; ++s)
        wgmma_rs<T, 128>(r128, a[s], smem_descriptor(a_at + 2048 * s, kBoxBytes, 1024), s > 0);
    wgmma_commit();
    wgmma_wait<0>();
    write_out<64>(r64, rs64, raw + 128 * 64 + 128 * 32);
    write_out<128>(r128, rs128, raw + 128 * 64 + 128 * 32 + 128 * 32);
}

// The tensor map of X (2, rows, 128): boxes of 64 x 64, 128-byte swizzle. On the GPU the driver's
// function, found through the runtime (no -lcuda).
static const char* encode(CUtensorMap* map, bool bf16, const unsigned short* X, int rows) {
    const cuuint64_t dims[3] = {128, cuuint64_t(rows), 2}, strides[2] = {256, 256 * cuuint64_t(rows)};
    const cuuint32_t box[3] = {64, 64, 1}, ones[3] = {1, 1, 1};
    auto encode_tiled = &cuTensorMapEncodeTiled;
#ifdef __CUDACC__
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
        return "no cuTensorMapEncodeTiled in the driver";
    encode_tiled = reinterpret_cast<decltype(encode_tiled)>(entry);
#endif
    const CUresult result = encode_tiled(
        map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
        const_cast<unsigned short*>(X), dims, strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return result == CUDA_SUCCESS ? "" : "cuTensorMapEncodeTiled failed";
}

extern "C" {
// Runs the program on one warpgroup; "" on success. raw: 128 x (64 + 32 + 32 + 64) floats.
const char* run_hopper_fragments(int bf16, const unsigned short* X, int rows, const unsigned short* P,
                                 unsigned short* boxes, float* ss128, float* ss64, float* rs64, float* rs128,
                                 float* raw) {
    CUtensorMap map;
    const char* error = encode(&map, bf16, X, rows);
    if (*error) return error;
    if (bf16) {
        cudaFuncSetAttribute(hopper_fragments<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSharedBytes);
        LAUNCH(hopper_fragments<__nv_bfloat16>, dim3(1), dim3(128), kSharedBytes, 0)(map, P, boxes, ss128,
                                                                                     ss64, rs64, rs128, raw);
    } else {
        cudaFuncSetAttribute(hopper_fragments<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSharedBytes);
        LAUNCH(hopper_fragments<__half>, dim3(1), dim3(128), kSharedBytes, 0)(map, P, boxes, ss128, ss64,
                                                                              rs64, rs128, raw);
    }
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}
}

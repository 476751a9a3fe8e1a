// Hopper's instructions on one block (kernels/hopper.cuh), for checking the emulation against the
// hardware: one warpgroup (128 threads) whose thread 0 loads 5 boxes of 64 x 64 16-bit values (bf16
// or fp16) by TMA with the 128-byte swizzle from a tensor X of shape (2, rows, 128), one of them past
// the tensor's last row, and then
//   (a) writes the 5 boxes out as they are in shared memory, swizzled;
//   (b) D = A B^T with wgmma_ss, N = 128 and 64: A = X[0, 0:64, 0:64] and B = X[1, 0:128, 0:64], both
//       K-major, 4 steps of k16, each descriptor 32 bytes further (N = 64's first by wgmma_ss_first, as
//       version 4's backward issues S^T and dP^T);
//   (c) D = P V with wgmma_rs, N = 64 and 128: P (64 x 64) from registers, 4 steps of k16, and
//       V = X[0, 0:64, 0:128] read as an MN-major B: two 64-column boxes side by side, SBO = 1024
//       (from 8 rows of k to the next 8), LBO = 8192 (from columns 0-63 to 64-127);
//   (d) wgmma_ss with A and/or B MN-major ("transposed", 4 steps of k16, each 16 rows of k = 2048
//       bytes further), the box of X[0, 0:64, 0:64] read as an M-major A: A = X[0, 0:64, 0:64]^T,
//       rows of 64 values of m, one per k, SBO = 1024, LBO = 8192 (no second 64 rows of m to reach):
//         mm128: A M-major, B = X[0, 0:64, 0:128] N-major as V in (c) (the backward's dQ = dS K);
//         mm64:  A M-major, B = X[1, 0:64, 0:64] N-major;
//         mk128: A M-major, B = X[1, 0:128, 0:64]^T K-major as in (b);
//         km64:  A = X[0, 0:64, 0:64] K-major as in (b), B = X[1, 0:64, 0:64] N-major;
//         mm32:  A M-major, B = X[1, 0:64, 32:64] N-major, N = 32, its descriptor 64 bytes into the
//                swizzled rows (the backward's dQ at d = 64: each consumer's half of the columns);
// and writes each D out, and each thread's accumulators as it holds them. A second kernel has blocks
// add into one buffer by the copy engine's bulk reduce (bulk_fragments below); a third loads boxes
// through a 4-D tensor map of a strided view, as version 4 reads a model's q, k, v (tma4_fragments);
// a fourth moves rows by the copy engine's plain bulk copies, as chapter 5's decode kernel reads its
// cache (bulk_load_fragments); a fifth hands out tickets by an int atomicAdd, as version 4's persistent
// forward hands out work tiles (tickets_fragments). nvcc builds it for
// sm_90a, g++ against kernels/cpu_cuda.h (tools/hopper_fragments_cpu.cpp); tools/fragments.py builds
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

// Where the kernel writes: the products, row-major, and each thread's accumulators of each (raw).
struct Outputs {
    float *ss128, *ss64, *rs64, *rs128, *mm128, *mm64, *mk128, *km64, *mm32, *raw;
};

template <class T>
__global__ void hopper_fragments(const __grid_constant__ CUtensorMap map, const unsigned short* P,
                                 unsigned short* boxes, const Outputs out) {
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
    wgmma_ss_first<T, 64>(d64, smem_descriptor(a_at, 0, 1024), smem_descriptor(b_at, 0, 1024));
    for (int s = 1; s < 4; ++s)
        wgmma_ss<T, 64>(d64, smem_descriptor(a_at + 32 * s, 0, 1024), smem_descriptor(b_at + 32 * s, 0, 1024),
                        true);
    wgmma_commit();
    wgmma_wait<0>();
    float* raw = out.raw;
    write_out<128>(d128, out.ss128, raw);
    write_out<64>(d64, out.ss64, raw + 128 * 64);
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
    write_out<64>(r64, out.rs64, raw + 128 * 64 + 128 * 32);
    write_out<128>(r128, out.rs128, raw + 128 * 64 + 128 * 32 + 128 * 32);
    // (d) MN-major: 16 rows of k (2048 bytes) per step; K-major: 32 bytes. Two at a time, as (b) and
    // (c), so that the accumulators in flight fit in the registers.
    auto mn = [](unsigned at, int s) { return smem_descriptor(at + 2048 * s, kBoxBytes, 1024); };
    auto km = [](unsigned at, int s) { return smem_descriptor(at + 32 * s, 0, 1024); };
    raw += 128 * 192;
    wgmma_fence();
    for (int s = 0; s < 4; ++s) wgmma_ss<T, 128, true, true>(d128, mn(a_at, s), mn(a_at, s), s > 0);
    for (int s = 0; s < 4; ++s) wgmma_ss<T, 64, true, true>(d64, mn(a_at, s), mn(b_at, s), s > 0);
    wgmma_commit();
    wgmma_wait<0>(d128, d64);
    write_out<128>(d128, out.mm128, raw);
    write_out<64>(d64, out.mm64, raw + 128 * 64);
    wgmma_fence();
    for (int s = 0; s < 4; ++s) wgmma_ss<T, 128, true, false>(d128, mn(a_at, s), km(b_at, s), s > 0);
    for (int s = 0; s < 4; ++s) wgmma_ss<T, 64, false, true>(d64, km(a_at, s), mn(b_at, s), s > 0);
    wgmma_commit();
    wgmma_wait<0>(d128, d64);
    write_out<128>(d128, out.mk128, raw + 128 * 96);
    write_out<64>(d64, out.km64, raw + 128 * 160);
    float d32[4][4];
    wgmma_fence();
    for (int s = 0; s < 4; ++s) wgmma_ss<T, 32, true, true>(d32, mn(a_at, s), mn(b_at + 64, s), s > 0);
    wgmma_commit();
    wgmma_wait<0>(d32);
    write_out<32>(d32, out.mm32, raw + 128 * 192);
}

// The bulk reduce (kernels/hopper.cuh): each block adds 512 floats into out[0 .. 512) by the copy
// engine, as the backward's blocks add their parts of dQ. Block b's first buffer holds i % 7 + b, added
// as one request (the first group), its second b + 1, as two requests of 128 floats (the second
// group); thread 0 issues them, and overwrites each buffer once the wait that retires its group has
// returned. Small integers: the sums are exact, in whatever order the blocks add.
__global__ void bulk_fragments(float* out) {
    float *first = smem, *second = smem + 256;  // 16-byte aligned, as the bulk reduce requires
    for (int i = threadIdx.x; i < 256; i += blockDim.x)
        first[i] = float(i % 7 + blockIdx.x), second[i] = float(blockIdx.x + 1);
    fence_proxy_async();  // written by the threads, read by the copy engine
    __syncthreads();
    if (threadIdx.x != 0) return;
    bulk_reduce_add(out, first, 256 * 4);
    bulk_commit();
    bulk_reduce_add(out + 256, second, 128 * 4);
    bulk_reduce_add(out + 384, second + 128, 128 * 4);
    bulk_commit();
    bulk_wait_read<1>();
    for (int i = 0; i < 256; ++i) first[i] = -1000.0f;
    bulk_wait_read<0>();
    for (int i = 0; i < 256; ++i) second[i] = -1000.0f;
}

// Version 4's 4-D boxes (kernels/hopper.cuh's tma_load with (x, y, z, w)): thread 0 loads 3 boxes of
// 64 x 64 through a tensor map of K = Y[:, :, 1] (B, rows, H, 64), a strided view of a projection
// Y (B, rows, 3, H, 64) as a model's q, k, v are: (column, row, head 1, batch 0), (0, row 64,
// head 0, batch 1), its rows 64-127 past the end of rows < 128 (zero fill), and (0, 0, head 1,
// batch 1); the boxes go out as they are in shared memory, swizzled.
__global__ void tma4_fragments(const __grid_constant__ CUtensorMap map, unsigned short* boxes) {
    char* base = reinterpret_cast<char*>(smem) + (1024 - shared_address(smem) % 1024) % 1024;
    uint64_t* bar = reinterpret_cast<uint64_t*>(base);
    auto tile = [&](int i) { return base + kTilesAt + i * kBoxBytes; };
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // (x: columns, y: rows, z: head, w: batch)
        mbarrier_arrive_expect_tx(bar, 3 * kBoxBytes);
        tma_load(tile(0), &map, 0, 0, 1, 0, bar);
        tma_load(tile(1), &map, 0, 64, 0, 1, bar);
        tma_load(tile(2), &map, 0, 0, 1, 1, bar);
    }
    mbarrier_wait(bar, 0);
    const unsigned short* tiles = reinterpret_cast<const unsigned short*>(tile(0));
    for (int i = threadIdx.x; i < 3 * 64 * 64; i += blockDim.x) boxes[i] = tiles[i];
}

// Bulk copies (kernels/hopper.cuh's bulk_load): rows of 272 bytes in shared memory (the decode
// kernel's padded rows), 16 of them, each filled by a copy of `bytes` (256, 128, or 48) from row
// order[i] of X (rows of 256 bytes), all counted on one mbarrier; then the 16 x 272 bytes go out as
// they are in shared memory (the bytes no copy wrote: the zeros written before).
__global__ void bulk_load_fragments(const unsigned char* X, const int* order, int bytes, unsigned char* out) {
    uint64_t* bar = reinterpret_cast<uint64_t*>(smem);
    unsigned char* rows = reinterpret_cast<unsigned char*>(smem) + 16;
    for (int i = threadIdx.x; i < 16 * 272; i += blockDim.x) rows[i] = 0;
    if (threadIdx.x == 0) {
        mbarrier_init(bar, 1);
        fence_mbarrier_init();
    }
    fence_proxy_async();  // the zeros, written by the threads, before the copy engine's writes
    __syncthreads();
    if (threadIdx.x == 0) mbarrier_arrive_expect_tx(bar, 16 * bytes);
    __syncthreads();  // the bytes announced before any copy can complete them
    if (threadIdx.x < 16) bulk_load(rows + threadIdx.x * 272, X + order[threadIdx.x] * 256, bytes, bar);
    mbarrier_wait(bar, 0);
    for (int i = threadIdx.x; i < 16 * 272; i += blockDim.x) out[i] = rows[i];
}

// The work counter of version 4's persistent forward (an int atomicAdd, whose old value is the ticket):
// each thread of each block takes `takes` tickets from *taken, and writes them, in the order it took
// them, to out[(block * blockDim + thread) * takes + i]. Every ticket from 0 on is taken exactly once,
// and each thread's are increasing, on the GPU and in the emulation; the threads' interleaving is each
// one's own. (__syncthreads between takes lets the block's threads interleave in the emulation too.)
__global__ void tickets_fragments(int* taken, int* out, int takes) {
    const int thread = blockIdx.x * blockDim.x + threadIdx.x;
    for (int i = 0; i < takes; ++i) {
        out[thread * takes + i] = atomicAdd(taken, 1);
        __syncthreads();
    }
}

// The driver's cuTensorMapEncodeTiled on the GPU, found through the runtime (no -lcuda); the
// emulation's on the CPU.
static decltype(&cuTensorMapEncodeTiled) encoder() {
#ifdef __CUDACC__
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
        return nullptr;
    return reinterpret_cast<decltype(&cuTensorMapEncodeTiled)>(entry);
#else
    return &cuTensorMapEncodeTiled;
#endif
}

// The tensor map of X (2, rows, 128): boxes of 64 x 64, 128-byte swizzle. On the GPU the driver's
// function, found through the runtime (no -lcuda).
static const char* encode(CUtensorMap* map, bool bf16, const unsigned short* X, int rows) {
    const cuuint64_t dims[3] = {128, cuuint64_t(rows), 2}, strides[2] = {256, 256 * cuuint64_t(rows)};
    const cuuint32_t box[3] = {64, 64, 1}, ones[3] = {1, 1, 1};
    const auto encode_tiled = encoder();
    if (!encode_tiled) return "no cuTensorMapEncodeTiled in the driver";
    const CUresult result = encode_tiled(
        map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 3,
        const_cast<unsigned short*>(X), dims, strides, box, ones, CU_TENSOR_MAP_INTERLEAVE_NONE,
        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return result == CUDA_SUCCESS ? "" : "cuTensorMapEncodeTiled failed";
}

extern "C" {
// Runs the program on one warpgroup; "" on success. products: the 9 products one after the other
// (ss128, ss64, rs64, rs128, mm128, mm64, mk128, km64, mm32), raw: each thread's accumulators of
// them, 128 x (64 + 32 + 32 + 64) floats for the first four, then 128 x (64 + 32 + 64 + 32 + 16).
const char* run_hopper_fragments(int bf16, const unsigned short* X, int rows, const unsigned short* P,
                                 unsigned short* boxes, float* products, float* raw) {
    CUtensorMap map;
    const char* error = encode(&map, bf16, X, rows);
    if (*error) return error;
    Outputs out;
    float** to[9] = {&out.ss128, &out.ss64,  &out.rs64, &out.rs128, &out.mm128,
                     &out.mm64,  &out.mk128, &out.km64, &out.mm32};
    const int columns[9] = {128, 64, 64, 128, 128, 64, 128, 64, 32};
    for (int i = 0; i < 9; ++i) *to[i] = products, products += 64 * columns[i];
    out.raw = raw;
    if (bf16) {
        cudaFuncSetAttribute(hopper_fragments<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSharedBytes);
        LAUNCH(hopper_fragments<__nv_bfloat16>, dim3(1), dim3(128), kSharedBytes, 0)(map, P, boxes, out);
    } else {
        cudaFuncSetAttribute(hopper_fragments<__half>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                             kSharedBytes);
        LAUNCH(hopper_fragments<__half>, dim3(1), dim3(128), kSharedBytes, 0)(map, P, boxes, out);
    }
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// The 3 boxes of tma4_fragments from K = Y[:, :, 1], Y (B, rows, 3, H, 64) contiguous; "" on success.
const char* run_tma4_fragments(int bf16, const unsigned short* Y, int B, int rows, int H, unsigned short* boxes) {
    const auto encode_tiled = encoder();
    if (!encode_tiled) return "no cuTensorMapEncodeTiled in the driver";
    const cuuint64_t row = 3ull * H * 64 * 2;  // bytes from one row of K to the next
    const cuuint64_t dims[4] = {64, cuuint64_t(rows), cuuint64_t(H), cuuint64_t(B)},
                     strides[3] = {row, 64 * 2, row * rows};
    const cuuint32_t box[4] = {64, 64, 1, 1}, ones[4] = {1, 1, 1, 1};
    CUtensorMap map;
    if (encode_tiled(&map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
                     const_cast<unsigned short*>(Y + H * 64), dims, strides, box, ones,
                     CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_NONE,
                     CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) != CUDA_SUCCESS)
        return "cuTensorMapEncodeTiled failed";
    cudaFuncSetAttribute(tma4_fragments, cudaFuncAttributeMaxDynamicSharedMemorySize, kSharedBytes);
    LAUNCH(tma4_fragments, dim3(1), dim3(128), kSharedBytes, 0)(map, boxes);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// bulk_load_fragments on X (rows of 256 bytes), rows order[0..15], `bytes` each; out: 16 x 272 bytes.
const char* run_bulk_load_fragments(const unsigned char* X, const int* order, int bytes, unsigned char* out) {
    LAUNCH(bulk_load_fragments, dim3(1), dim3(128), 16 + 16 * 272, 0)(X, order, bytes, out);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// The bulk reduce of `blocks` blocks of 128 threads into out (512 floats, zeros); "" on success.
const char* run_bulk_fragments(int blocks, float* out) {
    LAUNCH(bulk_fragments, dim3(blocks), dim3(128), 2048, 0)(out);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

// tickets_fragments on `blocks` blocks of 384 threads (version 4's block), `takes` tickets each; *taken
// starts at 0; out: blocks x 384 x takes ints.
const char* run_tickets_fragments(int blocks, int takes, int* taken, int* out) {
    LAUNCH(tickets_fragments, dim3(blocks), dim3(384), 0, 0)(taken, out, takes);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : cudaGetErrorString(err);
}
}

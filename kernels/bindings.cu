// Host side of the kernels: the table of versions, one launcher per (pass, version), and the C
// functions that minimal_flash.py calls through ctypes.
//
//   version 1  flash.cu, flash_backward.cu: the FlashAttention paper's Algorithms 1 and 4, one block
//              per (batch, head). Chapter 1: the algorithm as written, to read and step through.
//   version 2  flash2.cu, flash2_backward.cu: FlashAttention-2's loop order, one block per (batch,
//              head, 128 query rows) forward, per 64 keys backward. Chapter 2: the whole GPU busy.
//   version 3  flash3.cu, flash3_backward.cu: FlashAttention-2's loop order on tensor cores, bf16
//              and fp16, fp32 accumulation. Chapter 3.
//
// Adding a version: its kernel file, its two launchers, one row in `versions` below, one entry in
// minimal_flash.VERSIONS.
//
// No torch header is included, so a build takes seconds: Python passes the tensors' addresses after
// checking them (minimal_flash.py), and the stream to launch on. nvcc compiles this file for the GPU;
// kernels/cpu.cpp includes it so that g++ builds the very same kernels for the CPU emulation of
// cpu_cuda.h. Errors come back as a message ("" means success), never as a C++ exception.
#include <algorithm>
#include <map>
#include <mutex>
#include <string>
#include <utility>
#ifdef __CUDACC__
#include <cuda_runtime.h>
#define LAUNCH(kernel, grid, block, shared_bytes, stream) kernel<<<grid, block, shared_bytes, stream>>>
static size_t max_shared_bytes(int device) {  // the most shared memory a block may opt into
    int bytes = 0;
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return bytes;
}
#else
#include "cpu_cuda.h"
#endif
#include "flash.cu"
#include "flash2.cu"
#include "flash_backward.cu"
#include "flash2_backward.cu"
#include "flash3.cu"
#include "flash3_backward.cu"

// One call of a pass: the tensors' addresses (those the pass does not use are null), their sizes,
// and the stream. O and L are written by the forward, read by the backward. The addresses are typed
// float, the type of versions 1 and 2; version 3 reads them as 16-bit values (L stays float).
enum DType { FLOAT32, BFLOAT16, FLOAT16 };
struct Call {
    const float *Q, *K, *V, *dO;
    float *O, *L, *dQ, *dK, *dV;
    float* scratch;  // what the version's `scratch` asks for, below
    long long BH;    // B * H (batch, head) slices of N rows and d columns each
    int N, d;
    float scale;
    bool causal;
    int dtype;   // of Q, K, V, O, dO, dQ, dK, dV: a DType
    int device;  // the GPU the tensors are on
    cudaStream_t stream;
};

// What the CUDA runtime says about a kernel on a device, asked once: each question costs a few
// microseconds of host time, which at small sizes is as long as the kernel itself runs.
struct KernelInfo {
    int max_threads = 0;  // per block: the more registers a thread uses, the fewer
    size_t reserved = 0;  // dynamic shared memory the kernel has opted into
};
static std::mutex infos_mutex;  // Python threads may launch at the same time
static std::map<std::pair<const void*, int>, KernelInfo> infos;

template <class Kernel>
static int max_threads(Kernel* kernel, int device) {
    std::lock_guard<std::mutex> lock(infos_mutex);
    KernelInfo& info = infos[{(const void*)kernel, device}];
    cudaFuncAttributes attributes{};
    if (info.max_threads == 0 && cudaFuncGetAttributes(&attributes, kernel) == cudaSuccess)
        info.max_threads = attributes.maxThreadsPerBlock;  // on failure the launch check reports it
    return info.max_threads;
}

// A kernel gets more than 48 KB of dynamic shared memory only if it opts in.
template <class Kernel>
static std::string reserve_shared(Kernel* kernel, int device, size_t bytes) {
    std::lock_guard<std::mutex> lock(infos_mutex);
    KernelInfo& info = infos[{(const void*)kernel, device}];
    if (bytes <= info.reserved) return "";
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err == cudaSuccess) return info.reserved = bytes, "";
    cudaGetLastError();  // reported here: clear it, or the next launch check would report it again
    return "cannot reserve shared memory: " + std::string(cudaGetErrorString(err));
}

// Every launch is checked: a bad configuration or a fault becomes a Python exception.
template <class... Params, class... Args>
static std::string launch(const char* name, void (*kernel)(Params...), dim3 grid, int threads,
                          size_t shared_bytes, const Call& c, Args... args) {
    if (std::string err = reserve_shared(kernel, c.device, shared_bytes); !err.empty()) return err;
    LAUNCH(kernel, grid, dim3(threads), shared_bytes, c.stream)(args...);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : name + std::string(" failed: ") + cudaGetErrorString(err);
}

// Shared memory of a block of G thread groups, in bytes, from each kernel's own layout. Version 2's
// backward has one block shape, whatever G.
static size_t forward1_bytes(int d, int G) { return sizeof(float) * forward_shared_floats(d, G); }
static size_t backward1_bytes(int d, int G) { return sizeof(float) * backward_shared_floats(d, G); }
static size_t forward2_bytes(int d, int G) { return sizeof(float) * flash2_shared_floats(d, G * Br); }
static size_t backward2_bytes(int d, int) { return sizeof(float) * flash2_backward_shared_floats(d); }

// How many thread groups a block gets, each of `group` threads working on its own tile of `rows`
// (a Q tile of Br rows): one per tile, up to `threads` threads, as far as the
// device's shared memory and the kernel's registers allow (a kernel that uses many registers per
// thread can only be launched with fewer threads per block).
template <class Kernel>
static int thread_groups(Kernel* kernel, const Call& c, int rows, int group, size_t (*bytes)(int, int),
                         int threads) {
    int G = std::min(ceil_div(c.N, rows), std::min(max_threads(kernel, c.device), threads) / group);
    while (G > 1 && bytes(c.d, G) > max_shared_bytes(c.device)) --G;
    return std::max(G, 1);
}

// Version 1: one block per (batch, head); its G thread groups take G query tiles of the inner loop
// at once. Scratch: Algorithm 1's running l and m (forward), D = rowsum(dO * O) (backward).
static std::string forward1(const Call& c) {
    const int G = thread_groups(flash_forward, c, Br, Br, forward1_bytes, 1024);
    float *l = c.scratch, *m = c.scratch + c.BH * c.N;
    return launch("flash_forward", flash_forward, dim3(c.BH), G * Br, forward1_bytes(c.d, G), c,
                  c.Q, c.K, c.V, c.N, c.d, c.scale, c.causal, c.O, l, m, c.L);
}

static std::string backward1(const Call& c) {
    const int G = thread_groups(flash_backward, c, Br, Br, backward1_bytes, 1024);
    return launch("flash_backward", flash_backward, dim3(c.BH), G * Br, backward1_bytes(c.d, G), c,
                  c.Q, c.K, c.V, c.O, c.dO, c.L, c.N, c.d, c.scale, c.causal, c.scratch,
                  c.dQ, c.dK, c.dV);
}

// Version 3's dQ sums start at 0: its blocks add into them.
static std::string zero(float* p, long long floats, const Call& c) {
    if (cudaMemsetAsync(p, 0, sizeof(float) * floats, c.stream) == cudaSuccess) return "";
    return "zeroing dQ failed: " + std::string(cudaGetErrorString(cudaGetLastError()));
}

// Version 2: one column of blocks per (batch, head) slice, grid.y, at most 65535 of them.
static std::string grid_column_error(long long BH) {
    if (BH <= 65535) return "";
    return "B * H = " + std::to_string(BH) + " is more than the 65535 blocks a grid column may have";
}

// One block per (batch, head, G tiles of Br query rows), flash2_tile_threads threads per tile.
// Blocks are independent, so the grid has plenty; up to 4 warps per block give each
// multiprocessor's schedulers warps to switch between while one waits for memory. Whole warps
// only: the kernel's shuffles take all 32 lanes.
static std::string forward2(const Call& c) {
    if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
    if (!flash2_takes_block_sizes)
        return "version 2 takes Br a multiple of 4 and Bc = 16, 32 or 64; these kernels have Br = " +
               std::to_string(Br) + ", Bc = " + std::to_string(Bc);
    int G = thread_groups(flash2_forward, c, Br, flash2_tile_threads, forward2_bytes, 128);
    while (G * flash2_tile_threads % 32 != 0) ++G;
    return launch("flash2_forward", flash2_forward, dim3(ceil_div(c.N, G * Br), c.BH),
                  G * flash2_tile_threads, forward2_bytes(c.d, G), c, c.Q, c.K, c.V, c.N, c.d, c.scale,
                  c.causal, c.O, c.L);
}

// D first (a warp per row, into the scratch; the same kernel zeroes dQ, into which the blocks add),
// then one block of THREADS2 = 128 threads per (batch, head, tile of BC2 = 64 keys); its tile sizes
// are its own, whatever Br and Bc.
static std::string backward2(const Call& c) {
    if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
    const long long rows = c.BH * c.N;
    std::string err = launch("flash2_backward_D", flash2_backward_D, dim3((rows + 7) / 8), 256, 0, c,
                             c.O, c.dO, size_t(rows), c.d, c.scratch, c.dQ);
    if (!err.empty()) return err;
    return launch("flash2_backward", flash2_backward, dim3(ceil_div(c.N, BC2), c.BH), THREADS2,
                  backward2_bytes(c.d, 1), c, c.Q, c.K, c.V, c.dO, c.L, c.scratch, c.N, c.d,
                  c.scale, c.causal, c.dQ, c.dK, c.dV);
}

// Version 3: bf16 and fp16 travel as their raw 16 bits; compiled for d = 64 and 128 (a warp's
// fragments are arrays of d / 16 and d / 8).
static const unsigned short* bits(const float* p) { return reinterpret_cast<const unsigned short*>(p); }
static unsigned short* bits(float* p) { return reinterpret_cast<unsigned short*>(p); }

static std::string version3_error(const Call& c) {
    if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
    if (c.dtype == FLOAT32) return "version 3 takes bfloat16 or float16 tensors, not float32";
    if (c.d != 64 && c.d != 128) return "version 3 takes head dim d = 64 or 128, not " + std::to_string(c.d);
    // The kernel takes the running max of unscaled scores, right only for scale >= 0; and at scale 0
    // a masked score's exponent would be -inf * 0 = NaN.
    if (c.scale <= 0) return "version 3 takes softmax_scale > 0, not " + std::to_string(c.scale);
    return "";
}

// One launcher per (T, D): calls `launcher<T, D>` for the call's dtype and d.
template <template <class, int> class Launcher>
static std::string version3(const Call& c) {
    if (std::string err = version3_error(c); !err.empty()) return err;
    if (c.dtype == BFLOAT16)
        return c.d == 64 ? Launcher<__nv_bfloat16, 64>::run(c) : Launcher<__nv_bfloat16, 128>::run(c);
    return c.d == 64 ? Launcher<__half, 64>::run(c) : Launcher<__half, 128>::run(c);
}

// Forward: one block per (batch, head, BR3 = 128 query rows), 4 warps of 32 rows.
template <class T, int D>
struct Forward3 {
    static std::string run(const Call& c) {
        return launch("flash3_forward", flash3_forward<T, D>, dim3(ceil_div(c.N, BR3), c.BH), 32 * WARPS3,
                      flash3_shared_bytes(D), c, bits(c.Q), bits(c.K), bits(c.V), c.N, c.scale, c.causal,
                      bits(c.O), c.L);
    }
};

// Backward: D (one thread per row) and zeroed fp32 sums of dQ, in the scratch; one block per
// (batch, head, BC3B = 128 keys), 8 warps of 16 keys; then dQ's sums converted to T.
template <class T, int D>
struct Backward3 {
    static std::string run(const Call& c) {
        const long long rows = c.BH * c.N;
        float *dQ_sum = c.scratch, *Dsum = c.scratch + rows * D;
        std::string err = launch("flash3_backward_D", flash3_backward_D<T, D>, dim3((rows + 255) / 256), 256, 0,
                                 c, bits(c.O), bits(c.dO), size_t(rows), Dsum);
        if (err.empty()) err = zero(dQ_sum, rows * D, c);
        if (err.empty())
            err = launch("flash3_backward", flash3_backward<T, D>, dim3(ceil_div(c.N, BC3B), c.BH), 32 * WARPS3B,
                         flash3_backward_shared_bytes(D), c, bits(c.Q), bits(c.K), bits(c.V), bits(c.dO), c.L,
                         Dsum, c.N, c.scale, c.causal, dQ_sum, bits(c.dK), bits(c.dV));
        const size_t pairs = rows * D / 2;
        if (err.empty())
            err = launch("flash3_backward_dQ", flash3_backward_dQ<T>, dim3((pairs + 255) / 256), 256, 0, c,
                         dQ_sum, pairs, c.scale, bits(c.dQ));
        return err;
    }
};
static size_t forward3_bytes(int d, int) { return flash3_shared_bytes(d); }
static size_t backward3_bytes(int d, int) { return flash3_backward_shared_bytes(d); }

// The table: per version and pass, the launcher, the shared memory of a block of G groups, and the
// scratch floats per row of the B * H * N that the launcher is given: scratch + scratch_per_d * d.
struct Kernel {
    std::string (*launch)(const Call&);
    size_t (*shared_bytes)(int d, int G);
    int scratch, scratch_per_d;
};
enum Pass { FORWARD, BACKWARD };
static const Kernel versions[][2] = {
    {{forward1, forward1_bytes, 2, 0}, {backward1, backward1_bytes, 1, 0}},                  // version 1
    {{forward2, forward2_bytes, 0, 0}, {backward2, backward2_bytes, 1, 0}},                  // version 2
    {{version3<Forward3>, forward3_bytes, 0, 0}, {version3<Backward3>, backward3_bytes, 1, 1}},  // version 3
};
constexpr int VERSIONS = sizeof(versions) / sizeof(versions[0]);
static const Kernel* find(int pass, int version) {
    const bool known = (pass == FORWARD || pass == BACKWARD) && 1 <= version && version <= VERSIONS;
    return known ? &versions[version - 1][pass] : nullptr;
}

// Launches go to the current device: switch to the tensors' one for this call, then back.
static const char* run(int pass, int version, const Call& call) {
    static thread_local std::string message;  // lives until the next call from this thread
    const Kernel* kernel = find(pass, version);
    int current = call.device;
    cudaGetDevice(&current);
    if (current != call.device) cudaSetDevice(call.device);
    message = kernel ? kernel->launch(call) : "no kernel for pass " + std::to_string(pass) +
                                                  ", version " + std::to_string(version);
    if (current != call.device) cudaSetDevice(current);
    return message.c_str();
}

extern "C" {
int mf_versions() { return VERSIONS; }
int mf_block_size(int which) { return which == 0 ? Br : Bc; }  // 0: Br, 1: Bc
long long mf_device_shared_bytes(int device) { return max_shared_bytes(device); }

// The least shared memory a block of this pass and version needs (one thread group), and the
// scratch floats it needs per row at head dim d; -1 for a pass or version that does not exist.
long long mf_shared_bytes(int pass, int version, int d) {
    const Kernel* kernel = find(pass, version);
    return kernel ? (long long)kernel->shared_bytes(d, 1) : -1;
}
long long mf_scratch_floats(int pass, int version, long long rows, int d) {
    const Kernel* kernel = find(pass, version);
    return kernel ? (kernel->scratch + kernel->scratch_per_d * (long long)d) * rows : -1;
}

// O = softmax(scale * Q K^T) V and L = the rows' log-sum-exp, into O and L.
// `dtype`: a DType; `device` and `stream`: where the tensors are and the stream to launch on (both 0
// on the CPU).
const char* mf_forward(int version, const float* Q, const float* K, const float* V, float* O, float* L,
                       float* scratch, long long BH, int N, int d, float scale, bool causal, int dtype,
                       int device, void* stream) {
    const Call call{Q, K, V, nullptr, O, L, nullptr, nullptr, nullptr, scratch, BH, N, d, scale, causal,
                    dtype, device, cudaStream_t(stream)};
    return run(FORWARD, version, call);
}

// dQ, dK, dV of the loss, given dO and the forward's O and L, into dQ, dK, dV.
const char* mf_backward(int version, const float* Q, const float* K, const float* V, float* O,
                        const float* dO, float* L, float* dQ, float* dK, float* dV, float* scratch,
                        long long BH, int N, int d, float scale, bool causal, int dtype, int device,
                        void* stream) {
    const Call call{Q, K, V, dO, O, L, dQ, dK, dV, scratch, BH, N, d, scale, causal, dtype, device,
                    cudaStream_t(stream)};
    return run(BACKWARD, version, call);
}
}

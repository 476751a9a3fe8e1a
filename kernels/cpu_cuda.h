// Just enough of CUDA to run the kernels in kernels/*.cu on a CPU, unchanged.
//
// A launch runs the grid's blocks one after another. Each block's threads are real CPU threads
// (one std::thread per CUDA thread), so __syncthreads() is a real barrier: a missing barrier shows
// up here as a wrong answer, as it would on a GPU. Shared memory is one buffer that the blocks take
// in turn; it is filled with NaN before each block, so reading a word that nobody wrote poisons the
// result instead of silently reusing the previous block's data. This is an emulation for checking
// and reading along, not for speed.
#pragma once
#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __shared__  // `extern __shared__ float smem[];` then names the buffer below
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)  // a hint to nvcc's register allocation

struct dim3 {
    unsigned x, y, z;
    dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

inline float __expf(float x) { return std::exp(x); }
inline float fast_exp2(float x) { return std::exp2(x); }  // kernels/mma.cuh
struct alignas(16) float4 {  // read as one 16-byte load on a GPU (the build sets -fno-strict-aliasing)
    float x, y, z, w;
};

// bf16 and fp16, as bits, with CUDA's conversions: from float, rounded to the nearest value, ties to
// even, as __float2bfloat16 and __float2half do (tests/test_fragments.py checks them against torch).
struct __nv_bfloat16 {
    unsigned short bits;
};
struct __half {
    unsigned short bits;
};
inline unsigned float_bits(float f) {
    unsigned u;
    std::memcpy(&u, &f, 4);
    return u;
}
inline float bits_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // bf16 is a float's upper 16 bits, rounded
    const unsigned u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)(u >> 16 | 0x40)};  // NaN stays NaN
    return {(unsigned short)((u + 0x7fffu + (u >> 16 & 1)) >> 16)};
}
inline float __bfloat162float(__nv_bfloat16 h) { return bits_float(unsigned(h.bits) << 16); }
inline __half __float2half(float f) {  // 5 exponent bits (bias 15) and 10 mantissa bits
    const unsigned u = float_bits(f), sign = u >> 16 & 0x8000u, a = u & 0x7fffffffu;
    auto rounded = [](unsigned h, unsigned rest, unsigned halfway) {  // ties to even
        return h + (rest > halfway || (rest == halfway && (h & 1)));
    };
    if (a > 0x7f800000u) return {(unsigned short)(sign | 0x7e00u)};  // NaN
    if (a >= 0x477ff000u) return {(unsigned short)(sign | 0x7c00u)};  // 65520 and up round to inf
    if (a >= 0x38800000u)  // a normal half: rebias the exponent from 127 to 15, keep 10 mantissa bits
        return {(unsigned short)(sign | rounded((a - 0x38000000u) >> 13, a & 0x1fffu, 0x1000u))};
    const int e = a >> 23;  // below 2^-14: a subnormal half, in units of 2^-24
    if (e < 102) return {(unsigned short)sign};  // below 2^-25: rounds to 0
    const unsigned m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    return {(unsigned short)(sign | rounded(m >> shift, m & ((1u << shift) - 1), 1u << (shift - 1)))};
}
inline float __half2float(__half h) {
    const unsigned sign = unsigned(h.bits & 0x8000u) << 16, e = h.bits >> 10 & 0x1fu, m = h.bits & 0x3ffu;
    if (e == 31) return bits_float(sign | 0x7f800000u | m << 13);                // inf, NaN
    if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(float(m), -24);       // 0, subnormal
    return bits_float(sign | (e + 112) << 23 | m << 13);
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return {bits}; }
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }
// The threads of a block run at the same time here too, so atomicAdd must really be atomic.
inline std::mutex atomic_add_mutex;
inline float atomicAdd(float* address, float value) {
    std::lock_guard<std::mutex> lock(atomic_add_mutex);
    const float old = *address;
    *address = old + value;
    return old;
}
inline int min(int a, int b) { return std::min(a, b); }  // CUDA's integer min and max, for device code
inline int max(int a, int b) { return std::max(a, b); }

// The opt-in limit of an H100/H200 (227 KB). As on a GPU, a kernel gets more than 48 KB of dynamic
// shared memory only after cudaFuncSetAttribute raises its limit.
constexpr size_t kMaxSharedBytes = 227 * 1024, kDefaultSharedBytes = 48 * 1024;
alignas(16) inline float smem[kMaxSharedBytes / sizeof(float)];

enum cudaError_t { cudaSuccess, cudaErrorInvalidValue, cudaErrorInvalidConfiguration, cudaErrorMisalignedAddress };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline cudaError_t cpu_last_error = cudaSuccess;
inline std::map<const void*, size_t> cpu_shared_limit;  // per kernel, set by cudaFuncSetAttribute

using cudaStream_t = void*;  // launches run at once, in order: one stream is all there is
inline cudaError_t cudaMemsetAsync(void* address, int value, size_t bytes, cudaStream_t) {
    std::memset(address, value, bytes);
    return cudaSuccess;
}

inline cudaError_t cudaGetLastError() {
    cudaError_t err = cpu_last_error;
    cpu_last_error = cudaSuccess;
    return err;
}
inline const char* cudaGetErrorString(cudaError_t err) {
    return err == cudaSuccess                 ? "no error"
           : err == cudaErrorInvalidValue     ? "invalid argument"
           : err == cudaErrorMisalignedAddress ? "misaligned address"
                                              : "invalid configuration argument";
}
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute, int bytes) {
    if (bytes < 0 || size_t(bytes) > kMaxSharedBytes) return cpu_last_error = cudaErrorInvalidValue;
    cpu_shared_limit[(const void*)kernel] = bytes;
    return cudaSuccess;
}
inline size_t max_shared_bytes(int) { return kMaxSharedBytes; }
inline cudaError_t cudaGetDevice(int* device) { return *device = 0, cudaSuccess; }  // one "device"
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }

// On a GPU, the registers a kernel uses per thread limit the threads a block may have; on the CPU,
// any kernel may have the 1024 that every CUDA GPU allows.
struct cudaFuncAttributes {
    int maxThreadsPerBlock;
};
template <class Kernel>
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, Kernel*) {
    attributes->maxThreadsPerBlock = 1024;
    return cudaSuccess;
}

// A barrier for the threads of one block: the last to arrive releases the others.
class BlockBarrier {
    std::mutex mutex_;
    std::condition_variable released_;
    unsigned threads_ = 0, arrived_ = 0, generation_ = 0;

  public:
    void reset(unsigned threads) { threads_ = threads, arrived_ = 0; }
    void wait() {
        std::unique_lock<std::mutex> lock(mutex_);
        const unsigned generation = generation_;
        if (++arrived_ == threads_) {
            arrived_ = 0, ++generation_;
            released_.notify_all();
        } else {
            released_.wait(lock, [&] { return generation != generation_; });
        }
    }
};
inline BlockBarrier block_barrier;
inline void __syncthreads() { block_barrier.wait(); }

// Warp-collective operations. The 32 threads of a warp exchange values through a buffer of their
// own and meet at a barrier of their own before and after, as the lanes of a warp execute a shuffle
// together on a GPU: a lane that reads the wrong partner gets the wrong value here too. Only whole
// warps with the full mask, which is all the kernels use; anything else fails the launch.
struct Warp {
    BlockBarrier barrier;
    float value[32];                // a shuffle's values
    unsigned a[32][4], b[32][2];    // an mma's fragments
    const unsigned short* row[32];  // an ldmatrix's row addresses
};
inline std::unique_ptr<Warp[]> warps;
inline std::atomic<bool> bad_warp_call{false};
// The calling lane's warp and lane number, for the collectives below; a block of whole warps only.
inline Warp* warp_of_caller(unsigned& lane) {
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    if (blockDim.x * blockDim.y * blockDim.z % 32 != 0) return bad_warp_call = true, nullptr;
    lane = t % 32;
    return &warps[t / 32];
}

inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
    unsigned lane;
    Warp* warp = warp_of_caller(lane);
    const unsigned partner = lane ^ unsigned(lane_mask);
    if (!warp || mask != 0xffffffffu || partner >= 32) return bad_warp_call = true, value;
    warp->value[lane] = value;
    warp->barrier.wait();  // every lane has written its value
    const float other = warp->value[partner];
    warp->barrier.wait();  // every lane has read, before the next shuffle writes again
    return other;
}


// mma.sync m16n8k16, a warp-collective: the 32 lanes put their fragments together, then each lane
// computes its 4 elements of d = A B + c from the whole tiles, in the layouts of kernels/mma.cuh.
template <class Half, float (*to_float)(Half)>
inline void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    unsigned lane;
    Warp* warp = warp_of_caller(lane);
    if (!warp) return;
    std::copy(a, a + 4, warp->a[lane]), std::copy(b, b + 2, warp->b[lane]);
    warp->barrier.wait();  // every lane's fragments are in
    auto half = [](unsigned reg, int high) { return to_float(Half{(unsigned short)(high ? reg >> 16 : reg)}); };
    auto A = [&](int r, int k) { return half(warp->a[r % 8 * 4 + k % 8 / 2][r / 8 + k / 8 * 2], k % 2); };
    auto B = [&](int k, int n) { return half(warp->b[n * 4 + k % 8 / 2][k / 8], k % 2); };
    const unsigned g = lane / 4, q = lane % 4;
    float result[4];
    for (int i = 0; i < 4; ++i) {
        const int r = g + 8 * (i / 2), n = 2 * q + i % 2;
        result[i] = c[i];
        for (int k = 0; k < 16; ++k) result[i] += A(r, k) * B(k, n);
    }
    warp->barrier.wait();  // every lane has read the tiles before the next collective writes again
    std::copy(result, result + 4, d);
}
inline void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    mma_m16n8k16<__nv_bfloat16, __bfloat162float>(d, a, b, c);
}
inline void mma_f16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4]) {
    mma_m16n8k16<__half, __half2float>(d, a, b, c);
}

// ldmatrix .x4, a warp-collective: lane 8i + j gives the address of row j of tile i; lane l gets
// row g, columns 2q, 2q+1 of each tile (transposed: rows 2q, 2q+1 of column g).
inline void ldmatrix(unsigned (&r)[4], const void* row, bool transposed) {
    unsigned lane;
    Warp* warp = warp_of_caller(lane);
    if (!warp) return;
    warp->row[lane] = static_cast<const unsigned short*>(row);
    warp->barrier.wait();  // every lane's address is in
    const unsigned g = lane / 4, q = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const unsigned short* const* rows = warp->row + 8 * i;
        r[i] = transposed ? rows[2 * q][g] | unsigned(rows[2 * q + 1][g]) << 16
                          : rows[g][2 * q] | unsigned(rows[g][2 * q + 1]) << 16;
    }
    warp->barrier.wait();  // every lane has read the addresses before the next collective writes
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* row) { ldmatrix(r, row, false); }
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row) { ldmatrix(r, row, true); }

// cp.async: a thread's copies land when it waits for their group, not before, so a kernel that reads
// a tile before cp_async_wait (or without the __syncthreads after it) reads stale values here as it
// may on a GPU. Copies never waited for fail the launch, and so does a copy whose addresses are
// not multiples of its size, as on a GPU.
struct AsyncCopy {
    void* to;
    size_t size;              // 16 or 4 bytes
    unsigned char bytes[16];  // the source, read at issue: kernels copy from inputs nobody writes
};
inline thread_local std::vector<AsyncCopy> copies_issued;  // not yet committed to a group
inline thread_local std::vector<std::vector<AsyncCopy>> copy_groups;
inline std::atomic<bool> copies_left{false}, copy_misaligned{false};
template <size_t size>
inline void cp_async(void* to, const void* from, bool valid) {  // with valid false, zeros land
    AsyncCopy copy{to, size, {}};
    if (reinterpret_cast<uintptr_t>(to) % size || reinterpret_cast<uintptr_t>(from) % size) copy_misaligned = true;
    if (valid) std::memcpy(copy.bytes, from, size);
    copies_issued.push_back(copy);
}
inline void cp_async16(void* to, const void* from, bool valid) { cp_async<16>(to, from, valid); }
inline void cp_async4(void* to, const void* from, bool valid) { cp_async<4>(to, from, valid); }
inline void cp_async_commit() { copy_groups.push_back(std::move(copies_issued)), copies_issued.clear(); }
template <int n>
inline void cp_async_wait() {
    for (; copy_groups.size() > size_t(n); copy_groups.erase(copy_groups.begin()))
        for (const AsyncCopy& copy : copy_groups.front()) std::memcpy(copy.to, copy.bytes, copy.size);
}

// LAUNCH(kernel, grid, block, shared_bytes, stream)(args...) stands for
// kernel<<<grid, block, shared_bytes, stream>>>(args...).
template <class Kernel>
struct CpuLaunch {
    Kernel* kernel;
    dim3 grid, block;
    size_t shared_bytes;

    template <class... Args>
    void operator()(Args... args) const {
        const unsigned threads = block.x * block.y * block.z;
        auto limit = cpu_shared_limit.find((const void*)kernel);
        if (threads == 0 || threads > 1024 || grid.x * grid.y * grid.z == 0 ||
            shared_bytes > (limit == cpu_shared_limit.end() ? kDefaultSharedBytes : limit->second)) {
            cpu_last_error = cudaErrorInvalidConfiguration;  // what the GPU reports for these
            return;
        }
        gridDim = grid, blockDim = block;
        block_barrier.reset(threads);
        warps.reset(new Warp[(threads + 31) / 32]);
        for (unsigned w = 0; w < (threads + 31) / 32; ++w) warps[w].barrier.reset(std::min(32u, threads - 32 * w));
        bad_warp_call = false, copies_left = false, copy_misaligned = false;
        std::vector<std::thread> pool;
        for (unsigned t = 0; t < threads; ++t)
            pool.emplace_back([&, t] {
                threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
                for (unsigned b = 0; b < grid.x * grid.y * grid.z; ++b) {
                    if (t == 0)
                        std::fill_n(smem, shared_bytes / sizeof(float),
                                    std::numeric_limits<float>::quiet_NaN());
                    block_barrier.wait();  // poisoned before any thread of block b starts
                    blockIdx = dim3(b % grid.x, b / grid.x % grid.y, b / (grid.x * grid.y));
                    kernel(args...);
                    for (const auto& group : copy_groups) copies_left = copies_left || !group.empty();
                    copies_left = copies_left || !copies_issued.empty();
                    copies_issued.clear(), copy_groups.clear();
                    block_barrier.wait();  // block b is finished before thread 0 poisons again
                }
            });
        for (auto& thread : pool) thread.join();
        if (bad_warp_call || copies_left) cpu_last_error = cudaErrorInvalidValue;  // what the emulation cannot run
        if (copy_misaligned) cpu_last_error = cudaErrorMisalignedAddress;
    }
};
#define LAUNCH(kernel, grid, block, shared_bytes, stream) \
    CpuLaunch<std::remove_pointer_t<decltype(kernel)>>{kernel, grid, block, shared_bytes}

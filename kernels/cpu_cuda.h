// Just enough of CUDA to run the kernels in kernels/*.cu on a CPU, unchanged.
//
// How a launch runs. The grid's blocks are spread over the machine's cores: one worker per core
// (the calling thread and hardware_concurrency - 1 more OS threads), each taking the next block
// from a shared counter. A worker runs a block's threads as fibers: each CUDA thread has a stack
// of its own, but all of them run on the worker's one OS thread, one at a time, and a thread runs
// until it has to wait (at __syncthreads, at a warp-collective operation, or at its end); then the
// worker switches to the next thread that can run. Switching is a handful of instructions
// (cpu_cuda_switch below): on a 2-core x86-64 machine a __syncthreads costs about 10 ns per thread,
// against about 300 ns with the C library's swapcontext (a system call per switch, to save the
// signal mask), and far more with an OS thread per CUDA thread, as this emulation first had.
//
// What stays as on a GPU, because the kernels' correctness is checked here:
//   - __syncthreads() really blocks: a thread waits there until every thread of its block has
//     arrived, so a missing barrier gives a wrong answer here too: a thread, and a warp, runs
//     ahead of the others as far as it can, in an order that turns at every barrier (see
//     Worker::make_block_ready and Worker::sync_warp). A barrier that can never complete (threads
//     that exited, or wait at another barrier) fails the launch with a message that names the
//     kernel and the line.
//   - Warp-collective operations (__shfl_xor_sync, mma.sync m16n8k16, ldmatrix) meet all 32 lanes
//     of the warp: each lane hands in its values, the last to arrive completes the operation, and
//     each lane takes its own result from the whole warp's values, in the PTX ISA's lane layouts. What
//     the warp reads from memory (ldmatrix's rows) it reads then, before any lane goes on.
//   - Shared memory is the worker's own buffer, filled with NaN before each block (and past the
//     block's size, as far as earlier blocks used it), so a read of a word nobody wrote poisons the
//     result instead of silently reusing the previous block's data; a block that wrote past its size
//     fails the launch once it ends, as a GPU reports an illegal address.
//   - cp.async copies land when their thread waits for them, not before; until then their
//     destination holds NaN (on a GPU it holds the old data or the new, or part of each).
//   - Hopper's instructions (kernels/hopper.cuh) keep their semantics: an mbarrier wait blocks until
//     the phase's arrivals and bytes are all in, a TMA box (of a 3-D or 4-D tensor map, its strides
//     in any order) lands (swizzled, zeros past the tensor) only when a thread waits on its barrier,
//     a wgmma is a collective of its warpgroup whose results land in the accumulators only at the
//     wgmma_wait that retires them (NaN before), a bulk reduce reads its shared memory (and adds it
//     into global memory) only at the bulk_wait_read that retires it, and named barriers block.
//     Their deadlocks are named as a __syncthreads' are, and so is a setmaxnreg.inc that asks for
//     registers no setmaxnreg.dec gave back (on a GPU it waits for good).
//   - atomicAdd is atomic, across blocks that run on different cores too.
//   - Launch errors as a GPU reports them: too many threads, too much shared memory; and errors in a
//     kernel: a misaligned float4 or ldmatrix row, a cp.async or ldmatrix outside shared memory, a failed
//     assert. A C++ exception that leaves a kernel fails the launch too. A fault (an index far out of
//     bounds, a stack overflow) ends the process, as it ends the CUDA context, with a line that names
//     the kernel, block and thread: it cannot be recovered from safely.
// And what a GPU does not have: Ctrl-C (SIGINT) stops a launch within a moment, and a launch that
// runs for more than a few seconds says so on stderr, with an estimate of the time left. (A thread that
// never waits, spinning on a flag or looping for good, cannot be stopped: a second Ctrl-C ends the
// process, saying so.) A poll that can never succeed (an mbarrier try_wait loop) fails as a deadlock.
//
// This is an emulation for checking and reading along: kernels run correctly, not at a GPU's speed.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>
#include <cxxabi.h>
#include <dlfcn.h>
#include <pthread.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

// A hand-written context switch on x86-64 and AArch64; elsewhere (or with -DCPU_CUDA_UCONTEXT)
// the C library's swapcontext, which also saves the signal mask: a system call per switch.
#if (defined(__x86_64__) || defined(__aarch64__)) && !defined(CPU_CUDA_UCONTEXT)
#define CPU_CUDA_ASM_SWITCH 1
#else
#define CPU_CUDA_ASM_SWITCH 0
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
// `extern __shared__ float smem[];` in a kernel then declares the worker's own buffer, `smem`
// below: blocks run in parallel on several workers, each with its own shared memory. A static
// `__shared__ float tile[64];` becomes a per-OS-thread static: never poisoned, kept from block to
// block, and not shared memory to the emulation's checks (an mbarrier there is refused): kernels here
// put everything in the dynamic buffer.
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)  // a hint to nvcc's register allocation

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x = 1, unsigned y = 1, unsigned z = 1) : x(x), y(y), z(z) {}
};

inline float __expf(float x) { return std::exp(x); }
inline float fast_exp2(float x) {  // kernels/mma.cuh: a subnormal result is 0 from the GPU's instruction (ftz)
    const float y = std::exp2(x);
    return y < std::numeric_limits<float>::min() ? 0.0f : y;  // (min: the smallest normal float)
}
inline float fast_tanh(float x) { return std::tanh(x); }  // kernels/mma.cuh (the GPU's: within 2^-11 of it)
// float4 and float2: one 16-byte (8-byte) load or store on a GPU, which faults there ("misaligned address")
// at an address that is not a multiple of 16 (8). Here they are plain floats (the build sets
// -fno-strict-aliasing), not aligned as a type: so g++ never emits an aligned vector instruction that
// would kill the process at such an address (x86's movaps), and every copy from or to one checks the
// address and fails the launch instead, as the GPU does (cpu_cuda_misaligned, defined below).
__attribute__((visibility("hidden"))) inline void cpu_cuda_misaligned(const void* address, unsigned size, bool store,
                                                               const char* file, int line);
template <unsigned size>
inline void cpu_cuda_check_aligned(const void* address, bool store, const char* file = "", int line = 0) {
    if (__builtin_expect(reinterpret_cast<uintptr_t>(address) % size != 0, 0))
        cpu_cuda_misaligned(address, size, store, file, line);
}
struct float4 {
    float x, y, z, w;
    float4() = default;
    constexpr float4(float x, float y, float z, float w) : x(x), y(y), z(z), w(w) {}
    float4(const float4& v, const char* file = __builtin_FILE(), int line = __builtin_LINE())
        : x(v.x), y(v.y), z(v.z), w(v.w) {
        cpu_cuda_check_aligned<16>(&v, false, file, line);
    }
    float4& operator=(const float4& v) {
        cpu_cuda_check_aligned<16>(this, true);
        x = v.x, y = v.y, z = v.z, w = v.w;
        return *this;
    }
};
struct float2 {
    float x, y;
    float2() = default;
    constexpr float2(float x, float y) : x(x), y(y) {}
    float2(const float2& v, const char* file = __builtin_FILE(), int line = __builtin_LINE()) : x(v.x), y(v.y) {
        cpu_cuda_check_aligned<8>(&v, false, file, line);
    }
    float2& operator=(const float2& v) {
        cpu_cuda_check_aligned<8>(this, true);
        x = v.x, y = v.y;
        return *this;
    }
};
inline float2 make_float2(float x, float y) { return {x, y}; }

// bf16 and fp16, as bits, with CUDA's conversions: from float, rounded to the nearest value, ties to
// even, as __float2bfloat16 and __float2half do (tests/test_fragments.py checks them against torch).
struct __nv_bfloat16 {
    unsigned short bits;
};
struct __half {
    unsigned short bits;
};

// The driver's tensor map (kernels/hopper.cuh, TMA), as cuda.h declares it: 128 opaque bytes that
// cuTensorMapEncodeTiled fills on the host and a kernel takes as a __grid_constant__ parameter. Here
// they hold the encode's arguments (cpu_cuda::TensorMap below). Visible, as the types above: a kernel
// that takes one by value is then visible too, and its name is in the messages.
using cuuint32_t = uint32_t;
using cuuint64_t = uint64_t;
struct CUtensorMap {
    alignas(64) cuuint64_t opaque[16];
};
enum CUresult { CUDA_SUCCESS = 0, CUDA_ERROR_INVALID_VALUE = 1 };
enum CUtensorMapDataType {
    CU_TENSOR_MAP_DATA_TYPE_UINT8 = 0,
    CU_TENSOR_MAP_DATA_TYPE_UINT16,
    CU_TENSOR_MAP_DATA_TYPE_UINT32,
    CU_TENSOR_MAP_DATA_TYPE_INT32,
    CU_TENSOR_MAP_DATA_TYPE_UINT64,
    CU_TENSOR_MAP_DATA_TYPE_INT64,
    CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
    CU_TENSOR_MAP_DATA_TYPE_FLOAT32,
    CU_TENSOR_MAP_DATA_TYPE_FLOAT64,
    CU_TENSOR_MAP_DATA_TYPE_BFLOAT16,
};
enum CUtensorMapInterleave { CU_TENSOR_MAP_INTERLEAVE_NONE = 0 };  // the interleaved layouts: not emulated
enum CUtensorMapSwizzle {
    CU_TENSOR_MAP_SWIZZLE_NONE = 0,
    CU_TENSOR_MAP_SWIZZLE_32B,
    CU_TENSOR_MAP_SWIZZLE_64B,
    CU_TENSOR_MAP_SWIZZLE_128B,
};
enum CUtensorMapL2promotion {  // a cache hint: no effect here
    CU_TENSOR_MAP_L2_PROMOTION_NONE = 0,
    CU_TENSOR_MAP_L2_PROMOTION_L2_64B,
    CU_TENSOR_MAP_L2_PROMOTION_L2_128B,
    CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
};
enum CUtensorMapFloatOOBfill {  // what lands for elements outside the tensor: zeros, or NaN
    CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE = 0,
    CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA,
};
#define __grid_constant__  // a kernel parameter that stays in the parameter space: all of them, here

// Everything from here on is hidden in the library that includes this header, and each library has
// its own emulation: a process may load two builds (minimal_flash loads an edited kernel's new
// build next to the old one), and were these functions and variables visible, the second would
// use the first one's. The types above stay visible, so that kernels templated on them
// (flash3_forward<__nv_bfloat16, 64>) are visible too, with names that a message can give.
#pragma GCC visibility push(hidden)

// threadIdx is the running fiber's: the worker sets it at every switch. The switch is a call the
// compiler cannot see into, so a kernel reads threadIdx anew after every wait.
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;  // set before a launch's workers start, the same for all

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
    if (a > 0x7f800000u) return {(unsigned short)(sign | 0x7e00u)};   // NaN
    if (a >= 0x477ff000u) return {(unsigned short)(sign | 0x7c00u)};  // 65520 and up round to inf
    if (a >= 0x38800000u)  // a normal half: rebias the exponent from 127 to 15, keep 10 mantissa bits
        return {(unsigned short)(sign | rounded((a - 0x38000000u) >> 13, a & 0x1fffu, 0x1000u))};
    const int e = a >> 23;                       // below 2^-14: a subnormal half, in units of 2^-24
    if (e < 102) return {(unsigned short)sign};  // below 2^-25: rounds to 0
    const unsigned m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    return {(unsigned short)(sign | rounded(m >> shift, m & ((1u << shift) - 1), 1u << (shift - 1)))};
}
inline float __half2float(__half h) {
    const unsigned sign = unsigned(h.bits & 0x8000u) << 16, e = h.bits >> 10 & 0x1fu, m = h.bits & 0x3ffu;
    if (e == 31) return bits_float(sign | 0x7f800000u | m << 13);          // inf, NaN
    if (e == 0) return (sign ? -1.0f : 1.0f) * std::ldexp(float(m), -24);  // 0, subnormal
    return bits_float(sign | (e + 112) << 23 | m << 13);
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }
inline unsigned short __half_as_ushort(__half h) { return h.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short bits) { return {bits}; }
inline __half __ushort_as_half(unsigned short bits) { return {bits}; }

// Blocks run at the same time on several cores, so atomicAdd must really be atomic: a
// compare-and-swap loop on the float's bits. (The threads of one block take turns on one core and
// never switch inside it.)
inline float atomicAdd(float* address, float value) {
    unsigned* bits = reinterpret_cast<unsigned*>(address);
    unsigned old = __atomic_load_n(bits, __ATOMIC_RELAXED);
    while (!__atomic_compare_exchange_n(bits, &old, float_bits(bits_float(old) + value), true,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
    return bits_float(old);
}
inline int atomicAdd(int* address, int value) { return __atomic_fetch_add(address, value, __ATOMIC_RELAXED); }
inline int min(int a, int b) { return std::min(a, b); }  // CUDA's integer min and max, for device code
inline int max(int a, int b) { return std::max(a, b); }

// The opt-in limit of an H100/H200 (227 KB). As on a GPU, a kernel gets more than 48 KB of dynamic
// shared memory only after cudaFuncSetAttribute raises its limit.
constexpr size_t kMaxSharedBytes = 227 * 1024, kDefaultSharedBytes = 48 * 1024;
// What shared memory holds before a block writes it, and a cp.async's destination until the copy
// lands: every byte 0xff, which reads as NaN whether a kernel reads floats, bf16 or fp16 (a float's
// usual NaN, 0x7fc00000, would read as two 16-bit values of which one is 0.0).
constexpr int kPoison = 0xff;
// A worker's shared memory. Its initialiser is dynamic on purpose (a volatile read, which no
// compiler can fold into a constant): in a kernel template, g++ 12 compiles the block-scope
// `extern thread_local` declaration as a call to the variable's thread-local initialiser, which
// exists only for a dynamically initialised variable; without one the kernel calls address 0.
inline float dynamic_zero() {
    volatile float zero = 0.0f;
    return zero;
}
// Aligned to 1024 bytes: TMA and wgmma swizzle shared memory by address bits 4-9, and their tiles are
// 1024-byte aligned as offsets from the start of shared memory (hopper.cuh's shared_address), which
// are then aligned as addresses too.
alignas(1024) inline thread_local float smem[kMaxSharedBytes / sizeof(float)] = {dynamic_zero()};
// How many bytes of this OS thread's smem may hold more than the poison (Worker::run_block): all of it
// in a thread that has run no block yet. Per OS thread, as smem is: a launch's helper threads are new
// ones, and a worker may run on another thread than it did in the launch before.
inline thread_local size_t smem_dirty = kMaxSharedBytes;

// The CUDA runtime's errors that a launch here can report, and two of the emulation's own: a
// barrier that can never complete, and a launch stopped by Ctrl-C.
enum cudaError_t {
    cudaSuccess,
    cudaErrorInvalidValue,
    cudaErrorInvalidConfiguration,
    cudaErrorMisalignedAddress,
    cudaErrorMemoryAllocation,
    cudaErrorIllegalAddress,
    cudaErrorAssert,
    cudaErrorLaunchFailure,
    cudaErrorInitializationError,
    cudaErrorCpuDeadlock,
    cudaErrorCpuInterrupted,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
// As in CUDA, the last error is the calling host thread's. A launch's error may come with a message
// that says more than the error's name; cudaGetErrorString returns it for that error.
static thread_local cudaError_t cpu_last_error = cudaSuccess, cpu_detailed_error = cudaSuccess;
static thread_local std::string cpu_error_message;
inline cudaError_t cpu_set_error(cudaError_t err, const std::string& message = "") {
    cpu_detailed_error = message.empty() ? cudaSuccess : err;
    cpu_error_message = message;
    return cpu_last_error = err;
}
static std::map<const void*, size_t> cpu_shared_limit;  // per kernel, set by cudaFuncSetAttribute
static std::mutex cpu_shared_limit_mutex;               // host threads may set and launch at once

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
inline const char* cpu_error_name(cudaError_t err) {  // what the error says with no message of its own
    switch (err) {
        case cudaSuccess:
            return "no error";
        case cudaErrorInvalidValue:
            return "invalid argument";
        case cudaErrorMisalignedAddress:
            return "misaligned address";
        case cudaErrorMemoryAllocation:
            return "out of memory";
        case cudaErrorIllegalAddress:
            return "an illegal memory access was encountered";
        case cudaErrorAssert:
            return "device-side assert triggered";
        case cudaErrorLaunchFailure:
            return "unspecified launch failure";
        case cudaErrorInitializationError:
            return "initialization error";
        case cudaErrorCpuDeadlock:
            return "barrier deadlock";
        case cudaErrorCpuInterrupted:
            return "interrupted";
        default:
            return "invalid configuration argument";
    }
}
inline const char* cudaGetErrorString(cudaError_t err) {
    return err != cudaSuccess && err == cpu_detailed_error ? cpu_error_message.c_str() : cpu_error_name(err);
}
template <class Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute, int bytes) {
    if (bytes < 0 || size_t(bytes) > kMaxSharedBytes) return cpu_set_error(cudaErrorInvalidValue);
    std::lock_guard<std::mutex> lock(cpu_shared_limit_mutex);
    cpu_shared_limit[(const void*)kernel] = bytes;
    return cudaSuccess;
}
inline size_t max_shared_bytes(int) { return kMaxSharedBytes; }
inline cudaError_t cudaGetDevice(int* device) { return *device = 0, cudaSuccess; }  // one "device"
// A load through the read-only data cache: on the CPU, a load.
template <class T>
inline T __ldg(const T* p) {
    return *p;
}
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

// TMA's tensor map, as cuTensorMapEncodeTiled stores it in a CUtensorMap's opaque bytes.
namespace cpu_cuda {
struct TensorMap {
    uint64_t tag;  // kTensorMapTag: made by cuTensorMapEncodeTiled
    const unsigned char* address;
    uint64_t dims[5], strides[5];  // strides in bytes; strides[0] is the element's size
    uint16_t box[5];
    uint8_t element_strides[5], rank, swizzle, nan_fill;
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "a tensor map fits in 128 bytes");
constexpr uint64_t kTensorMapTag = 0x706d726f736e6574ull;  // "tensormp"
}  // namespace cpu_cuda

// The driver's checks, as its documentation states them, then the arguments kept in the map.
inline CUresult cuTensorMapEncodeTiled(CUtensorMap* tensorMap, CUtensorMapDataType tensorDataType,
                                       cuuint32_t tensorRank, void* globalAddress,
                                       const cuuint64_t* globalDim, const cuuint64_t* globalStrides,
                                       const cuuint32_t* boxDim, const cuuint32_t* elementStrides,
                                       CUtensorMapInterleave interleave, CUtensorMapSwizzle swizzle,
                                       CUtensorMapL2promotion l2Promotion, CUtensorMapFloatOOBfill oobFill) {
    static const uint8_t sizes[] = {1, 2, 4, 4, 8, 8, 2, 4, 8, 2};
    if (!tensorMap || unsigned(tensorDataType) >= sizeof sizes || tensorRank < 1 || tensorRank > 5 ||
        !globalAddress || reinterpret_cast<uintptr_t>(globalAddress) % 16 || !globalDim ||
        (tensorRank > 1 && !globalStrides) || !boxDim || !elementStrides ||
        interleave != CU_TENSOR_MAP_INTERLEAVE_NONE || unsigned(swizzle) > CU_TENSOR_MAP_SWIZZLE_128B ||
        unsigned(l2Promotion) > CU_TENSOR_MAP_L2_PROMOTION_L2_256B ||
        unsigned(oobFill) > CU_TENSOR_MAP_FLOAT_OOB_FILL_NAN_REQUEST_ZERO_FMA)
        return CUDA_ERROR_INVALID_VALUE;
    const bool floating = tensorDataType == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 ||
                          tensorDataType == CU_TENSOR_MAP_DATA_TYPE_FLOAT32 ||
                          tensorDataType == CU_TENSOR_MAP_DATA_TYPE_FLOAT64 ||
                          tensorDataType == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
    if (oobFill != CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE && !floating) return CUDA_ERROR_INVALID_VALUE;
    cpu_cuda::TensorMap m{};
    m.tag = cpu_cuda::kTensorMapTag, m.address = static_cast<const unsigned char*>(globalAddress);
    m.rank = uint8_t(tensorRank), m.swizzle = uint8_t(swizzle), m.nan_fill = oobFill != 0;
    m.strides[0] = sizes[tensorDataType];
    for (unsigned i = 0; i < tensorRank; ++i) {
        if (globalDim[i] == 0 || globalDim[i] > (uint64_t(1) << 32)) return CUDA_ERROR_INVALID_VALUE;
        if (i > 0 && (globalStrides[i - 1] % 16 || globalStrides[i - 1] >= (uint64_t(1) << 40)))
            return CUDA_ERROR_INVALID_VALUE;
        if (boxDim[i] == 0 || boxDim[i] > 256 || elementStrides[i] == 0 || elementStrides[i] > 8)
            return CUDA_ERROR_INVALID_VALUE;
        m.dims[i] = globalDim[i], m.box[i] = uint16_t(boxDim[i]),
        m.element_strides[i] = uint8_t(elementStrides[i]);
        if (i > 0) m.strides[i] = globalStrides[i - 1];
    }
    // The box's inner dimension: whole 16-byte chunks, and with a swizzle, no more than its span.
    const uint64_t inner = uint64_t(boxDim[0]) * m.strides[0];
    if (inner % 16 || (swizzle != CU_TENSOR_MAP_SWIZZLE_NONE && inner > (16u << swizzle)))
        return CUDA_ERROR_INVALID_VALUE;
    std::memset(tensorMap, 0, sizeof *tensorMap);
    std::memcpy(tensorMap, &m, sizeof m);
    return CUDA_SUCCESS;
}

// ------------------------------------------------------------------------------------------------
// Fibers: switching from one CUDA thread to another on one OS thread.

#if CPU_CUDA_ASM_SWITCH
// cpu_cuda_switch(&from, to): saves the registers that a function call must preserve (the
// callee-saved ones of the platform's ABI) on the current stack, stores the stack pointer in
// *from, loads `to` as the stack pointer and restores what was saved there, then returns, on the
// other stack, to wherever that fiber last called cpu_cuda_switch. A weak symbol, so that two
// files that include this header may be linked together; hidden, so that each library keeps its own.
extern "C" __attribute__((visibility("hidden"))) void cpu_cuda_switch(void** from, void* to);
#if defined(__APPLE__)
#define CPU_CUDA_SWITCH_BEGIN(align)                                 \
    ".text\n.p2align " #align                                        \
    "\n.globl _cpu_cuda_switch\n.weak_definition _cpu_cuda_switch\n" \
    ".private_extern _cpu_cuda_switch\n_cpu_cuda_switch:\n"
#define CPU_CUDA_SWITCH_END ""
#else
#define CPU_CUDA_SWITCH_BEGIN(align)                     \
    ".pushsection .text\n.p2align " #align               \
    "\n.weak cpu_cuda_switch\n.hidden cpu_cuda_switch\n" \
    ".type cpu_cuda_switch, %function\ncpu_cuda_switch:\n"
#define CPU_CUDA_SWITCH_END ".size cpu_cuda_switch, .-cpu_cuda_switch\n.popsection\n"
#endif
#if defined(__x86_64__)
// System V and macOS: rbx, rbp, r12-r15, and the control words of the SSE and x87 units (rounding
// modes: callee-saved too). 56 bytes, below the return address that the call pushed.
// clang-format off
asm(CPU_CUDA_SWITCH_BEGIN(4)
    "    pushq %rbp\n"
    "    pushq %rbx\n"
    "    pushq %r12\n"
    "    pushq %r13\n"
    "    pushq %r14\n"
    "    pushq %r15\n"
    "    subq $8, %rsp\n"
    "    stmxcsr (%rsp)\n"
    "    fnstcw 4(%rsp)\n"
    "    movq %rsp, (%rdi)\n"
    "    movq %rsi, %rsp\n"
    "    ldmxcsr (%rsp)\n"
    "    fldcw 4(%rsp)\n"
    "    addq $8, %rsp\n"
    "    popq %r15\n"
    "    popq %r14\n"
    "    popq %r13\n"
    "    popq %r12\n"
    "    popq %rbx\n"
    "    popq %rbp\n"
    "    ret\n" CPU_CUDA_SWITCH_END);
// clang-format on
#else
// AAPCS64 (Linux and macOS): x19-x28, the frame pointer x29, the link register x30 (where `ret`
// returns to), and the low halves of v8-v15 (d8-d15). 160 bytes. x18 is the platform's: untouched.
// clang-format off
asm(CPU_CUDA_SWITCH_BEGIN(2)
    "    sub sp, sp, #160\n"
    "    stp x19, x20, [sp, #0]\n"
    "    stp x21, x22, [sp, #16]\n"
    "    stp x23, x24, [sp, #32]\n"
    "    stp x25, x26, [sp, #48]\n"
    "    stp x27, x28, [sp, #64]\n"
    "    stp x29, x30, [sp, #80]\n"
    "    stp d8, d9, [sp, #96]\n"
    "    stp d10, d11, [sp, #112]\n"
    "    stp d12, d13, [sp, #128]\n"
    "    stp d14, d15, [sp, #144]\n"
    "    mov x9, sp\n"
    "    str x9, [x0]\n"
    "    mov sp, x1\n"
    "    ldp x19, x20, [sp, #0]\n"
    "    ldp x21, x22, [sp, #16]\n"
    "    ldp x23, x24, [sp, #32]\n"
    "    ldp x25, x26, [sp, #48]\n"
    "    ldp x27, x28, [sp, #64]\n"
    "    ldp x29, x30, [sp, #80]\n"
    "    ldp d8, d9, [sp, #96]\n"
    "    ldp d10, d11, [sp, #112]\n"
    "    ldp d12, d13, [sp, #128]\n"
    "    ldp d14, d15, [sp, #144]\n"
    "    add sp, sp, #160\n"
    "    ret\n" CPU_CUDA_SWITCH_END);
// clang-format on
#endif
#endif

namespace cpu_cuda {
namespace {

// A place to resume: a fiber's, or a worker's own (the OS thread's stack).
struct Context {
#if CPU_CUDA_ASM_SWITCH
    void* sp = nullptr;  // the stack pointer, with the saved registers on top

    // A context that starts `entry` (which must never return) on the stack [low, low + bytes): the
    // frame that cpu_cuda_switch restores, with `entry` as the address it returns to.
    void start(char* low, size_t bytes, void (*entry)()) {
        const uintptr_t top = (uintptr_t(low) + bytes) & ~uintptr_t(15);
#if defined(__x86_64__)
        // From the stack pointer up: the control words, the 6 registers (zero), `entry` (where
        // cpu_cuda_switch returns to) and a null return address for entry itself, which so starts
        // with the stack pointer 8 below a multiple of 16, as after a call.
        void** frame = reinterpret_cast<void**>(top - 9 * sizeof(void*));
        std::memset(frame, 0, 9 * sizeof(void*));
        unsigned mxcsr;
        unsigned short x87;
        asm volatile("stmxcsr %0" : "=m"(mxcsr));
        asm volatile("fnstcw %0" : "=m"(x87));
        std::memcpy(frame, &mxcsr, 4), std::memcpy(reinterpret_cast<char*>(frame) + 4, &x87, 2);
        frame[7] = reinterpret_cast<void*>(entry);
#else
        // x19-x30 and d8-d15; x29 = 0 ends the chain of frame records, x30 = entry.
        void** frame = reinterpret_cast<void**>(top - 160);
        std::memset(frame, 0, 160);
        frame[11] = reinterpret_cast<void*>(entry);
#endif
        sp = frame;
    }
#else
    ucontext_t context;

    void start(char* low, size_t bytes, void (*entry)()) {
        getcontext(&context);
        context.uc_stack.ss_sp = low, context.uc_stack.ss_size = bytes, context.uc_link = nullptr;
        makecontext(&context, entry, 0);
    }
#endif
};

inline void switch_context(Context& from, Context& to) {
#if CPU_CUDA_ASM_SWITCH
    cpu_cuda_switch(&from.sp, to.sp);
#else
    swapcontext(&from.context, &to.context);
#endif
}

// Where a thread waits: the operation, and the file and line of its call (default arguments
// __builtin_FILE() and __builtin_LINE() give the caller's).
struct Site {
    const char* what = nullptr;  // null: not waiting
    const char* file = "";
    int line = 0;
    unsigned detail = 0;   // an mbarrier wait's parity; a named barrier's id + 16 * its thread count
    unsigned barrier = 0;  // an mbarrier wait's barrier (its slot), for the message
};
constexpr const char *kMbarrierWait = "mbarrier wait", *kMbarrierPoll = "mbarrier_try_wait loop",
                     *kNamedBarrier = "named barrier";
inline bool is(const Site& site, const char* what) { return site.what && std::strcmp(site.what, what) == 0; }
inline bool same_site(const Site& a, const Site& b) {
    return a.line == b.line && a.detail == b.detail &&
           (a.what == b.what || std::strcmp(a.what, b.what) == 0) &&
           (a.file == b.file || std::strcmp(a.file, b.file) == 0);
}
// A source file as the messages name it: relative to the repository (the folder above this header's).
inline std::string short_path(const char* file) {
    const std::string here = __FILE__, path = file;
    const size_t slash = here.find_last_of('/');
    const size_t root =
        slash == std::string::npos || slash == 0 ? std::string::npos : here.find_last_of('/', slash - 1);
    if (root != std::string::npos && path.compare(0, root + 1, here, 0, root + 1) == 0)
        return path.substr(root + 1);
    return path;
}
inline std::string where(const Site& site) { return short_path(site.file) + ":" + std::to_string(site.line); }
// A wait as the messages name it: "mbarrier wait (parity 1)", "named barrier 1 (256 threads)".
inline std::string describe(const Site& site) {
    if (is(site, kMbarrierWait) || is(site, kMbarrierPoll))
        return site.what + std::string(" (parity ") + std::to_string(site.detail) + ")";
    if (is(site, kNamedBarrier))
        return "named barrier " + std::to_string(site.detail % 16) + " (" + std::to_string(site.detail / 16) +
               " threads)";
    return site.what;
}

// cp.async: a thread's copies land when it waits for their group, not before. On a GPU a copy lands
// at any moment between the two, so here its destination holds NaN in the meantime: a kernel that
// reads a tile before cp_async_wait (or without the __syncthreads after it) reads NaN, and so does
// one that starts a copy into a buffer that another thread has still to read (a missing
// __syncthreads before the copy). Copies never waited for fail the launch, and so does a copy
// whose addresses are not multiples of its size, as on a GPU.
struct AsyncCopy {
    void* to;
    size_t size;              // 16 or 4 bytes
    unsigned char bytes[16];  // the source, read at issue: kernels copy from inputs nobody writes
    void land() const { std::memcpy(to, bytes, size); }
};
// A thread's asynchronous requests (cp.async copies, bulk reduces) in commit groups: a commit makes
// those issued since the last one a group; wait(n) lands all groups but the newest n, oldest first.
// Requests issued and not committed belong to no group yet: no wait lands them.
template <class Request>
struct AsyncGroups {
    std::vector<Request> requests;   // issued and not landed, oldest first
    std::vector<size_t> group_ends;  // per committed group, oldest first: the end of its requests

    void commit() { group_ends.push_back(requests.size()); }
    void wait(size_t newest_left) {
        if (group_ends.size() <= newest_left) return;
        const size_t groups = group_ends.size() - newest_left, end = group_ends[groups - 1];
        for (size_t i = 0; i < end; ++i) requests[i].land();
        requests.erase(requests.begin(), requests.begin() + end);
        group_ends.erase(group_ends.begin(), group_ends.begin() + groups);
        for (size_t& e : group_ends) e -= end;
    }
    void land_all() {
        for (const Request& r : requests) r.land();
        clear();
    }
    void clear() { requests.clear(), group_ends.clear(); }
};

// The copy engine's bulk reduce (kernels/hopper.cuh's bulk_reduce_add): fp32 from shared memory added
// into global memory. The hardware may read the source at any moment until the bulk_wait_read that
// retires the request's group (only then may the kernel overwrite it), so here it is read then, at
// the latest: a kernel that writes the source again too early adds the new values, and shows it.
// The adds land at the same moment, one atomicAdd per element: blocks on other cores add into the
// same floats (the backward's dQ). Global memory is not poisoned meanwhile: other blocks read and add
// to it, and on a GPU it holds the sum so far, with or without this request's part.
struct BulkReduce {
    float* to;
    const float* from;
    unsigned count;  // floats
    void land() const {
        for (unsigned i = 0; i < count; ++i) atomicAdd(to + i, from[i]);
    }
};

// wgmma (kernels/hopper.cuh) is asynchronous: the warpgroup's product is computed at issue, from
// shared memory and registers as they are then, but it lands in a thread's accumulators only at the
// wgmma_wait that retires its commit group; until then they hold NaN, so a kernel that reads them too
// early (or writes them: the result overwrites) shows it. A wgmma that accumulates onto one still in
// flight takes that one's result, as the hardware chains them.
constexpr unsigned kMaxWgmmaN = 256;
struct WgmmaResult {
    float* d;                      // the thread's accumulators, N / 2 floats
    unsigned count;                // N / 2
    unsigned long long group;      // the commit group it belongs to: commits before its issue
    float values[kMaxWgmmaN / 2];  // what lands
};
struct Wgmmas {
    std::vector<WgmmaResult> pending;  // oldest first; at most one per accumulator array
    unsigned long long committed = 0;  // wgmma_commit calls so far

    WgmmaResult* find(const float* d) {
        for (WgmmaResult& r : pending)
            if (r.d == d) return &r;
        return nullptr;
    }
    void wait(unsigned long long newest_left) {  // the groups but the newest `newest_left` land
        size_t kept = 0;
        for (WgmmaResult& r : pending) {
            if (r.group + newest_left < committed)
                std::memcpy(r.d, r.values, r.count * sizeof(float));
            else
                pending[kept++] = r;
        }
        pending.resize(kept);
    }
    void clear() { pending.clear(), committed = 0; }
};

// One CUDA thread: a stack of its own (kept for the next block and the next launch), and what it
// is doing.
constexpr size_t kStackBytes = 128 * 1024;  // a kernel's locals take a few KB
struct Fiber {
    Context context;
    char* mapping = nullptr;  // the stack, and a guard page below it that faults on an overflow
    size_t mapped = 0;
    dim3 index;       // its threadIdx
    unsigned id = 0;  // threadIdx as one number, x fastest: lanes 32w .. 32w + 31 are warp w
    bool exited = false;
    Site waiting;                     // where it waits: what is null while it runs or is ready to
    Site polled;                      // where it last polled an mbarrier (mbarrier_try_wait), and failed
    AsyncGroups<AsyncCopy> copies;    // its cp.async copies in flight
    AsyncGroups<BulkReduce> reduces;  // its bulk reduces not yet read
    Wgmmas wgmmas;                    // its wgmma results in flight

    bool allocate() {
        const size_t page = size_t(sysconf(_SC_PAGESIZE));
        mapped = kStackBytes + page;
        void* p = mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANON, -1, 0);
        if (p == MAP_FAILED) return mapping = nullptr, false;
        mapping = static_cast<char*>(p);
        mprotect(mapping, page, PROT_NONE);
        return true;
    }
    char* stack() const { return mapping + (mapped - kStackBytes); }
    ~Fiber() {
        if (mapping) munmap(mapping, mapped);
    }
};

// Where the threads of a collective meet (the block's at __syncthreads, a warp's 32, a warpgroup's
// 128): how many have arrived, and at which operation, the same call site (a thread arriving at
// another one, or one that exited, means it can never complete: the worker finds that no thread can
// run, and reports it).
struct Meeting {
    unsigned arrived = 0, generation = 0;  // generation % 2: the half of a warp's buffers in use
    Site site;
    bool diverged = false;
};

// A warp's meeting point for its collectives, and their values. Each buffer is double: the lanes of
// collective k + 1 write the other half while slow lanes still read collective k's results, and
// none can reach k + 2 before all have read k's (all must arrive at k + 1 first).
struct Warp : Meeting {
    float value[2][32];  // a shuffle's values
    struct Mma {
        unsigned a[32][4], b[32][2];  // the lanes' fragments
        float c[32][4];
        float d[16][8];  // the result tile, computed once by the last lane to arrive
    } mma[2];
    const void* rows[2][32];          // an ldmatrix's row addresses,
    unsigned fragments[2][32][4];     // and what each lane gets: read by the last lane to arrive
};

// A 16-bit value as a float, in the templates that take either type.
inline float to_float(__nv_bfloat16 h) { return __bfloat162float(h); }
inline float to_float(__half h) { return __half2float(h); }

// A wgmma operand in shared memory, as its 64-bit descriptor gives it (PTX ISA, "Matrix Descriptor
// Format": start address, LBO, SBO, each / 16, base offset, swizzle mode) and where its 16-bit
// values are, in the canonical layouts (PTX ISA, "Shared Memory Matrix Layout"; in CuTe's terms, T = 8
// values to 16 bytes):
//   K-major, swizzle span S (128, 64, 32 bytes): ((8, m), (T, 2)) : ((S / 16 T, SBO), (1, T)):
//     row r at (r % 8) S + (r / 8) SBO, its 16 values of K side by side; LBO is not used.
//   K-major, no swizzle: ((8, m), (T, 2)) : ((T, SBO), (1, LBO)): 8 x 8 cores of 16-byte rows.
//   MN-major, span S: ((T, S / 16, m), (8, k)) : ((1, T, LBO), (S / 16 T, SBO)): S bytes of MN side
//     by side, the next S bytes LBO further; row k at (k % 8) S + (k / 8) SBO.
//   MN-major, no swizzle: ((T, 1, m), (8, k)) : ((1, T, SBO), (T, LBO)).
// and then the swizzle, on the address: bits 4-6 XOR bits 7-9 (128), 4-5 with 7-8 (64), 4 with 7 (32).
struct SmemMatrix {
    unsigned start, lbo, sbo, span, base_offset;
    explicit SmemMatrix(uint64_t desc)
        : start(unsigned(desc & 0x3fff) << 4),
          lbo(unsigned(desc >> 16 & 0x3fff) << 4),
          sbo(unsigned(desc >> 32 & 0x3fff) << 4),
          span(desc >> 62 == 0 ? 0 : 256u >> (desc >> 62)),
          base_offset(unsigned(desc >> 49 & 7)) {}
    unsigned swizzled(unsigned address) const {
        return span ? address ^ (address >> 3 & (span - 16)) : address;
    }
    unsigned k_major(unsigned r, unsigned k) const {  // element (r, k), r along M or N
        if (span) return swizzled(start + r % 8 * span + r / 8 * sbo + 2 * k);
        return start + r % 8 * 16 + r / 8 * sbo + k % 8 * 2 + k / 8 * lbo;
    }
    unsigned mn_major(unsigned k, unsigned n) const {  // element (k, n), n along M or N
        if (span)
            return swizzled(start + n % (span / 2) * 2 + n / (span / 2) * lbo + k % 8 * span + k / 8 * sbo);
        return start + n % 8 * 2 + n / 8 * sbo + k % 8 * 16 + k / 8 * lbo;
    }
};

// A warpgroup's meeting point (wgmma, setmaxnreg): what each thread hands in to a wgmma. The last to
// arrive computes for all 128 and gives each its result before any goes on, so one buffer does.
struct WarpGroup : Meeting {
    struct Operands {
        float* d;           // the thread's accumulators
        const float* c;     // what it accumulates onto: d, or the result in flight into d
        const unsigned* a;  // its A registers (wgmma_rs)
        uint64_t a_desc, b_desc;
        bool accumulate, a_mn_major, b_mn_major;
    } operands[128];
};

// An mbarrier (kernels/hopper.cuh): its state is the worker's, found through its slot, which
// mbarrier_init writes into the barrier's 8 bytes with a tag (a kernel never reads them itself; an
// operation on 8 bytes without the tag, never initialized or since overwritten, fails the launch).
// A phase completes when its arrivals have all arrived and the bytes announced by expect_tx have all
// landed: the phase count goes up and the arrivals are expected anew. A TMA copy counts its bytes on a
// barrier when it lands, and it lands when a thread waits on that barrier (until then its
// destination holds NaN, as a cp.async's does): so a kernel that reads a tile without waiting reads NaN.
constexpr uint64_t kMbarrierTag = 0x6d62617200000000ull;  // "mbar" in the upper half, the slot below
struct TmaCopy {
    unsigned char* to;
    std::vector<unsigned char> bytes;  // the box, read at issue and swizzled as it will land
};
struct Mbarrier {
    const void* address;
    unsigned expected, pending;   // arrivals per phase, and still to come in this one
    unsigned phase;               // phases completed: the current phase's parity is phase % 2
    long long bytes;              // announced by expect_tx and not landed (landed first: negative)
    std::vector<TmaCopy> copies;  // issued on it and not landed
    std::vector<Fiber*> waiters;  // woken at every change of its state, to look again
};

// A named barrier (bar.sync / bar.arrive): `threads` arrivals complete it.
struct NamedBarrier {
    unsigned arrived = 0, threads = 0;
    std::vector<Fiber*> waiters;
};

constexpr double kAnnounceAfterSeconds = 2.0;

// One launch: what the workers share.
struct Launch {
    const void* kernel_address;
    const char* kernel_text;  // the kernel as LAUNCH was given it
    std::string kernel;       // its name, for the messages
    dim3 grid, block;
    unsigned threads = 0;
    unsigned long long blocks = 0;
    size_t shared_bytes = 0;
    void (*body)(const void*) = nullptr;  // runs the kernel with the launch's arguments, as the
    const void* arguments = nullptr;      // thread whose threadIdx is set
    std::atomic<unsigned long long> next_block{0}, blocks_done{0};
    std::atomic<bool> failed{false};
    std::mutex mutex;  // guards the first failure's error and message
    cudaError_t error = cudaSuccess;
    std::string message;
    std::chrono::steady_clock::time_point start;
    std::atomic<bool> announced{false};
    unsigned long long interrupts_seen = 0;  // `interrupts` when the launch was called

    void fail(cudaError_t err, const std::string& why) {
        std::lock_guard<std::mutex> lock(mutex);
        if (error == cudaSuccess) error = err, message = why;
        failed = true;
    }
    std::string block_name(const dim3& b) const {
        return kernel + ", block (" + std::to_string(b.x) + ", " + std::to_string(b.y) + ", " +
               std::to_string(b.z) + ")";
    }

    // After a few seconds, one line on stderr: what runs, and for about how long still, from the
    // blocks done so far. Called by the workers between blocks and every so many switches.
    void tick() {
        if (announced.load(std::memory_order_relaxed)) return;
        const double elapsed =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (elapsed < kAnnounceAfterSeconds || announced.exchange(true)) return;
        const unsigned long long done = blocks_done.load();
        char estimate[64];
        if (done == 0) {
            std::snprintf(estimate, sizeof estimate, "no block done after %.0f s", elapsed);
        } else {
            const double left = elapsed * double(blocks - done) / double(done);
            if (left < 1.0) return;  // nearly done: nothing worth saying
            if (left < 120)
                std::snprintf(estimate, sizeof estimate, "about %.0f s left", left);
            else
                std::snprintf(estimate, sizeof estimate, "about %.0f min left", left / 60);
        }
        std::fprintf(stderr,
                     "minimal_flash: CPU emulation of %s, %llu block%s of %u threads: %s (Ctrl-C stops it)\n",
                     kernel.c_str(), blocks, blocks == 1 ? "" : "s", threads, estimate);
        std::fflush(stderr);
    }
};

// Ctrl-C: SIGINT adds 1 to this count (see on_sigint below), and a launch stops once the count differs
// from what it was when the launch was called (Launch::interrupts_seen): its fibers look at every
// switch, its workers between blocks; the launch then abandons its blocks and fails with "interrupted".
std::atomic<unsigned long long> interrupts{0};

// Threads as ranges: "0-63, 96-127".
inline std::string ranges(const std::vector<unsigned>& ids) {
    std::string text;
    for (size_t i = 0; i < ids.size();) {
        size_t j = i;
        while (j + 1 < ids.size() && ids[j + 1] == ids[j] + 1) ++j;
        text +=
            (text.empty() ? "" : ", ") + std::to_string(ids[i]) + (j > i ? "-" + std::to_string(ids[j]) : "");
        i = j + 1;
    }
    return text;
}

void fiber_main();

// A worker: runs blocks, one at a time, their threads as fibers on its OS thread.
// Aligned to a cache line: workers run on different cores, and the fields one of them changes at
// every switch must not share a line with another's.
struct alignas(64) Worker {
    std::vector<std::unique_ptr<Fiber>> fibers;  // as many as the largest block so far
    Context home;                                // the worker's own: where a block starts and ends
    Fiber* current = nullptr;
    std::vector<Fiber*> ready;  // a ring of the fibers that may run, in the order they will
    unsigned ready_head = 0, ready_count = 0;
    unsigned threads = 0, exited = 0;
    unsigned switches_until_tick = 0;
    Meeting barrier;  // the block's, __syncthreads
    std::vector<Warp> warps;
    std::vector<WarpGroup> warpgroups;
    std::vector<Mbarrier> mbarriers;  // by slot, in the order of their mbarrier_init
    NamedBarrier named[16];
    std::vector<unsigned> registers_held;  // per warpgroup, its threads' registers (setmaxnreg)
    int registers_free = 0;                // given back by setmaxnreg.dec and not taken since
    Site registers_short{};                // the first setmaxnreg that took more than had been given back
    std::vector<float> wgmma_scratch;  // A, B and D of the wgmma being computed
    Launch* launch = nullptr;
    unsigned failed_polls = 0;  // mbarrier_try_wait polls that failed one after another (see there)
    bool polling = false;       // the fiber that switches away polls
    // For the fault handler (on_fault below), which finds the worker of the thread that faults by these.
    pthread_t os_thread{};
    std::atomic<bool> active{false};
    dim3 block;  // blockIdx of the block it runs

    // How a thread waits, for anything: it notes where in its `waiting`, and calls switch_away();
    // whoever completes what it waits for (the last thread at a barrier, the last lane of a warp
    // collective, an mbarrier's completed phase, a named barrier's last arrival) calls make_ready on
    // it. The deadlock message below names what waits; a new kind of wait adds its case there.
    bool stop_requested() const {
        return interrupts.load(std::memory_order_relaxed) != launch->interrupts_seen ||
               launch->failed.load(std::memory_order_relaxed);
    }
    void make_ready(Fiber* f) {  // to run after those ready now
        f->waiting.what = nullptr;
        unsigned slot = ready_head + ready_count++;
        ready[slot < threads ? slot : slot - threads] = f;
    }
    void make_ready_first(Fiber* f) {  // to run before those ready now
        f->waiting.what = nullptr;
        ready_head = ready_head == 0 ? threads - 1 : ready_head - 1, ++ready_count;
        ready[ready_head] = f;
    }
    Fiber* next_ready() {
        if (ready_count == 0) return nullptr;
        Fiber* f = ready[ready_head];
        if (++ready_head == threads) ready_head = 0;
        --ready_count;
        return f;
    }

    // The current fiber cannot go on (it waits, or has exited): run the next one that can. Returns
    // when another fiber has made this one ready again and switched back to it. With none ready,
    // the block is over (every thread exited, or none can ever go on) and control goes home; so it
    // does when the launch is stopped. A fiber left that way is never resumed: the next block
    // starts every fiber afresh.
    void switch_away() {
        Fiber* self = current;
        if (!polling) failed_polls = 0;  // something other than a failed poll happened
        polling = false;
        if (--switches_until_tick == 0) switches_until_tick = 4096, launch->tick();
        Fiber* next = stop_requested() ? nullptr : next_ready();
        if (!next) {
            switch_context(self->context, home);
            std::abort();  // not reached: home never resumes a fiber it has left
        }
        current = next;
        threadIdx = next->index;
        switch_context(self->context, next->context);
    }

    // A thread that polls memory another block writes (wait_until_equal): it lets the block's other
    // threads run first; with none ready, what it waits for is another block's, on another core (or
    // done: blocks start in order), and the OS thread yields.
    // (A spin-wait on memory that a thread of the same block writes, with no wait or collective in
    // its loop, never lets that thread run: the emulation runs a block's threads one at a time, and
    // only at a wait does another one run; on a GPU, sm_70 and later, the other warp runs anyway. Such
    // a spin can only be stopped by a second Ctrl-C, which ends the process: see on_sigint.)
    void yield_turn() {
        if (stop_requested()) abandon_block();
        if (ready_count == 0) {
            if (--switches_until_tick == 0) switches_until_tick = 4096, launch->tick();
            return std::this_thread::yield();
        }
        make_ready(current);
        switch_away();
    }

    // The launch fails here: the block is abandoned at once.
    [[noreturn]] void abandon_block() {
        switch_context(current->context, home);
        std::abort();
    }

    // The current thread arrives at a meeting of `size` threads. Not the last: it waits there, and
    // false is returned once it has been released. The last: true, and it releases the others.
    bool last_to_arrive(Meeting& meeting, unsigned size, const Site& site) {
        if (meeting.arrived == 0)
            meeting.site = site, meeting.diverged = false;
        else if (!same_site(site, meeting.site))
            meeting.diverged = true;
        if (++meeting.arrived < size || meeting.diverged) {
            current->waiting = site;
            switch_away();
            return false;
        }
        meeting.arrived = 0;
        return true;
    }

    void sync_threads(const Site& site) {
        if (!last_to_arrive(barrier, threads, site)) return;
        ascending = !ascending;  // all are here: this one goes on, and the others after it, in turn
        make_block_ready(current);
    }

    // The block's threads (but `running`, which goes on) ready to run, in thread order or reversed.
    // The order turns at every barrier (the last to arrive goes on first) and at every block's
    // start. So a missing barrier shows whichever way the data flows: a thread that reads a word
    // that a later thread writes reads it too early in one order, and one that reads what an
    // earlier thread writes, in the other.
    bool ascending = true;
    void make_block_ready(const Fiber* running) {
        for (unsigned i = 0; i < threads; ++i) {
            Fiber* f = fibers[ascending ? i : threads - 1 - i].get();
            if (f != running) make_ready(f);
        }
    }

    // The launch fails with a message about the operation at `site`.
    [[noreturn]] void fail(const Site& site, const std::string& why,
                           cudaError_t err = cudaErrorInvalidValue) {
        launch->fail(err, std::string(cpu_error_name(err)) + ": " + site.what + " at " + where(site) + " in " +
                              thread_name() + ": " + why);
        abandon_block();
    }
    std::string thread_name() const {
        return launch->block_name(blockIdx) + ", thread " + std::to_string(current->id);
    }

    // The calling lane's warp; warp collectives only in blocks of whole warps.
    Warp& warp_of_current(unsigned& lane, const Site& site) {
        if (threads % 32 != 0) {
            launch->fail(cudaErrorInvalidValue,
                         "invalid argument: " + std::string(site.what) + " at " + where(site) + " in " +
                             launch->kernel + ", a block of " + std::to_string(threads) +
                             " threads: the emulation runs warp-collective operations in whole warps only");
            abandon_block();
        }
        lane = current->id % 32;
        return warps[current->id / 32];
    }
    // The calling thread's warpgroup (threads 128w .. 128w + 127), in blocks of whole warpgroups.
    WarpGroup& warpgroup_of_current(unsigned& index, const Site& site) {
        if (threads % 128 != 0)
            fail(site, "a block of " + std::to_string(threads) +
                           " threads: warpgroup operations take blocks of whole warpgroups (128 threads)");
        index = current->id % 128;
        return warpgroups[current->id / 128];
    }

    // A warp collective: the lane has put its values into half generation % 2 of the warp's
    // buffers. The last of the 32 lanes to arrive runs `complete` (what the warp computes together)
    // and releases the others; each then reads its result from the same half. The released lanes
    // run next, before other warps: a warp goes on as far as it can, to the next __syncthreads,
    // before the next warp starts. So warps drift as far apart as a GPU lets them, and a missing
    // barrier between warps (one warp overwriting what another has still to read) shows.
    // A warpgroup's collectives meet the same way, 128 threads.
    template <class Complete>
    void sync_warp(Warp& warp, const Site& site, Complete&& complete) {
        meet(warp, 32, site, complete);
    }
    template <class Complete>
    void meet(Meeting& meeting, unsigned size, const Site& site, Complete&& complete) {
        if (!last_to_arrive(meeting, size, site)) return;
        Fiber* self = current;
        ++meeting.generation;
        complete();
        const unsigned first = self->id / size * size;
        for (unsigned l = first + size; l-- > first;)  // so that they run in thread order
            if (fibers[l].get() != self) make_ready_first(fibers[l].get());
    }

    // ---- mbarrier (see Mbarrier above)
    unsigned mbarrier_offset(const void* bar) const {
        return unsigned(static_cast<const char*>(bar) - reinterpret_cast<const char*>(smem));
    }
    void mbarrier_init(uint64_t* bar, unsigned arrivals, const Site& site) {
        const size_t offset = size_t(reinterpret_cast<char*>(bar) - reinterpret_cast<char*>(smem));
        if (offset % 8 || offset + 8 > launch->shared_bytes)
            fail(site,
                 "an mbarrier must be 8 bytes of the block's dynamic shared memory (extern __shared__ "
                 "smem[]), 8-byte aligned (the emulation gives static __shared__ variables no shared memory)");
        if (arrivals == 0 || arrivals >= (1u << 20))
            fail(site, "an mbarrier's arrival count is 1 to 2^20 - 1");
        unsigned slot = unsigned(mbarriers.size());
        if ((*bar >> 32) == (kMbarrierTag >> 32) && unsigned(*bar) < mbarriers.size() &&
            mbarriers[unsigned(*bar)].address == bar)
            slot = unsigned(*bar);  // initialized again: the same slot, afresh
        else
            mbarriers.emplace_back();
        Mbarrier& b = mbarriers[slot];
        b.address = bar, b.expected = b.pending = arrivals, b.phase = 0, b.bytes = 0;
        b.copies.clear(), b.waiters.clear();
        *bar = kMbarrierTag | slot;
    }
    unsigned mbarrier_slot(const uint64_t* bar, const Site& site) {
        const size_t offset =
            size_t(reinterpret_cast<const char*>(bar) - reinterpret_cast<const char*>(smem));
        if (offset % 8 || offset + 8 > launch->shared_bytes)
            fail(site, "the mbarrier is not 8 aligned bytes of the block's shared memory");
        const unsigned slot = unsigned(*bar);
        if ((*bar >> 32) != (kMbarrierTag >> 32) || slot >= mbarriers.size() ||
            mbarriers[slot].address != bar)
            fail(site, "the mbarrier at shared memory byte " + std::to_string(offset) +
                           " was never initialized (mbarrier_init), or its 8 bytes were overwritten since");
        return slot;
    }
    // After any change: the phase completes if it is due, and the waiters look again.
    void mbarrier_changed(Mbarrier& b) {
        failed_polls = 0;
        if (b.pending == 0 && b.bytes == 0) ++b.phase, b.pending = b.expected;
        for (Fiber* f : b.waiters) make_ready(f);
        b.waiters.clear();
    }
    void mbarrier_arrive(uint64_t* bar, unsigned bytes, const Site& site) {
        Mbarrier& b = mbarriers[mbarrier_slot(bar, site)];
        if (b.pending == 0)
            fail(site, "more arrivals on the mbarrier than its count (" + std::to_string(b.expected) +
                           ") in one phase");
        b.bytes += bytes, --b.pending;
        mbarrier_changed(b);
    }
    // The copies on the barrier land, in the order they were issued.
    void mbarrier_land(Mbarrier& b) {
        for (TmaCopy& copy : b.copies) {
            std::memcpy(copy.to, copy.bytes.data(), copy.bytes.size());
            b.bytes -= (long long)copy.bytes.size();
        }
        b.copies.clear();
        mbarrier_changed(b);
    }
    // Whether the phase of this parity has completed (the current phase's parity is the other one);
    // if not, the copies in flight land first.
    bool mbarrier_done(unsigned slot, unsigned parity) {
        Mbarrier& b = mbarriers[slot];
        if (b.phase % 2 != parity % 2) return true;
        if (b.copies.empty()) return false;
        mbarrier_land(b);
        return b.phase % 2 != parity % 2;
    }
    void mbarrier_wait(uint64_t* bar, unsigned parity, Site site) {
        const unsigned slot = mbarrier_slot(bar, site);
        site.detail = parity % 2, site.barrier = slot;
        while (!mbarrier_done(slot, parity)) {
            current->waiting = site;
            mbarriers[slot].waiters.push_back(current);
            switch_away();
        }
    }
    // A thread that polls lets the others run between its polls: try_wait in a loop still completes.
    // One that can never succeed is a deadlock too: when the threads that can run have all polled, one
    // after another, two rounds over, and failed, with nothing else done in between (no other switch,
    // no wake-up, no change of a barrier), none is left that could change a barrier, and none ever will.
    bool mbarrier_try_wait(uint64_t* bar, unsigned parity, Site site) {
        const unsigned slot = mbarrier_slot(bar, site);
        if (mbarrier_done(slot, parity)) return true;
        site.what = kMbarrierPoll, site.detail = parity % 2, site.barrier = slot;
        current->polled = site;
        const unsigned polls = failed_polls + 1;
        if (polls > 2 * threads) {  // the ready ring (at most `threads`) went round twice: all poll
            for (unsigned i = 0; i < ready_count; ++i) {
                Fiber* f = ready[(ready_head + i) % threads];
                f->waiting = f->polled;
            }
            current->waiting = site;
            launch->fail(cudaErrorCpuDeadlock, deadlock_message());
            abandon_block();
        }
        make_ready(current);
        failed_polls = polls, polling = true;
        switch_away();
        return false;
    }

    // ---- TMA: the box at `start` (x innermost, then y, z and, at rank 4, w) of a tensor map of rank
    // `rank`, read now, lands at a wait on `bar`.
    void tma_load(void* to, const CUtensorMap* map, int rank, const long long* start, uint64_t* bar,
                  const Site& site) {
        TensorMap m;
        std::memcpy(&m, map, sizeof m);
        if (m.tag != kTensorMapTag) fail(site, "the tensor map was not made by cuTensorMapEncodeTiled");
        if (m.rank != rank)
            fail(site, "tma_load with " + std::to_string(rank) + " coordinates takes a tensor map of rank " +
                           std::to_string(rank) + "; this one has rank " + std::to_string(m.rank));
        const size_t offset = size_t(static_cast<char*>(to) - reinterpret_cast<char*>(smem));
        const size_t align = m.swizzle == CU_TENSOR_MAP_SWIZZLE_128B ? 1024 : 128;
        unsigned n[4] = {1, 1, 1, 1};  // the elements the box holds per dimension
        for (int i = 0; i < rank; ++i) n[i] = (m.box[i] + m.element_strides[i] - 1) / m.element_strides[i];
        const size_t size = m.strides[0], bytes = size_t(n[0]) * n[1] * n[2] * n[3] * size;
        if (offset % align)
            fail(site,
                 "a TMA destination must be " + std::to_string(align) + "-byte aligned" +
                     (align == 1024 ? " with the 128-byte swizzle" : "") +
                     "; this one is at shared memory byte " + std::to_string(offset),
                 cudaErrorMisalignedAddress);
        if (offset + bytes > launch->shared_bytes)
            fail(site, "the box of " + std::to_string(bytes) + " bytes at shared memory byte " +
                           std::to_string(offset) + " ends past the block's " +
                           std::to_string(launch->shared_bytes) + " bytes of shared memory");
        Mbarrier& b = mbarriers[mbarrier_slot(bar, site)];
        // The swizzle permutes the 16-byte chunks of each 128-byte row (of 32B and 64B spans: of 2 and
        // 4 chunks), XORing address bits 4-6 with bits 7-9 (4-5 with 7-8; 4 with 7).
        const size_t swizzle = m.swizzle ? ((size_t(1) << (m.swizzle)) - 1) << 4 : 0;
        TmaCopy copy{static_cast<unsigned char*>(to), std::vector<unsigned char>(bytes)};
        unsigned char fill[8];
        std::memset(fill, 0, sizeof fill);
        if (m.nan_fill) {  // the type's quiet NaN, all ones but the sign: reads as NaN in any float type
            std::memset(fill, 0xff, sizeof fill);
            fill[size - 1] = 0x7f;
        }
        // Element e of the box, x fastest: inside the tensor, it is read from the sum over the
        // dimensions of coordinate times stride (in bytes, in any order: a permuted layout is one
        // more tensor map); outside, it is the fill.
        for (size_t e = 0, o = 0; o < bytes; ++e, o += size) {
            bool inside = true;
            long long from = 0;
            size_t rest = e;  // e's index along dimension i: rest % n[i], after the dimensions before
            for (int i = 0; i < rank; rest /= n[i], ++i) {
                const long long c = start[i] + (long long)(rest % n[i]) * m.element_strides[i];
                inside = inside && c >= 0 && uint64_t(c) < m.dims[i];
                from += c * (long long)m.strides[i];
            }
            const size_t at = (offset + o) ^ ((offset + o) >> 3 & swizzle);
            std::memcpy(&copy.bytes[at - offset], inside ? m.address + from : fill, size);
        }
        std::memset(to, kPoison, bytes);  // in flight: neither the old data nor the new
        b.copies.push_back(std::move(copy));
        mbarrier_changed(b);  // a thread waiting on it lands it
    }

    // ---- bulk copy: `bytes` contiguous bytes of global memory, read now, land at `to` at a wait on
    // `bar`, as a TMA box does (checked at issue as the hardware requires).
    void bulk_load(void* to, const void* from, unsigned bytes, uint64_t* bar, const Site& site) {
        const size_t offset = size_t(static_cast<char*>(to) - reinterpret_cast<char*>(smem));
        if (bytes % 16)
            fail(site, "the size of a bulk copy is a multiple of 16 bytes; this one is " + std::to_string(bytes));
        if (offset % 16 || reinterpret_cast<uintptr_t>(from) % 16)
            fail(site,
                 "a bulk copy's addresses must be 16-byte aligned; this one copies to shared memory byte " +
                     std::to_string(offset),
                 cudaErrorMisalignedAddress);
        if (offset + bytes > launch->shared_bytes)
            fail(site, "the bulk copy of " + std::to_string(bytes) + " bytes to shared memory byte " +
                           std::to_string(offset) + " ends past the block's " +
                           std::to_string(launch->shared_bytes) + " bytes of shared memory");
        Mbarrier& b = mbarriers[mbarrier_slot(bar, site)];
        const unsigned char* source = static_cast<const unsigned char*>(from);
        b.copies.push_back(TmaCopy{static_cast<unsigned char*>(to), std::vector<unsigned char>(source, source + bytes)});
        std::memset(to, kPoison, bytes);  // in flight: neither the old data nor the new
        mbarrier_changed(b);
    }

    // ---- bulk reduce (see BulkReduce above): checked at issue as the hardware requires, read and added
    // at the bulk_wait_read that retires its group.
    void bulk_reduce_add(float* to, const float* from, unsigned bytes, const Site& site) {
        const char* shared = reinterpret_cast<const char*>(smem);
        const char *source = reinterpret_cast<const char*>(from), *destination = reinterpret_cast<char*>(to);
        if (bytes % 16)
            fail(site,
                 "the size of a bulk reduce is a multiple of 16 bytes; this one is " + std::to_string(bytes));
        if (reinterpret_cast<uintptr_t>(to) % 16 || reinterpret_cast<uintptr_t>(from) % 16) {
            char addresses[96];
            std::snprintf(addresses, sizeof addresses, "%p to %p", static_cast<const void*>(from),
                          static_cast<void*>(to));
            fail(site,
                 std::string("a bulk reduce's addresses must be 16-byte aligned; this one adds from ") +
                     addresses,
                 cudaErrorMisalignedAddress);
        }
        if (source < shared || size_t(source - shared) + bytes > launch->shared_bytes)
            fail(site, "the source of a bulk reduce must be the block's shared memory (" +
                           std::to_string(launch->shared_bytes) + " bytes); these " + std::to_string(bytes) +
                           " bytes are not");
        if (destination + bytes > shared && destination < shared + sizeof smem)
            fail(site, "the destination of a bulk reduce must be global memory, not shared memory");
        current->reduces.requests.push_back({to, from, bytes / 4});
    }

    // ---- setmaxnreg's register count. A kernel that uses setmaxnreg is compiled to the most registers
    // its __launch_bounds__ allow: with one block per multiprocessor, the 64K registers over the block's
    // threads, in steps of 8, at most 256 each. A warpgroup's setmaxnreg.dec gives registers back to the
    // block; a setmaxnreg.inc takes them from there, waiting on a GPU until enough have been given back.
    // Here the count may go below 0 for a while (an inc before the dec it waits for); at the block's
    // end it must not be: the increase would have waited for good (run_block fails the launch).
    static unsigned launch_registers(unsigned threads) { return std::min(256u, 65536u / threads / 8 * 8); }
    void set_registers(unsigned group, int count, const Site& site) {
        registers_free += (int(registers_held[group]) - count) * 128;
        registers_held[group] = unsigned(count);
        if (registers_free < 0 && !registers_short.what) registers_short = site;
    }
    std::string registers_message() const {
        return launch->block_name(blockIdx) + ": the " + describe(registers_short) + " at " + where(registers_short) +
               " would wait for good on a GPU: the block's warpgroups ask for " + std::to_string(-registers_free) +
               " registers more than its " + std::to_string(threads) + " threads have together (" +
               std::to_string(launch_registers(threads)) +
               " each, the 64K of a multiprocessor over the block's threads: what ptxas compiles such a kernel to)";
    }

    // ---- named barriers
    void named_barrier(int id, int count, bool wait, Site site) {
        if (id < 0 || id > 15 || count <= 0 || count % 32 || unsigned(count) > threads)
            fail(site, "named barrier " + std::to_string(id) + " of " + std::to_string(count) +
                           " threads: ids are 0 to 15, thread counts multiples of 32 up to the block's " +
                           std::to_string(threads));
        NamedBarrier& b = named[id];
        if (b.arrived == 0)
            b.threads = unsigned(count);
        else if (b.threads != unsigned(count))
            fail(site, "named barrier " + std::to_string(id) + " is awaited by " + std::to_string(b.threads) +
                           " threads and, here, by " + std::to_string(count));
        if (++b.arrived == b.threads) {
            b.arrived = 0;
            for (Fiber* f : b.waiters) make_ready(f);
            b.waiters.clear();
            return;
        }
        if (!wait) return;
        site.detail = unsigned(id) + 16 * unsigned(count);
        current->waiting = site;
        b.waiters.push_back(current);
        switch_away();
    }

    // ---- wgmma: D (64 x N) = A (64 x 16) B (16 x N) (+ D), for the warpgroup (see Wgmmas above).
    // A from registers (a) or shared memory (a_desc), K-major or, "transposed", M-major; B from shared
    // memory, K-major or N-major (SmemMatrix above reads either).
    template <class Half>
    void wgmma(float* d, unsigned n_cols, const unsigned* a, uint64_t a_desc, bool a_mn_major,
               uint64_t b_desc, bool b_mn_major, bool accumulate, const Site& site) {
        unsigned t;
        WarpGroup& group = warpgroup_of_current(t, site);
        Wgmmas& mine = current->wgmmas;
        const WgmmaResult* in_flight = mine.find(d);
        group.operands[t] = {
            d, in_flight ? in_flight->values : d, a, a_desc, b_desc, accumulate, a_mn_major, b_mn_major};
        meet(group, 128, site, [&] { wgmma_complete<Half>(group, n_cols, a != nullptr, site); });
    }
    // The warpgroup's product, by the last thread to arrive, into every thread's result in flight.
    template <class Half>
    void wgmma_complete(WarpGroup& group, unsigned n_cols, bool a_in_registers, const Site& site) {
        const WarpGroup::Operands& op = group.operands[0];
        for (const WarpGroup::Operands& other : group.operands)
            if (other.a_desc != op.a_desc || other.b_desc != op.b_desc || other.accumulate != op.accumulate ||
                other.a_mn_major != op.a_mn_major || other.b_mn_major != op.b_mn_major)
                fail(site,
                     "the 128 threads of the warpgroup gave different descriptors, accumulate or transpose "
                     "flags");
        wgmma_scratch.resize(64 * 16 + 16 * kMaxWgmmaN + 64 * kMaxWgmmaN);
        float *A = wgmma_scratch.data(), *B = A + 64 * 16, *D = B + 16 * kMaxWgmmaN;  // row-major
        auto element = [&](unsigned address) {
            if (size_t(address) + 2 > launch->shared_bytes)
                fail(site, "the descriptor reads shared memory byte " + std::to_string(address) +
                               ", past the block's " + std::to_string(launch->shared_bytes));
            unsigned short bits;
            std::memcpy(&bits, reinterpret_cast<const char*>(smem) + address, 2);
            return to_float(Half{bits});
        };
        const unsigned first = current->id / 128 * 128;
        if (a_in_registers) {  // thread (w, g, q): a[j] = A[16w + g + 8 (j % 2)][2q + 8 (j / 2), + 1]
            for (unsigned t = 0; t < 128; ++t) {
                const unsigned w = t / 32, g = t % 32 / 4, q = t % 4;
                for (unsigned j = 0; j < 4; ++j) {
                    const unsigned reg = group.operands[t].a[j], r = 16 * w + g + 8 * (j % 2),
                                   k = 2 * q + 8 * (j / 2);
                    A[r * 16 + k] = to_float(Half{(unsigned short)reg});
                    A[r * 16 + k + 1] = to_float(Half{(unsigned short)(reg >> 16)});
                }
            }
        } else {
            const SmemMatrix a(op.a_desc);  // M-major: the layout of an N-major B, with M for N
            for (unsigned r = 0; r < 64; ++r)
                for (unsigned k = 0; k < 16; ++k)
                    A[r * 16 + k] = element(op.a_mn_major ? a.mn_major(k, r) : a.k_major(r, k));
        }
        const SmemMatrix b(op.b_desc);
        if (b.base_offset || (!a_in_registers && SmemMatrix(op.a_desc).base_offset))
            fail(site,
                 "the emulation takes descriptors with base offset 0 (tiles aligned to their swizzle's "
                 "repeat)");
        for (unsigned k = 0; k < 16; ++k)
            for (unsigned n = 0; n < n_cols; ++n)
                B[k * n_cols + n] = element(op.b_mn_major ? b.mn_major(k, n) : b.k_major(n, k));
        // Thread (w, g, q)'s accumulators: d[n][j] = D[16w + g + 8 (j / 2)][8n + 2q + j % 2].
        auto place = [](unsigned t, unsigned i, unsigned& r, unsigned& c) {
            const unsigned w = t / 32, g = t % 32 / 4, q = t % 4, n = i / 4, j = i % 4;
            r = 16 * w + g + 8 * (j / 2), c = 8 * n + 2 * q + j % 2;
        };
        const unsigned count = n_cols / 2;
        for (unsigned t = 0; t < 128; ++t)
            for (unsigned i = 0; i < count; ++i) {
                unsigned r, c;
                place(t, i, r, c);
                D[r * n_cols + c] = op.accumulate ? group.operands[t].c[i] : 0.0f;
            }
        for (unsigned r = 0; r < 64; ++r)  // each element as c + A[r][0] B[0][n] + ... + A[r][15] B[15][n]
            for (unsigned k = 0; k < 16; ++k)
                for (unsigned n = 0; n < n_cols; ++n) D[r * n_cols + n] += A[r * 16 + k] * B[k * n_cols + n];
        for (unsigned t = 0; t < 128; ++t) {
            Wgmmas& theirs = fibers[first + t]->wgmmas;
            float* d = group.operands[t].d;
            WgmmaResult* result = theirs.find(d);  // superseded: the new result chains on it
            if (!result) result = &theirs.pending.emplace_back();
            result->d = d, result->count = count, result->group = theirs.committed;
            for (unsigned i = 0; i < count; ++i) {
                unsigned r, c;
                place(t, i, r, c);
                result->values[i] = D[r * n_cols + c];
            }
            std::fill(d, d + count, std::numeric_limits<float>::quiet_NaN());  // in flight
        }
    }

    [[noreturn]] void thread_exits() {
        Fiber* self = current;
        failed_polls = 0;
        // Bulk reduces never waited for: their adds still land, as the copy engine would do them, but
        // the kernel may have overwritten their source (or, on a GPU, the next block may), so the
        // launch fails.
        const bool reduces = !self->reduces.requests.empty();
        self->reduces.land_all();
        const char* unfinished =
            !self->copies.requests.empty() ? "cp.async copies never waited for (a cp_async_commit and "
                                             "cp_async_wait must follow the last "
                                             "cp_async)"
            : !self->wgmmas.pending.empty()
                ? "wgmma results never waited for (a wgmma_commit and wgmma_wait must follow the last wgmma)"
            : reduces ? "bulk reduce never waited for (a bulk_commit and bulk_wait_read must follow the last "
                        "bulk_reduce_add)"
                      : nullptr;
        if (unfinished) {
            launch->fail(cudaErrorInvalidValue, "invalid argument: " + launch->block_name(blockIdx) +
                                                    ", thread " + std::to_string(self->id) + ": " +
                                                    unfinished);
            abandon_block();
        }
        self->exited = true, ++exited;
        switch_away();
        std::abort();  // not reached: nobody makes an exited fiber ready
    }

    // Why no thread of the block can go on: the barrier (or the warp collective) that waits, and
    // where each of the threads concerned is, e.g. "the __syncthreads() at kernels/x.cu:12 can
    // never complete: threads 0-63 wait there, threads 64-127 have exited".
    // Block-wide waits come first: a __syncthreads, an mbarrier, a named barrier; then a warpgroup's
    // collective, then a warp's.
    std::string deadlock_message() const {
        unsigned first = 0, count = threads;  // the threads concerned: the block's, a warpgroup's or a warp's
        // The one that cannot complete: where the lowest-numbered thread concerned waits at a wait of
        // that kind, whichever thread arrived first.
        auto lowest = [&](const char* what) {
            for (unsigned t = first; t < first + count; ++t)
                if (fibers[t]->waiting.what && (!what || is(fibers[t]->waiting, what)))
                    return fibers[t]->waiting;
            return Site{};
        };
        Site waited;
        std::string subject, rule;
        if (barrier.arrived > 0) {
            waited = lowest("__syncthreads()");
            rule = "every thread of a block must reach the same __syncthreads()";
        } else if ((waited = lowest(kMbarrierWait)).what || (waited = lowest(kMbarrierPoll)).what) {
            const Mbarrier& b = mbarriers[waited.barrier];
            rule =
                "its barrier, at shared memory byte " + std::to_string(mbarrier_offset(b.address)) +
                ", has completed " + std::to_string(b.phase) + " phase" + (b.phase == 1 ? "" : "s") +
                " and awaits " + std::to_string(b.pending) + " of its " + std::to_string(b.expected) +
                " arrivals and " + std::to_string(b.bytes) +
                " bytes: a phase completes when all its arrivals have arrived and all the bytes announced by "
                "expect_tx have landed";
        } else if ((waited = lowest(kNamedBarrier)).what) {
            rule =
                "as many threads as its count must arrive at a named barrier, by named_barrier_sync or "
                "named_barrier_arrive";
        } else if (threads % 128 == 0 && std::any_of(warpgroups.begin(), warpgroups.begin() + threads / 128,
                                                     [](const WarpGroup& g) { return g.arrived > 0; })) {
            while (warpgroups[first / 128].arrived == 0) first += 128;
            count = 128, waited = lowest(nullptr);
            subject =
                "warpgroup " + std::to_string(first / 128) + "'s " + waited.what + " at " + where(waited);
            rule = "all 128 threads of a warpgroup must reach the same wgmma or setmaxnreg";
        } else {
            while (first + 32 < threads && warps[first / 32].arrived == 0) first += 32;
            count = 32, waited = lowest(nullptr);
            subject = "warp " + std::to_string(first / 32) + "'s " + waited.what + " at " + where(waited);
            rule = "all 32 lanes of a warp must reach the same warp-collective operation";
        }
        if (subject.empty()) subject = "the " + describe(waited) + " at " + where(waited);
        // The threads by where they are, in the order first seen: {(where, plural), threads}.
        std::vector<std::pair<std::pair<std::string, bool>, std::vector<unsigned>>> groups;
        auto state = [&](const Fiber& f) -> std::pair<std::string, bool> {
            if (f.exited) return {"exited", false};
            if (same_site(f.waiting, waited)) return {"there", true};
            if (f.waiting.what) return {"at the " + describe(f.waiting) + " at " + where(f.waiting), true};
            return {"running", false};  // not expected: then some thread could go on
        };
        for (unsigned t = first; t < first + count; ++t) {
            const auto key = state(*fibers[t]);
            auto group =
                std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == key; });
            if (group == groups.end()) group = groups.insert(groups.end(), {key, {}});
            group->second.push_back(t);
        }
        std::string who;
        for (const auto& [key, ids] : groups) {
            const bool one = ids.size() == 1;
            const std::string verb = key.second              ? (one ? "waits " : "wait ")
                                     : key.first == "exited" ? (one ? "has " : "have ")
                                                             : (one ? "is " : "are ");
            who += (who.empty() ? "" : ", ") + std::string(one ? "thread " : "threads ") + ranges(ids) + " " +
                   verb + key.first;
        }
        return "barrier deadlock in " + launch->block_name(blockIdx) + ": " + subject +
               " can never complete: " + who + " (" + rule + ")";
    }

    // Fibers, their stacks and the warps' buffers for blocks of `threads` threads.
    bool prepare(unsigned block_threads) {
        while (fibers.size() < block_threads) {
            fibers.push_back(std::make_unique<Fiber>());
            if (!fibers.back()->allocate()) return fibers.pop_back(), false;
        }
        threads = block_threads;
        ready.resize(std::max<size_t>(ready.size(), threads));
        warps.resize(std::max<size_t>(warps.size(), (threads + 31) / 32));
        warpgroups.resize(std::max<size_t>(warpgroups.size(), (threads + 127) / 128));
        const dim3 b = launch->block;
        for (unsigned t = 0; t < threads; ++t)
            fibers[t]->id = t, fibers[t]->index = dim3(t % b.x, t / b.x % b.y, t / (b.x * b.y));
        return true;
    }

    void run_block(unsigned long long b) {
        const dim3 g = launch->grid;
        blockIdx =
            dim3(unsigned(b % g.x), unsigned(b / g.x % g.y), unsigned(b / (g.x * (unsigned long long)g.y)));
        // Poisoned: the block's shared memory, and whatever an earlier, larger block used (so that a read
        // past the block's size gets NaN, not an earlier launch's data; at a worker's start, all of it).
        std::memset(smem, kPoison, std::max(launch->shared_bytes, smem_dirty));
        smem_dirty = launch->shared_bytes;
        block = blockIdx, failed_polls = 0;
        exited = 0, barrier = Meeting{}, ready_head = 0, ready_count = 0;
        for (Warp& warp : warps) warp.arrived = 0, warp.generation = 0, warp.diverged = false;
        for (WarpGroup& group : warpgroups) group.arrived = 0, group.diverged = false;
        for (NamedBarrier& b : named) b.arrived = 0, b.waiters.clear();
        registers_held.assign(warpgroups.size(), launch_registers(threads));
        registers_free = 0, registers_short = Site{};
        mbarriers.clear();
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = *fibers[t];
            f.exited = false, f.copies.clear(), f.reduces.clear(), f.wgmmas.clear();
            f.context.start(f.stack(), kStackBytes, fiber_main);
        }
        ascending = !ascending;
        make_block_ready(nullptr);
        current = next_ready();
        threadIdx = current->index;
        switch_context(home, current->context);
        // Back home: the block is done, or none of its threads can go on, or the launch stops.
        const auto in_flight = std::find_if(mbarriers.begin(), mbarriers.end(),
                                            [](const Mbarrier& b) { return !b.copies.empty(); });
        if (exited == threads && in_flight != mbarriers.end()) {
            launch->fail(
                cudaErrorInvalidValue,
                "invalid argument: " + launch->block_name(blockIdx) +
                    ": TMA copies never landed (no thread waited on their mbarrier, at shared memory "
                    "byte " +
                    std::to_string(mbarrier_offset(in_flight->address)) + ", after they were issued)");
        } else if (exited == threads && registers_free < 0) {
            launch->fail(cudaErrorCpuDeadlock, registers_message());
        } else if (exited == threads) {
            const size_t past = first_write_past_size();
            if (past < kMaxSharedBytes)
                launch->fail(cudaErrorIllegalAddress,
                             std::string(cpu_error_name(cudaErrorIllegalAddress)) + ": " +
                                 launch->block_name(blockIdx) + " wrote shared memory byte " +
                                 std::to_string(past) + ", past the block's " +
                                 std::to_string(launch->shared_bytes) +
                                 " bytes of shared memory (the size its launch asked for)");
            launch->blocks_done.fetch_add(1);
            launch->tick();
        } else if (!stop_requested()) {
            launch->fail(cudaErrorCpuDeadlock, deadlock_message());
        }
    }

    // Past the block's size its buffer held only the poison (run_block): a byte that does not now was
    // written by the block, out of its bounds, which a GPU reports. The first such byte, or
    // kMaxSharedBytes if none. (Reads past the size are not caught: they read the poison, NaN.)
    size_t first_write_past_size() {
        static const std::vector<unsigned char> poison(4096, kPoison);
        const unsigned char* bytes = reinterpret_cast<const unsigned char*>(smem);
        for (size_t at = launch->shared_bytes; at < kMaxSharedBytes; at += poison.size()) {
            const size_t n = std::min(poison.size(), kMaxSharedBytes - at);
            if (std::memcmp(bytes + at, poison.data(), n) == 0) continue;  // (the C library's, vectorized)
            while (bytes[at] == kPoison) ++at;
            smem_dirty = kMaxSharedBytes;  // the next block poisons it all again
            return at;
        }
        return kMaxSharedBytes;
    }

    void run(Launch& l) {
        launch = &l;
        switches_until_tick = 4096;
        os_thread = pthread_self();
        if (!prepare(l.threads)) {
            l.fail(cudaErrorMemoryAllocation, "out of memory: no stacks for the " +
                                                  std::to_string(l.threads) + " threads of a block of " +
                                                  l.kernel);
            return;
        }
        // A fiber that overflows its stack faults with no stack left: the fault handler (on_fault) runs
        // on one of its own, this one unless the OS thread has one already (Python's faulthandler's).
        stack_t old{}, mine{};
        const bool own_stack = sigaltstack(nullptr, &old) == 0 && (old.ss_flags & SS_DISABLE);
        if (own_stack) mine.ss_sp = alt_stack, mine.ss_size = sizeof alt_stack, sigaltstack(&mine, nullptr);
        active = true;
        for (;;) {
            if (stop_requested()) break;
            const unsigned long long b = l.next_block.fetch_add(1);
            if (b >= l.blocks) break;
            run_block(b);
        }
        active = false;
        if (own_stack) mine.ss_flags = SS_DISABLE, sigaltstack(&mine, nullptr);
    }
    char alt_stack[64 * 1024];
};

// The workers, kept with their fibers' stacks from launch to launch. Launches take turns: Python
// threads may launch at the same time (ctypes releases the GIL), and a launch uses every core.
std::mutex launch_mutex;
std::vector<std::unique_ptr<Worker>> workers;
thread_local Worker* this_worker = nullptr;  // the worker on this OS thread, during a launch
unsigned workers_wanted = 0;                 // 0: one per core (cpu_set_workers changes it)

// Where every fiber starts: the kernel, as the thread that the worker has made current.
// A C++ exception that leaves the kernel (a reader's host-style helper that throws) fails the launch
// with what it says. The launch fails outside the catch: a fiber must not switch away inside one (the
// C++ runtime keeps the exception being handled per OS thread, and other fibers share it).
void fiber_main() {
    Worker& worker = *this_worker;
    bool threw = false;
    {
        std::string what;
        try {
            worker.launch->body(worker.launch->arguments);
        } catch (const std::exception& e) {
            what = e.what();
            if (what.empty()) what = "an exception";
        } catch (...) {
            what = "an exception that is not a std::exception";
        }
        if (!what.empty())
            worker.launch->fail(cudaErrorLaunchFailure, "unspecified launch failure: " + worker.thread_name() +
                                                            " threw a C++ exception: " + what),
                threw = true;
    }
    if (threw) worker.abandon_block();
    worker.thread_exits();
}

// The kernel's name, for the messages: its symbol (demangled, without its parameters) where the
// dynamic linker knows it, else the text that LAUNCH was given.
std::string symbol_name(const void* kernel, const char* text) {
    Dl_info info;
    if (dladdr(kernel, &info) && info.dli_sname && info.dli_saddr == kernel) {
        int status = 0;
        char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
        std::string name = status == 0 && demangled ? demangled : info.dli_sname;
        std::free(demangled);
        if (name.compare(0, 5, "void ") == 0) name.erase(0, 5);  // a template's return type
        int depth = 0;  // cut the parameter list: the first '(' outside template arguments
        for (size_t i = 0; i < name.size(); ++i) {
            depth += name[i] == '<' ? 1 : name[i] == '>' ? -1 : 0;
            if (name[i] == '(' && depth == 0) return name.substr(0, i);
        }
        return name;
    }
    return text;
}

std::map<const void*, std::string> kernel_names;  // looked up once per kernel: dladdr searches

std::string kernel_name(const void* kernel, const char* text) {
    auto known = kernel_names.find(kernel);
    if (known != kernel_names.end()) return known->second;
    return kernel_names[kernel] = symbol_name(kernel, text);
}


// ---- Signals: Ctrl-C (SIGINT), and faults (SIGSEGV, SIGBUS) in a kernel's threads.
//
// A process may hold several builds of the kernels, each a library with its own emulation (see the
// visibility pragma above), and launch them from several threads at once. A handler put in place for
// a launch and taken away after it cannot be right then: two builds' launches overlap, and each takes
// away what the other put. So a library puts its handlers in front of the ones it finds, at its first
// launch, and leaves them there: between launches they only pass the signal on (to Python's SIGINT
// handler, which raises KeyboardInterrupt once the call returns; to faulthandler, or to the default
// action). A launch checks that they are still in the chain (Jupyter puts Python's back before every
// cell): it walks the chain from its front, asking each handler of another build which one it passes
// on to (cpu_cuda_next_action_v1, looked up in that handler's library); a library already in the chain
// does not put itself in front again, so the chain never loops.
constexpr int kSignals[3] = {SIGINT, SIGSEGV, SIGBUS};
inline int signal_index(int signal) { return signal == SIGINT ? 0 : signal == SIGSEGV ? 1 : 2; }
struct sigaction next_action[3];  // per signal, where this library's handler passes it on
std::mutex chain_mutex;           // this library's launches put its handlers in front one at a time

inline void* handler_of(const struct sigaction& action) {
    return action.sa_flags & SA_SIGINFO ? reinterpret_cast<void*>(action.sa_sigaction)
                                        : reinterpret_cast<void*>(action.sa_handler);
}
// Where `action`, if it is another build's handler of `signal`, passes it on; null if it is none.
const struct sigaction* next_of_other_build(int signal, const struct sigaction& action) {
    void* handler = handler_of(action);
    Dl_info info;
    if (action.sa_handler == SIG_DFL || action.sa_handler == SIG_IGN || !dladdr(handler, &info) ||
        !info.dli_fname)
        return nullptr;
    void* library = dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD);
    if (!library) return nullptr;
    using Next = const struct sigaction* (*)(int, void*);
    const Next next = reinterpret_cast<Next>(dlsym(library, "cpu_cuda_next_action_v1"));
    const struct sigaction* found = next ? next(signal, handler) : nullptr;
    dlclose(library);
    return found;
}

void on_sigint(int signal, siginfo_t* info, void* context);
void on_fault(int signal, siginfo_t* info, void* context);

// Puts this library's handlers in front of the chain, where they are not in it yet. A SIGINT that is
// ignored stays ignored.
void join_signal_chains() {
    std::lock_guard<std::mutex> lock(chain_mutex);
    static bool pinned = false;
    if (!pinned) {  // the library must stay loaded while its handlers are installed: never unloaded
        Dl_info info;
        if (dladdr(reinterpret_cast<void*>(&on_sigint), &info) && info.dli_fname)
            dlopen(info.dli_fname, RTLD_LAZY | RTLD_NOLOAD | RTLD_NODELETE);
        pinned = true;
    }
    for (int i = 0; i < 3; ++i) {
        const int signal = kSignals[i];
        const auto ours = i == 0 ? on_sigint : on_fault;
        struct sigaction front;
        if (sigaction(signal, nullptr, &front) != 0) continue;
        const struct sigaction* at = &front;
        for (int hop = 0; at && hop < 64 && handler_of(*at) != reinterpret_cast<void*>(ours); ++hop)
            at = next_of_other_build(signal, *at);
        if ((at && handler_of(*at) == reinterpret_cast<void*>(ours)) ||
            (i == 0 && !(front.sa_flags & SA_SIGINFO) && front.sa_handler == SIG_IGN))
            continue;
        next_action[i] = front;
        struct sigaction mine;
        std::memset(&mine, 0, sizeof mine);
        mine.sa_sigaction = ours;
        mine.sa_flags = SA_SIGINFO | SA_ONSTACK;  // SA_ONSTACK: a fiber's stack overflow leaves no stack
        sigemptyset(&mine.sa_mask);
        sigaction(signal, &mine, nullptr);
    }
}

// What the handlers, which may run at any moment on any thread, know of this library's launches.
std::atomic<int> calls_in_progress{0};      // launch calls, running or waiting for launch_mutex
std::atomic<bool> running{false};           // a launch holds launch_mutex and runs
std::atomic<unsigned long long> running_seen{0};  // `interrupts` when that launch was called
std::atomic<long long> first_interrupt_ns{0};     // when its first Ctrl-C came
char running_kernel[160];                   // its kernel's name
std::atomic<bool> passing_on{false};

// Only what a signal handler may call: write, not printf.
struct Line {
    char text[512];
    size_t size = 0;
    Line& operator<<(const char* s) {
        while (*s && size < sizeof text - 1) text[size++] = *s++;
        return *this;
    }
    Line& operator<<(unsigned long long n) {
        char digits[24];
        int d = 0;
        do digits[d++] = char('0' + n % 10), n /= 10;
        while (n);
        while (d && size < sizeof text - 1) text[size++] = digits[--d];
        return *this;
    }
    Line& hex(uintptr_t n) {
        *this << "0x";
        for (int shift = 60; shift >= 0; shift -= 4)
            if ((n >> shift || shift == 0) && size < sizeof text - 1)
                text[size++] = "0123456789abcdef"[n >> shift & 15];
        return *this;
    }
    void write_out() {
        text[size++] = '\n';
        while (size && ::write(2, text, size) < 0) {
        }
    }
};
long long monotonic_ns() {
    timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000000000LL + now.tv_nsec;
}

// Ctrl-C: counted (a launch stops at its next switch), then passed on. A kernel whose thread never
// reaches a switch (it spins on a flag that another thread of its block would set, or loops for good:
// no barrier, collective or wait inside) cannot be stopped so: a second Ctrl-C, a second or more after
// the first, with the launch still running, ends the process, saying why.
void on_sigint(int signal, siginfo_t* info, void* context) {
    const unsigned long long count = interrupts.fetch_add(1) + 1;
    if (running.load()) {
        const long long now = monotonic_ns();
        if (count - running_seen.load() == 1) {
            first_interrupt_ns = now;
        } else if (now - first_interrupt_ns.load() > 1000000000LL) {
            Line line;
            line << "minimal_flash: Ctrl-C again, and the CPU emulation of " << running_kernel
                 << " has not stopped: a thread of the kernel runs code that never reaches a barrier, a warp "
                    "collective or a wait (a spin on a flag, an endless loop), where the emulation, which "
                    "runs a block's threads one at a time, could stop it; ending the process";
            line.write_out();
            struct sigaction by_default;
            std::memset(&by_default, 0, sizeof by_default);
            by_default.sa_handler = SIG_DFL;
            sigaction(SIGINT, &by_default, nullptr);
            raise(SIGINT);  // blocked in this handler: the process ends as it returns
            return;
        }
    }
    if (passing_on.exchange(true)) return;  // came round a loop that older builds' handlers made
    const struct sigaction& next = next_action[0];
    if (next.sa_flags & SA_SIGINFO) {
        if (next.sa_sigaction) next.sa_sigaction(signal, info, context);
    } else if (next.sa_handler == SIG_DFL) {
        // No Python: the default action, ending the process, once the launch has stopped (run_launch).
        if (calls_in_progress.load() == 0) sigaction(SIGINT, &next, nullptr), raise(SIGINT);
    } else if (next.sa_handler != SIG_IGN) {
        next.sa_handler(signal);
    }
    passing_on = false;
}

// A fault in a kernel's thread (an index out of bounds, a misaligned 16-byte access, a stack overflow)
// cannot be recovered from safely: the thread may have written anywhere before. So the process ends,
// as on the hardware the CUDA context does, but with a line that names the kernel, the block, the
// thread and the likely cause. Then the next handler takes the fault (faulthandler prints Python's
// stack; the default action ends the process), as the access faults again.
void on_fault(int signal, siginfo_t* info, void* context) {
    const int i = signal_index(signal);
    const Worker* worker = nullptr;
    if (running.load())
        for (const auto& w : workers)
            if (w->active.load() && pthread_equal(w->os_thread, pthread_self())) worker = w.get();
    if (worker && worker->current && info->si_code > 0) {
        const uintptr_t address = reinterpret_cast<uintptr_t>(info->si_addr);
        const Fiber& f = *worker->current;
        const uintptr_t guard = reinterpret_cast<uintptr_t>(f.mapping), shared = reinterpret_cast<uintptr_t>(
                                                                                  &smem[0]);
        Line line;
        line << "minimal_flash: CPU emulation of " << running_kernel << ", block (" << worker->block.x << ", "
             << worker->block.y << ", " << worker->block.z << "), thread " << f.id << ": "
             << (signal == SIGSEGV ? "SIGSEGV" : "SIGBUS");
        if (address) line << " at address ", line.hex(address);
        // Below the thread's stack, by up to a MB: a frame larger than what was left (a large local array).
        if (address + (1 << 20) >= guard && address < uintptr_t(f.stack()))
            line << ": stack overflow: the thread's locals take more than the "
                 << (unsigned long long)(kStackBytes / 1024) << " KB of stack that the emulation gives a thread";
        else if (signal == SIGSEGV && !address)
            line << ": a general-protection fault: most likely a misaligned vector access (a GPU reports a "
                    "misaligned address) or an address far out of bounds";
        else if (address + (1 << 20) >= shared && address < shared + sizeof smem + (1 << 20))
            line << ": an access past the block's shared memory (a GPU reports an illegal address)";
        else
            line << ": an access outside the process's memory, an index out of bounds (a GPU reports an "
                    "illegal memory access)";
        line << "; the process ends";
        line.write_out();
    }
    sigaction(signal, &next_action[i], nullptr);
    if (info->si_code <= 0) raise(signal);  // sent, not a fault: sent again, to the next handler
    (void)context;
}

// A process forked while another of its threads ran a launch: that thread does not exist in the child,
// and what launch_mutex guards may be half changed. The child's launches fail, as CUDA refuses to run
// in a child forked after it was used.
bool forked_mid_launch = false;
void after_fork_in_child() {
    if (calls_in_progress.load() > 0) {
        forked_mid_launch = true;
        new (&launch_mutex) std::mutex;
        new (&chain_mutex) std::mutex;
        running = false, calls_in_progress = 0;
    }
}
}  // namespace

// How many workers (OS threads) a launch may use: 0, the default, is one per core. For tests.
inline void cpu_set_workers(unsigned n) { workers_wanted = n; }
// The workers a launch runs on: as many blocks at a time as a GPU of that many multiprocessors (that
// fit one block each) runs; a persistent kernel's grid.
inline unsigned cpu_workers() {
    return std::max(1u, workers_wanted ? workers_wanted : std::thread::hardware_concurrency());
}

// Runs a launch: its blocks spread over the workers, the calling thread one of them.
inline void run_launch(Launch& l) {
    static std::once_flag fork_handler;
    std::call_once(fork_handler, [] { pthread_atfork(nullptr, nullptr, after_fork_in_child); });
    if (forked_mid_launch) {
        l.fail(cudaErrorInitializationError,
               "initialization error: this process was forked while another of its threads ran a launch of the "
               "CPU emulation; the child cannot launch (as CUDA cannot be used in a child forked after "
               "it was used): fork before launching, or use the spawn start method");
        return;
    }
    // A Ctrl-C from here on stops this launch, also while it waits for another thread's.
    ++calls_in_progress;
    join_signal_chains();
    l.interrupts_seen = interrupts.load();
    std::unique_lock<std::mutex> lock(launch_mutex);
    l.kernel = kernel_name(l.kernel_address, l.kernel_text);
    l.start = std::chrono::steady_clock::now();
    gridDim = l.grid, blockDim = l.block;
    std::snprintf(running_kernel, sizeof running_kernel, "%s", l.kernel.c_str());
    running_seen = l.interrupts_seen;
    running = true;
    const unsigned cores = cpu_workers();
    const unsigned n = unsigned(std::min<unsigned long long>(cores, l.blocks));
    while (workers.size() < n) workers.push_back(std::make_unique<Worker>());
    // Workers past the count wanted now (a test's cpu_set_workers, set back) go, their fibers' stacks with
    // them: every build keeps its own, two mappings a thread, and a process's mappings are limited.
    if (workers.size() > cores) workers.resize(cores);
    std::vector<std::thread> helpers;
    for (unsigned w = 1; w < n; ++w) {
        try {
            helpers.emplace_back(
                [&l, w] { this_worker = workers[w].get(), this_worker->run(l), this_worker = nullptr; });
        } catch (const std::system_error&) {
            break;  // no more threads: fewer workers do the same work
        }
    }
    this_worker = workers[0].get();
    this_worker->run(l);
    this_worker = nullptr;
    for (std::thread& helper : helpers) helper.join();
    running = false;
    lock.unlock();
    --calls_in_progress;
    // A Ctrl-C that came late still stops the caller: Python raises KeyboardInterrupt anyway. With no
    // Python (SIGINT's default action next), the process ends as it would have at once.
    if (interrupts.load() != l.interrupts_seen) {
        l.fail(cudaErrorCpuInterrupted, "interrupted");
        if (!(next_action[0].sa_flags & SA_SIGINFO) && next_action[0].sa_handler == SIG_DFL)
            sigaction(SIGINT, &next_action[0], nullptr), raise(SIGINT);
    }
}

}  // namespace cpu_cuda

// ------------------------------------------------------------------------------------------------
// What kernels call.

// __syncthreads(): the block's barrier (file and line name it in a deadlock's message).
inline void __syncthreads(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
    cpu_cuda::this_worker->sync_threads({"__syncthreads()", file, line});
}

// Warp-collective operations. Only whole warps with the full mask, which is all the kernels use;
// anything else fails the launch.
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    const cpu_cuda::Site site{"__shfl_xor_sync()", file, line};
    cpu_cuda::Worker& worker = *cpu_cuda::this_worker;
    unsigned lane;
    cpu_cuda::Warp& warp = worker.warp_of_current(lane, site);
    const unsigned partner = lane ^ unsigned(lane_mask);
    if (mask != 0xffffffffu || partner >= 32) {
        worker.launch->fail(cudaErrorInvalidValue,
                            "invalid argument: __shfl_xor_sync at " + cpu_cuda::where(site) +
                                ": the emulation takes the full mask and lane masks below 32");
        worker.abandon_block();
    }
    const unsigned half = warp.generation % 2;
    warp.value[half][lane] = value;
    worker.sync_warp(warp, site, [] {});
    return warp.value[half][partner];
}

// mma.sync m16n8k16, a warp-collective: the 32 lanes put their fragments together; the last to
// arrive computes the 16 x 8 tile d = A B + c, in the layouts of kernels/mma.cuh, and each lane
// takes its 4 elements. Each element is summed as c + A[r][0] B[0][n] + A[r][1] B[1][n] + ..., in
// that order.
template <class Half, float (*to_float)(Half)>
inline void mma_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4],
                         const cpu_cuda::Site& site) {
    cpu_cuda::Worker& worker = *cpu_cuda::this_worker;
    unsigned lane;
    cpu_cuda::Warp& warp = worker.warp_of_current(lane, site);
    cpu_cuda::Warp::Mma& m = warp.mma[warp.generation % 2];
    std::copy(a, a + 4, m.a[lane]), std::copy(b, b + 2, m.b[lane]), std::copy(c, c + 4, m.c[lane]);
    worker.sync_warp(warp, site, [&m] {
        auto lo = [](unsigned reg) { return to_float(Half{(unsigned short)reg}); };
        auto hi = [](unsigned reg) { return to_float(Half{(unsigned short)(reg >> 16)}); };
        float A[16][16], B[16][8];
        for (unsigned l = 0; l < 32; ++l) {  // lane l = (g, q) holds, per the layouts of mma.cuh:
            const unsigned g = l / 4, q = l % 4;
            for (unsigned j = 0; j < 4; ++j) {  // a[j]: A[g + 8 (j % 2)][2q + 8 (j / 2), + 1]
                const unsigned r = g + 8 * (j % 2), k = 2 * q + 8 * (j / 2);
                A[r][k] = lo(m.a[l][j]), A[r][k + 1] = hi(m.a[l][j]);
            }
            for (unsigned j = 0; j < 2; ++j)  // b[j]: B[2q + 8j, + 1][g]
                B[2 * q + 8 * j][g] = lo(m.b[l][j]), B[2 * q + 8 * j + 1][g] = hi(m.b[l][j]);
            for (unsigned j = 0; j < 4; ++j) m.d[g + 8 * (j / 2)][2 * q + j % 2] = m.c[l][j];  // c, as d
        }
        for (int r = 0; r < 16; ++r)
            for (int k = 0; k < 16; ++k)
                for (int n = 0; n < 8; ++n) m.d[r][n] += A[r][k] * B[k][n];
    });
    const unsigned g = lane / 4, q = lane % 4;
    for (unsigned j = 0; j < 4; ++j) d[j] = m.d[g + 8 * (j / 2)][2 * q + j % 2];
}
inline void mma_bf16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                              const float (&c)[4], const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    mma_m16n8k16<__nv_bfloat16, __bfloat162float>(d, a, b, c, {"mma.sync (bf16)", file, line});
}
inline void mma_f16_m16n8k16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2],
                             const float (&c)[4], const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
    mma_m16n8k16<__half, __half2float>(d, a, b, c, {"mma.sync (fp16)", file, line});
}

// ldmatrix .x4, a warp-collective: lane 8i + j gives the address of row j of tile i (16 bytes of the
// block's shared memory, 16-byte aligned, else the launch fails as on a GPU); lane l gets row g,
// columns 2q, 2q+1 of each tile (transposed: rows 2q, 2q+1 of column g). One instruction for the warp:
// the last lane to arrive reads the rows for all 32, before any lane goes on, so a lane may overwrite
// its row right after (the others have read it).
inline void ldmatrix(unsigned (&r)[4], const void* row, bool transposed, const cpu_cuda::Site& site) {
    cpu_cuda::Worker& worker = *cpu_cuda::this_worker;
    unsigned lane;
    cpu_cuda::Warp& warp = worker.warp_of_current(lane, site);
    const unsigned half = warp.generation % 2;
    warp.rows[half][lane] = row;
    worker.sync_warp(warp, site, [&] {
        const char* shared = reinterpret_cast<const char*>(smem);
        const size_t bytes = worker.launch->shared_bytes;
        const unsigned short* rows[32];
        for (unsigned l = 0; l < 32; ++l) {
            const char* at = static_cast<const char*>(warp.rows[half][l]);
            const size_t offset = size_t(at - shared);  // below smem: wraps to a huge offset
            if (__builtin_expect(offset % 16 != 0 || offset + 16 > bytes, 0)) {
                if (at < shared || offset + 16 > bytes)
                    worker.fail(site, "lane " + std::to_string(l) + "'s row is not 16 bytes of the block's " +
                                          std::to_string(bytes) + " bytes of shared memory",
                                cudaErrorIllegalAddress);
                worker.fail(site, "lane " + std::to_string(l) + "'s row, at shared memory byte " +
                                      std::to_string(offset) + ", is not 16-byte aligned",
                            cudaErrorMisalignedAddress);
            }
            rows[l] = reinterpret_cast<const unsigned short*>(at);
        }
        unsigned (&fragments)[32][4] = warp.fragments[half];
        for (unsigned l = 0; l < 32; ++l) {
            const unsigned g = l / 4, q = l % 4;
            for (int i = 0; i < 4; ++i) {
                const unsigned short* const* tile = rows + 8 * i;
                fragments[l][i] = transposed ? tile[2 * q][g] | unsigned(tile[2 * q + 1][g]) << 16
                                             : tile[g][2 * q] | unsigned(tile[g][2 * q + 1]) << 16;
            }
        }
    });
    std::copy(warp.fragments[half][lane], warp.fragments[half][lane] + 4, r);
}
inline void ldmatrix_x4(unsigned (&r)[4], const void* row, const char* file = __builtin_FILE(),
                        int line = __builtin_LINE()) {
    ldmatrix(r, row, false, {"ldmatrix", file, line});
}
inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* row, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
    ldmatrix(r, row, true, {"ldmatrix .trans", file, line});
}

// cp.async (see AsyncCopies above): the copy is the issuing thread's until it waits for it.
template <size_t size>
inline void cp_async(void* to, const void* from, bool valid, const char* file,
                     int line) {  // valid false: zeros land
    cpu_cuda::Worker& worker = *cpu_cuda::this_worker;
    if (reinterpret_cast<uintptr_t>(to) % size || reinterpret_cast<uintptr_t>(from) % size) {
        char addresses[96];
        std::snprintf(addresses, sizeof addresses, "%p to %p", from, to);
        worker.launch->fail(cudaErrorMisalignedAddress,
                            "misaligned address: a cp.async of " + std::to_string(size) + " bytes from " +
                                addresses + " at " + cpu_cuda::where({"", file, line}) + " in " +
                                worker.launch->block_name(blockIdx));
        worker.abandon_block();
    }
    const char *shared = reinterpret_cast<const char*>(smem), *at = static_cast<const char*>(to);
    if (at < shared || size_t(at - shared) + size > worker.launch->shared_bytes) {
        worker.launch->fail(cudaErrorIllegalAddress,
                            "an illegal memory access was encountered: a cp.async of " + std::to_string(size) +
                                " bytes at " + cpu_cuda::where({"", file, line}) + " in " + worker.thread_name() +
                                ": its destination is not in the block's " +
                                std::to_string(worker.launch->shared_bytes) + " bytes of shared memory");
        worker.abandon_block();
    }
    cpu_cuda::AsyncCopy copy{to, size, {}};
    if (valid) std::memcpy(copy.bytes, from, size);
    std::memset(to, kPoison, size);  // in flight: neither the old data nor the new
    worker.current->copies.requests.push_back(copy);
}
inline void cp_async16(void* to, const void* from, bool valid, const char* file = __builtin_FILE(),
                       int line = __builtin_LINE()) {
    cp_async<16>(to, from, valid, file, line);
}
inline void cp_async16_first(void* to, const void* from, bool valid, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {  // L2's eviction policy: nothing to emulate
    cp_async<16>(to, from, valid, file, line);
}
inline void cp_async4(void* to, const void* from, bool valid, const char* file = __builtin_FILE(),
                      int line = __builtin_LINE()) {
    cp_async<4>(to, from, valid, file, line);
}
inline void cp_async_commit() { cpu_cuda::this_worker->current->copies.commit(); }
template <int n>
inline void cp_async_wait() {
    cpu_cuda::this_worker->current->copies.wait(n);
}

// ---- Hopper's instructions (kernels/hopper.cuh declares them for the GPU, in inline PTX). Each
// takes the file and line of its call, for the messages.
#define CPU_CUDA_SITE const char *file = __builtin_FILE(), int line = __builtin_LINE()

// mbarrier (cpu_cuda::Mbarrier): try_wait lands the copies in flight on the barrier, then says whether
// the phase of that parity has completed; wait really waits.
inline void mbarrier_init(uint64_t* bar, unsigned arrivals, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->mbarrier_init(bar, arrivals, {"mbarrier_init", file, line});
}
inline void fence_mbarrier_init() {}  // the emulation's copy engine sees every barrier at once
inline void mbarrier_arrive(uint64_t* bar, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->mbarrier_arrive(bar, 0, {"mbarrier_arrive", file, line});
}
inline void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->mbarrier_arrive(bar, bytes, {"mbarrier_arrive_expect_tx", file, line});
}
inline bool mbarrier_try_wait(uint64_t* bar, unsigned parity, CPU_CUDA_SITE) {
    return cpu_cuda::this_worker->mbarrier_try_wait(bar, parity, {"mbarrier_try_wait", file, line});
}
inline void mbarrier_wait(uint64_t* bar, unsigned parity, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->mbarrier_wait(bar, parity, {cpu_cuda::kMbarrierWait, file, line});
}

// TMA: the box at (x, y, z) of a 3-dimensional tensor map (x innermost), or at (x, y, z, w) of a
// 4-dimensional one, zeros outside the tensor, into shared memory at `to`, swizzled as the map says;
// its bytes count on `bar` when it lands.
inline void tma_load(void* to, const CUtensorMap* map, int x, int y, int z, uint64_t* bar, CPU_CUDA_SITE) {
    const long long start[3] = {x, y, z};
    cpu_cuda::this_worker->tma_load(to, map, 3, start, bar, {"tma_load", file, line});
}
inline void tma_load(void* to, const CUtensorMap* map, int x, int y, int z, int w, uint64_t* bar,
                     CPU_CUDA_SITE) {
    const long long start[4] = {x, y, z, w};
    cpu_cuda::this_worker->tma_load(to, map, 4, start, bar, {"tma_load", file, line});
}

// The copy engine's bulk copy: `bytes` (a multiple of 16) of global memory at `from` into shared
// memory at `to`, both 16-byte aligned; its bytes count on `bar` when it lands.
inline void bulk_load(void* to, const void* from, unsigned bytes, uint64_t* bar, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->bulk_load(to, from, bytes, bar, {"bulk_load", file, line});
}

// The copy engine's bulk reduce (cpu_cuda::BulkReduce): fp32 from shared memory added into global
// memory, atomically per element; issued by one thread, committed and waited for by it.
inline void bulk_reduce_add(float* to, const float* from, unsigned bytes, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->bulk_reduce_add(to, from, bytes, {"bulk_reduce_add", file, line});
}
inline void bulk_commit() { cpu_cuda::this_worker->current->reduces.commit(); }
template <int n>
inline void bulk_wait_read() {
    cpu_cuda::this_worker->current->reduces.wait(n);
}
// The full wait (the adds in global memory complete too) is the same here: they are done at the wait.
template <int n>
inline void bulk_wait() {
    cpu_cuda::this_worker->current->reduces.wait(n);
}

// What orders memory between the proxies on a GPU: the emulation has one memory, in program order.
inline void fence_proxy_async() {}

// setmaxnreg: all 128 threads of a warpgroup meet there; the count is checked as ptxas would, and the
// block's registers are counted (Worker::set_registers): a GPU's setmaxnreg.inc waits until others'
// setmaxnreg.dec have released enough, for good if they never do. Otherwise it has no effect (a CPU
// thread has the registers it has).
template <int R>
inline void setmaxnreg(const cpu_cuda::Site& site) {
    cpu_cuda::Worker& worker = *cpu_cuda::this_worker;
    if (R < 24 || R > 256 || R % 8)
        worker.fail(site, std::to_string(R) + " registers: the count must be a multiple of 8 from 24 to 256");
    unsigned t;
    cpu_cuda::WarpGroup& group = worker.warpgroup_of_current(t, site);
    const unsigned index = unsigned(&group - worker.warpgroups.data());
    worker.meet(group, 128, site, [&worker, index, &site] { worker.set_registers(index, R, site); });
}
template <int R>
inline void setmaxnreg_inc(CPU_CUDA_SITE) {
    setmaxnreg<R>({"setmaxnreg_inc", file, line});
}
template <int R>
inline void setmaxnreg_dec(CPU_CUDA_SITE) {
    setmaxnreg<R>({"setmaxnreg_dec", file, line});
}

// Named barriers: `threads` arrivals at barrier `id` complete it; sync waits for that, arrive does
// not. (Barrier 0 here is not __syncthreads' own.)
// Flags in global memory between blocks (the deterministic backward's order of dQ's additions):
// acquire and release as on a GPU, and a poll that lets the other threads run.
inline void wait_until_equal(const int* flag, int value) {
    while (__atomic_load_n(flag, __ATOMIC_ACQUIRE) != value) cpu_cuda::this_worker->yield_turn();
}
inline void release_increment(int* flag) { __atomic_fetch_add(flag, 1, __ATOMIC_RELEASE); }

inline void named_barrier_sync(int id, int threads, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->named_barrier(id, threads, true, {cpu_cuda::kNamedBarrier, file, line});
}
inline void named_barrier_arrive(int id, int threads, CPU_CUDA_SITE) {
    cpu_cuda::this_worker->named_barrier(id, threads, false, {cpu_cuda::kNamedBarrier, file, line});
}

// wgmma (cpu_cuda::Wgmmas): issued by the warpgroup together, committed and waited for per thread.
inline void wgmma_fence() {}
inline void wgmma_commit() { ++cpu_cuda::this_worker->current->wgmmas.committed; }
template <int n>
inline void wgmma_wait() {
    cpu_cuda::this_worker->current->wgmmas.wait(n);
}
template <int NT>
inline void fence_operands(float (&)[NT][4]) {}
// wgmma_ss: A and B K-major by default; TRANS_A: A M-major, TRANS_B: B N-major (PTX's imm-trans-a,
// imm-trans-b). wgmma_rs: A from registers, B N-major (the forward's V).
template <class T, int N, bool TRANS_A = false, bool TRANS_B = false>
inline void wgmma_ss(float (&d)[N / 8][4], uint64_t a_desc, uint64_t b_desc, bool accumulate, CPU_CUDA_SITE) {
    static_assert(N % 8 == 0 && N >= 8 && N <= int(cpu_cuda::kMaxWgmmaN),
                  "wgmma_ss: N a multiple of 8 to 256");
    static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16");
    constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
    cpu_cuda::this_worker->wgmma<T>(&d[0][0], N, nullptr, a_desc, TRANS_A, b_desc, TRANS_B, accumulate,
                                    {bf16 ? "wgmma_ss (bf16)" : "wgmma_ss (fp16)", file, line});
}
template <class T, int N, bool TRANS_A = false, bool TRANS_B = false>  // D = A B (on the GPU, D
inline void wgmma_ss_first(float (&d)[N / 8][4], uint64_t a_desc, uint64_t b_desc,  // written only)
                           CPU_CUDA_SITE) {
    wgmma_ss<T, N, TRANS_A, TRANS_B>(d, a_desc, b_desc, false, file, line);
}
template <class T, int N>
inline void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], uint64_t b_desc, bool accumulate,
                     CPU_CUDA_SITE) {
    static_assert(N % 8 == 0 && N >= 8 && N <= int(cpu_cuda::kMaxWgmmaN),
                  "wgmma_rs: N a multiple of 8 to 256");
    static_assert(std::is_same_v<T, __nv_bfloat16> || std::is_same_v<T, __half>, "bf16 or fp16");
    constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
    cpu_cuda::this_worker->wgmma<T>(&d[0][0], N, a, 0, false, b_desc, true, accumulate,
                                    {bf16 ? "wgmma_rs (bf16)" : "wgmma_rs (fp16)", file, line});
}
#undef CPU_CUDA_SITE

// LAUNCH(kernel, grid, block, shared_bytes, stream)(args...) stands for
// kernel<<<grid, block, shared_bytes, stream>>>(args...).
template <class Kernel>
struct CpuLaunch {
    Kernel* kernel;
    dim3 grid, block;
    size_t shared_bytes;
    const char* text;  // the kernel as LAUNCH was given it

    template <class... Args>
    void operator()(Args... args) const {
        // A GPU's limits: 1024 threads per block, at most 1024 along x or y and 64 along z; a grid of up
        // to 2^31 - 1 blocks along x, 65535 along y and z. (Counted in 64 bits: no product wraps.)
        const unsigned long long threads = (unsigned long long)block.x * block.y * block.z;
        const unsigned long long blocks = (unsigned long long)grid.x * grid.y * grid.z;
        size_t limit = kDefaultSharedBytes;
        {
            std::lock_guard<std::mutex> lock(cpu_shared_limit_mutex);
            auto opted = cpu_shared_limit.find((const void*)kernel);
            if (opted != cpu_shared_limit.end()) limit = opted->second;
        }
        if (threads == 0 || threads > 1024 || block.x > 1024 || block.y > 1024 || block.z > 64 || blocks == 0 ||
            grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535 || shared_bytes > limit) {
            cpu_set_error(cudaErrorInvalidConfiguration);  // what the GPU reports for these
            return;
        }
        auto body = [&] { kernel(args...); };  // each thread calls the kernel with its own copies
        cpu_cuda::Launch launch;
        launch.kernel_address = reinterpret_cast<const void*>(kernel), launch.kernel_text = text;
        launch.grid = grid, launch.block = block, launch.threads = unsigned(threads), launch.blocks = blocks;
        launch.shared_bytes = shared_bytes;
        launch.body = [](const void* f) { (*static_cast<const decltype(body)*>(f))(); };
        launch.arguments = &body;
        cpu_cuda::run_launch(launch);
        if (launch.error != cudaSuccess) cpu_set_error(launch.error, launch.message);
    }
};
#define LAUNCH(kernel, grid, block, shared_bytes, stream) \
    CpuLaunch<std::remove_pointer_t<decltype(kernel)>> { kernel, grid, block, shared_bytes, #kernel }
// A launch that may overlap the kernel before it on the GPU (programmatic dependent launch): here
// launches run one after the other, each to its end, so it is an ordinary one, and the kernels'
// launch_dependents and wait_for_prior_grid (kernels/hopper.cuh) have nothing to do.
#define LAUNCH_AFTER LAUNCH
inline void launch_dependents() {}
inline void wait_for_prior_grid() {}

// A float4 or float2 copied from or to an address that is not a multiple of its size (see float4): in
// a kernel's thread, the launch fails ("misaligned address", as on a GPU); in host code, nothing.
inline void cpu_cuda_misaligned(const void* address, unsigned size, bool store, const char* file, int line) {
    cpu_cuda::Worker* worker = cpu_cuda::this_worker;
    if (!worker || !worker->current) return;
    char text[160];
    std::snprintf(text, sizeof text, "a %u-byte %s (float%u) at %p%s%s%s", size, store ? "store" : "load",
                  size / 4, address, *file ? " at " : "", *file ? cpu_cuda::short_path(file).c_str() : "",
                  *file ? (":" + std::to_string(line)).c_str() : "");
    worker->launch->fail(cudaErrorMisalignedAddress, "misaligned address: " + std::string(text) + " in " +
                                                         worker->thread_name() + ": the address must be a "
                                                         "multiple of " + std::to_string(size));
    worker->abandon_block();
}

// assert() in a kernel's thread fails the launch, as a GPU's device-side assert does (glibc's assert
// calls __assert_fail: this library's own, hidden, takes its place); elsewhere it aborts, as glibc's.
#if defined(__GLIBC__)
extern "C" __attribute__((weak)) void __assert_fail(const char* assertion, const char* file, unsigned line,
                                                    const char* function) noexcept {
    cpu_cuda::Worker* worker = cpu_cuda::this_worker;
    if (!worker || !worker->current) {
        std::fprintf(stderr, "%s:%u: %s: Assertion `%s' failed.\n", file, line, function, assertion);
        std::abort();
    }
    worker->launch->fail(cudaErrorAssert, "device-side assert triggered: " + cpu_cuda::short_path(file) + ":" +
                                              std::to_string(line) + ": " + function + ": Assertion `" +
                                              assertion + "' failed, in " + worker->thread_name());
    worker->abandon_block();
}
#endif

#pragma GCC visibility pop

// What another build's emulation asks of this one, walking a signal's chain of handlers (see
// join_signal_chains): where this library's handler of `signal` passes it on, if `handler` is that one.
extern "C" __attribute__((weak)) const struct sigaction* cpu_cuda_next_action_v1(int signal, void* handler) {
    const int i = signal == SIGINT ? 0 : signal == SIGSEGV ? 1 : signal == SIGBUS ? 2 : -1;
    const void* ours = i < 0 ? nullptr
                       : i == 0 ? reinterpret_cast<void*>(cpu_cuda::on_sigint)
                                : reinterpret_cast<void*>(cpu_cuda::on_fault);
    return ours && handler == ours ? &cpu_cuda::next_action[i] : nullptr;
}

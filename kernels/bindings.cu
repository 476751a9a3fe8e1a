// Host side: what every version shares. A build holds one version: minimal_flash.py compiles this
// file with -DVERSION_FILE=versionN.cuh, the version's home (its kernels, their launchers, shared
// memory and scratch), and, for the versions they shape, -DBR=.. -DBC=.. The version file is
// included in the middle, after what its launchers use:
//
//   Call            one call of a pass: the tensors' addresses, sizes, strides, options and stream
//   launch()        a checked launch: shared memory opted into, the launch error caught
//   versionN.cuh    struct Version { forward(Call), backward(Call), shared_bytes, scratch_floats,
//                                    GROUPED_HEADS, STRIDED, MODS }
//   mf_*            the C functions that minimal_flash.py calls through ctypes (a kernel file may add
//                   its own: version 3's build has chapter 5's mf_decode, flash_decode.cu; version 4's,
//                   mf_forward_consumers; a build with mods, chapter 6's mf_block_mask, at the end)
//
// Adding a version: its kernel files, its versionN.cuh, one row in minimal_flash.VERSIONS.
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
// LAUNCH_AFTER: the same, for a kernel that may start while the kernel before it on the stream is
// still running (programmatic dependent launch, sm_90: the one before lets it start with
// launch_dependents(), and it waits for that one's results with wait_for_prior_grid(); elsewhere the
// attribute is ignored and the launch is an ordinary one).
template <class... Params>
struct LaunchAfter {
    void (*kernel)(Params...);
    cudaLaunchConfig_t config;
    cudaLaunchAttribute attribute;
    template <class... Args>
    void operator()(Args... args) {
        attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
        attribute.val.programmaticStreamSerializationAllowed = 1;
        config.attrs = &attribute, config.numAttrs = 1;
        cudaLaunchKernelEx(&config, kernel, Params(args)...);
    }
};
template <class... Params>
static LaunchAfter<Params...> launch_after_(void (*kernel)(Params...), dim3 grid, dim3 block, size_t bytes,
                                            cudaStream_t stream) {
    return {kernel, {grid, block, bytes, stream, nullptr, 0}, {}};
}
#define LAUNCH_AFTER(kernel, grid, block, shared_bytes, stream) \
    launch_after_(kernel, grid, block, shared_bytes, stream)
static size_t max_shared_bytes(int device) {  // the most shared memory a block may opt into
    int bytes = 0;
    cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return bytes;
}
#else
#include "cpu_cuda.h"
#endif
#include "tiles.cuh"  // Br, Bc (-DBR, -DBC), ceil_div

// One call of a pass: the tensors' addresses (those the pass does not use are null), their sizes and
// layouts, and the stream. O and L are written by the forward, read by the backward. The addresses are
// typed float, the type of versions 1 and 2; versions 3 and 4 read them as 16-bit values (L stays float).
// q, k, v, dO, O, dQ, dK and dV come with their strides: contiguous for versions 1-3 (run() below
// checks it); in version 4 (Version::STRIDED), q, k, v, dO any that its tensor maps can describe, and
// O, dQ, dK, dV those of q, k and v (a model's (B, N, H, d), so that transposing them back is a view,
// not a copy). L is contiguous always.
enum DType { FLOAT32, BFLOAT16, FLOAT16 };  // minimal_flash.DTYPES
enum Pass { FORWARD, BACKWARD };            // minimal_flash.PASSES
struct Call {
    const float *Q, *K, *V, *dO;
    float *O, *L, *dQ, *dK, *dV;
    float* scratch;  // fp32, Version::scratch_floats per (batch, head) slice
    long long BH;    // B * H (batch, head) slices of N rows and d columns each
    int group;       // query heads per head of K and V (grouped-query heads; 1: as many), forward only
    int N, d;
    float scale;
    bool causal;
    bool deterministic;  // the backward's dQ the same bits run to run (version 4's mode)
    int dtype;           // of Q, K, V, O, dO, dQ, dK, dV: a DType
    int device;          // the GPU the tensors are on
    cudaStream_t stream;
    int H = 0;  // q's heads: B = BH / H; k's and v's: H / group
    Strides Q_strides{}, K_strides{}, V_strides{}, dO_strides{}, O_strides{};  // in values (tiles.cuh)
    Strides dQ_strides{}, dK_strides{}, dV_strides{};                          // (the backward's outputs)
    // Sequences packed without padding (version 3's mf_varlen; null: the layout above): q, O (total_q,
    // H, d), k, v (total_k, H / group, d), L (total_q, H); sequence b's rows cu_seqlens_q[b] ..
    // cu_seqlens_q[b + 1] - 1 of q (of k likewise). N and Nk are then the longest sequence's queries
    // and keys (the grid's size), BH = B * H, and rows = total_q * H, the rows of d values in q.
    const int *cu_seqlens_q = nullptr, *cu_seqlens_k = nullptr;
    int Nk = 0;
    long long rows = 0;
    bool packed() const { return cu_seqlens_q != nullptr; }
    // Chapter 6: a mods::Args (kernels/mods.cuh) for a build with mods (versions 3 and 4); null: none.
    const void* mods = nullptr;
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

// Every launch is checked: a bad configuration or a fault becomes a Python exception. AFTER: launched
// with LAUNCH_AFTER (see above), overlapping the kernel before it.
template <bool AFTER = false, class... Params, class... Args>
static std::string launch(const char* name, void (*kernel)(Params...), dim3 grid, int threads,
                          size_t shared_bytes, const Call& c, Args... args) {
    if (std::string err = reserve_shared(kernel, c.device, shared_bytes); !err.empty()) return err;
    if constexpr (AFTER)
        LAUNCH_AFTER(kernel, grid, dim3(threads), shared_bytes, c.stream)(args...);
    else
        LAUNCH(kernel, grid, dim3(threads), shared_bytes, c.stream)(args...);
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : name + std::string(" failed: ") + cudaGetErrorString(err);
}

// Versions 3 and 4: bf16 and fp16 travel as their raw 16 bits.
static const unsigned short* bits(const float* p) { return reinterpret_cast<const unsigned short*>(p); }
static unsigned short* bits(float* p) { return reinterpret_cast<unsigned short*>(p); }

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

// Versions 2 and 3: one column of blocks per (batch, head) slice, grid.y, at most 65535 of them.
[[maybe_unused]] static std::string grid_column_error(long long BH) {
    if (BH <= 65535) return "";
    return "B * H = " + std::to_string(BH) + " is more than the 65535 blocks a grid column may have";
}

// Versions 3 and 4, bf16 and fp16 on tensor cores: what their kernels cannot take. head_dims: the d
// they are compiled for, as a list in words.
[[maybe_unused]] static std::string half_precision_error(const Call& c, int version, bool head_dim_ok,
                                                         const char* head_dims) {
    const std::string takes = "version " + std::to_string(version) + " takes ";
    if (c.dtype == FLOAT32) return takes + "bfloat16 or float16 tensors, not float32";
    if (!head_dim_ok) return takes + "head dim d = " + head_dims + ", not " + std::to_string(c.d);
    // The kernels take the running max of unscaled scores, right only for scale >= 0; and at scale 0
    // a masked score's exponent would be -inf * 0 = NaN.
    if (c.scale <= 0) return takes + "softmax_scale > 0, not " + std::to_string(c.scale);
    return "";
}

// Launches go to the current device: switch to the tensors' one for a call, and back at its end.
// cudaSetDevice even where it is already the current one: it also makes the device's context current
// in this thread (CUDA 12), which the driver's cuTensorMapEncodeTiled (version 4) needs and the
// runtime's calls would only do lazily. A thread whose first CUDA work is ours, such as autograd's
// backward thread or a new Python thread, otherwise gets CUDA_ERROR_INVALID_CONTEXT (201) there.
struct OnDevice {
    int previous = 0, device;
    explicit OnDevice(int device) : device(device) {
        cudaGetDevice(&previous);
        cudaSetDevice(device);
    }
    ~OnDevice() {
        if (previous != device) cudaSetDevice(previous);
    }
};

// The version this build holds (its kernel files may add launchers of their own when they see this).
#define MINIMAL_FLASH_BINDINGS
#define MF_QUOTE(file) #file
#define MF_FILE(file) MF_QUOTE(file)
#include MF_FILE(VERSION_FILE)

// The strides of a contiguous (B, heads, N, d) tensor.
static Strides contiguous_strides(long long heads, long long N, long long d) {
    return {heads * N * d, N * d, d};
}

// Are q, k, v, O (and, backward, dO, dQ, dK, dV) contiguous (B, H, N, d) tensors (k, v: of H / group
// heads)?
static bool contiguous(int pass, const Call& c) {
    const Strides q = contiguous_strides(c.H, c.N, c.d), kv = contiguous_strides(c.H / c.group, c.N, c.d);
    const auto is = [](const Strides& s, const Strides& t) {
        return s.batch == t.batch && s.head == t.head && s.row == t.row;
    };
    return is(c.Q_strides, q) && is(c.K_strides, kv) && is(c.V_strides, kv) && is(c.O_strides, q) &&
           (pass == FORWARD ||
            (is(c.dO_strides, q) && is(c.dQ_strides, q) && is(c.dK_strides, kv) && is(c.dV_strides, kv)));
}

static const char* run(int pass, const Call& call) {
    static thread_local std::string message;  // lives until the next call from this thread
    const OnDevice on(call.device);
    // Grouped-query heads: the forward kernels of versions that read K, V by group (GROUPED_HEADS);
    // minimal_flash.py hands every backward K and V with q's heads (it sums dK, dV over the group).
    const bool bad_group = call.group != 1 && (pass != FORWARD || !Version::GROUPED_HEADS || call.group < 1 ||
                                               call.H % call.group != 0);
    const bool bad_heads = call.H < 1 || call.BH % call.H != 0;
    // Strided q, k, v, dO, O, dQ, dK, dV: the versions that take them (STRIDED: tensor maps); the others
    // index rows with fixed strides, and minimal_flash.py hands them contiguous tensors.
    const bool bad_layout = !Version::STRIDED && !bad_group && !contiguous(pass, call);
    const bool bad_mods = (call.mods != nullptr) != Version::MODS;  // mods: a build with mods
    message = bad_heads    ? "internal error: " + std::to_string(call.BH) + " slices of " +
                                 std::to_string(call.H) + " heads"
              : bad_group  ? "internal error: " + std::to_string(call.group) + " query heads per head of k, v"
              : bad_layout ? "internal error: this version takes contiguous q, k, v, dO, O, dQ, dK, dV only"
              : bad_mods   ? "internal error: mods for a build without them, or none for a build with them"
              : pass == FORWARD  ? Version::forward(call)
              : pass == BACKWARD ? Version::backward(call)
                                 : "no pass " + std::to_string(pass);
    return message.c_str();
}

// mf_run's arguments, one record: minimal_flash.Kernels.call packs these fields in this order, 8 bytes
// each (its RUN_ARGS), and passes their address. One argument, not 47: ctypes converts each argument of
// every call, host time that a small kernel's launch waits for.
struct RunArgs {
    long long pass;  // a Pass
    const float *Q, *K, *V;
    float* O;
    const float* dO;
    float *L, *dQ, *dK, *dV, *scratch;  // those the pass does not use: null
    long long B, H, N, d, group;        // q's batch and heads; k's and v's heads are H / group
    long long strides[8][3];            // q's, k's, v's, dO's, O's, dQ's, dK's, dV's (batch, head, row)
                                        // strides as torch has them (0s for a tensor the pass has not)
    double scale;
    long long causal, deterministic;
    const void* mods;         // a mods::Args (kernels/mods.cuh) for a build with mods, else null
    long long dtype, device;  // a DType; the GPU the tensors are on (0 on the CPU)
    void* stream;             // the stream to launch on (null on the CPU)
};
static_assert(sizeof(RunArgs) == 47 * 8, "47 fields of 8 bytes, as minimal_flash.RUN_ARGS packs them");

// A (B, heads, N, d) tensor's strides as the kernels take them: a dim of size 1 is never stepped along,
// and torch may give it any stride (its is_contiguous ignores it too): here a contiguous tensor's.
static Strides kernel_strides(const long long (&s)[3], long long B, long long heads, long long N, long long d) {
    const Strides dense = contiguous_strides(heads, N, d);
    return {B > 1 ? s[0] : dense.batch, heads > 1 ? s[1] : dense.head, N > 1 ? s[2] : dense.row};
}

extern "C" {
int mf_block_size(int which) { return which == 0 ? Br : Bc; }  // 0: Br, 1: Bc
long long mf_device_shared_bytes(int device) { return max_shared_bytes(device); }
long long mf_run_args_bytes() { return sizeof(RunArgs); }  // what minimal_flash.py checks its packing against

// The least shared memory a block of this pass needs at head dim d (one thread group), and the
// scratch floats it needs per (batch, head) slice of N rows.
long long mf_shared_bytes(int pass, int d) { return Version::shared_bytes(Pass(pass), d); }
long long mf_scratch_floats(int pass, int N, int d) { return Version::scratch_floats(Pass(pass), N, d); }

// Forward (pass 0): O = softmax(scale * Q K^T) V and L = the rows' log-sum-exp, into O and L.
// Backward (pass 1): dQ, dK, dV of the loss, given dO and the forward's O and L; `deterministic`: dQ
// the same bits run to run, where the version has such a mode (version 4).
// Versions 1-3 take q, k, v, dO, O, dQ, dK, dV contiguous (run() checks it); version 4, q, k, v, dO with
// any strides its tensor maps can describe, and O, dQ, dK, dV with q's, k's, v's layouts (Python
// allocates them so).
const char* mf_run(const RunArgs* a) {
    const long long B = a->B, H = a->H, N = a->N, d = a->d, heads_kv = a->group > 0 ? H / a->group : H;
    // clang-format off: one line per kind of field, as Call declares them
    Call call{a->Q, a->K, a->V, a->dO, a->O, a->L, a->dQ, a->dK, a->dV, a->scratch,
              B * H, int(a->group), int(N), int(d), float(a->scale), a->causal != 0, a->deterministic != 0,
              int(a->dtype), int(a->device), cudaStream_t(a->stream)};
    // clang-format on
    call.H = int(H), call.mods = a->mods;
    call.Q_strides = kernel_strides(a->strides[0], B, H, N, d);
    call.K_strides = kernel_strides(a->strides[1], B, heads_kv, N, d);
    call.V_strides = kernel_strides(a->strides[2], B, heads_kv, N, d);
    call.dO_strides = kernel_strides(a->strides[3], B, H, N, d);
    call.O_strides = kernel_strides(a->strides[4], B, H, N, d);
    call.dQ_strides = kernel_strides(a->strides[5], B, H, N, d);
    call.dK_strides = kernel_strides(a->strides[6], B, heads_kv, N, d);
    call.dV_strides = kernel_strides(a->strides[7], B, heads_kv, N, d);
    return run(int(a->pass), call);
}
}

#ifdef MODS_FILE  // a build with mods (versions 3 and 4)
// Chapter 6: the block mask of a build with a mask_mod (kernels/mods.cuh, mods::block_mask): for N
// queries and keys, B_mask x H_mask (b, h) pairs, into `out` (B_mask, H_mask, N / 64, N / 64 rounded
// up), on the device's stream. `args`: the call's mods::Args.
extern "C" const char* mf_block_mask(const void* args, int N, int shift, int B_mask, int H_mask,
                                     unsigned char* out, int device, void* stream) {
    static thread_local std::string message;
    Call c{};  // launch() takes the device and stream from a Call
    c.device = device, c.stream = cudaStream_t(stream);
    if (!mods::MASK || !args || N < 1 || B_mask < 1 || H_mask < 1) {
        message = "internal error: a block mask without a mask_mod, or of no tiles";
    } else {
        const OnDevice on(device);
        const int tiles = ceil_div(N, mods::TILE);
        message =
            launch("mods::block_mask", mods::block_mask, dim3(tiles, tiles, B_mask * H_mask), mods::TILE,
                   mods::block_mask_shared_bytes(), c, mods::of(args), N, shift, B_mask, H_mask, out);
    }
    return message.c_str();
}
#endif

// Version 4, chapter 4: FlashAttention-3's techniques on Hopper (TMA, mbarriers, wgmma, warp
// specialization, ping-pong), bf16 and fp16 with fp32 accumulation. Hopper only: built for sm_90a
// (minimal_flash.py passes -gencode=arch=compute_90a,code=sm_90a), run on compute capability 9.0.
//
//   forward   flash3_hopper.cu         a block per multiprocessor, taking work tiles (batch, head, 128
//                                      query rows) until none is left: a producer warpgroup (TMA)
//                                      and two consumer warpgroups (wgmma) of 64 rows; three, and
//                                      192 rows, at d = 64 where consumers() says
//   backward  flash3_hopper_backward.cu  one block per (batch, head, 128 keys): two warpgroups of 64 keys,
//                                      all five products on wgmma, dQ added by the copy engine into
//                                      fp32 sums, zeroed by a pre-pass that also takes D, then converted
//
// Layouts: q, k, v (and the backward's dO) are read by the copy engine through 4-D tensor maps,
// (column, row, head, batch) with the tensors' own strides (tensor_map, below): any layout whose rows
// are d contiguous values, 16-byte aligned, a multiple of 16 bytes apart, a model's permuted views
// among them, runs uncopied (the pre-pass reads dO with the same strides). O is written by the
// kernels' own stores in q's layout (minimal_flash.py allocates it so: a model's (B, N, H, d), whose
// transpose back to (B, N, H d) is a view, not a copy), and read so by the pre-pass; dQ, dK, dV
// likewise in q's, k's, v's; L is a contiguous (B, H, N) tensor.
// Block sizes: its own (Br and Bc do not apply). Head dims d = 64 and 128. softmax_scale > 0.
// Scratch: the forward's counter of work tiles taken; the backward's dQ sums, D, the deterministic
// counters (scratch_floats). bindings.cu includes this file in its middle: Call and launch are defined
// there.
#include <cstdint>
#include <tuple>
#include "flash3_hopper.cu"

#include "flash3_hopper_backward.cu"

#ifdef __CUDACC__
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000

// cuTensorMapEncodeTiled is the driver's, not the runtime's: found once through the runtime's entry
// point, so that the build links nothing more than the runtime.
static PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
    static const PFN_cuTensorMapEncodeTiled_v12000 function = [] {
        void* f = nullptr;
        cudaDriverEntryPointQueryResult found{};
        const cudaError_t err =
            cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found);
        return err == cudaSuccess && found == cudaDriverEntryPointSuccess
                   ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f)
                   : nullptr;
    }();
    return function;
}

// What the CUDA runtime says of a device, asked once per (device, attribute): a question costs microseconds
// of host time per call.
static int device_attribute(int device, cudaDeviceAttr attribute) {
    static std::mutex mutex;
    static std::map<std::pair<int, int>, int> known;
    std::lock_guard<std::mutex> lock(mutex);
    const auto key = std::pair{device, int(attribute)};
    if (!known.count(key)) cudaDeviceGetAttribute(&known[key], attribute, device);
    return known[key];
}
// The GPU's compute capability, major * 10 + minor.
static int capability(int device) {
    return 10 * device_attribute(device, cudaDevAttrComputeCapabilityMajor) +
           device_attribute(device, cudaDevAttrComputeCapabilityMinor);
}
// The GPU's multiprocessors: a persistent kernel's blocks.
static int multiprocessors(int device) {
    return std::max(device_attribute(device, cudaDevAttrMultiProcessorCount), 1);
}
#else
static auto encode_tiled() { return &cuTensorMapEncodeTiled; }  // cpu_cuda.h's
static int capability(int) { return 90; }                       // the emulation has Hopper's instructions
static int multiprocessors(int) { return int(cpu_cuda::cpu_workers()); }  // a block at a time per worker
#endif

// Q, K, V or dO as the copy engine sees it: a 4-D tensor of 16-bit values (x: column, y: row, z: head,
// w: batch) of sizes (d, N, heads, B) and the tensor's own strides (in bytes, of y, z and w), read in
// boxes of `rows` rows x 64 columns (128 bytes), written into shared memory with the 128-byte swizzle
// that wgmma reads. A box that reaches past row N is zero-filled there: the next head's rows are
// never read. The strides make any layout whose rows are d contiguous values, 16-byte aligned and a
// multiple of 16 bytes apart (the driver's rule) one more map: a model's q, k, v, permuted views of
// one (B, T, 3, H, d) projection (notebook 7's GPT), and the gradient of its output, (B, T, H, d)
// viewed as (B, H, T, d), are read where they lie. Copying them into contiguous tensors first cost
// ~0.8 ms of a 10 ms training step on an H200 (24 copy kernels a step); minimal_flash.py copies only
// what no tensor map can describe.
static std::string tensor_map(CUtensorMap* map, const float* data, const Strides& s, int heads, const Call& c,
                              int rows) {
    const cuuint64_t dims[4] = {cuuint64_t(c.d), cuuint64_t(c.N), cuuint64_t(heads), cuuint64_t(c.BH / c.H)};
    const cuuint64_t strides[3] = {cuuint64_t(s.row) * 2, cuuint64_t(s.head) * 2, cuuint64_t(s.batch) * 2};
    const cuuint32_t box[4] = {64, cuuint32_t(rows), 1, 1}, element_steps[4] = {1, 1, 1, 1};
    const auto encode = encode_tiled();
    if (!encode)
        return "version 4: this CUDA driver has no cuTensorMapEncodeTiled (the copy engine's tensor maps)";
    const CUresult r = encode(
        map, c.dtype == BFLOAT16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
        const_cast<float*>(data), dims, strides, box, element_steps, CU_TENSOR_MAP_INTERLEAVE_NONE,
        CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
    return r == CUDA_SUCCESS
               ? ""
               : "version 4: cuTensorMapEncodeTiled failed (CUresult " + std::to_string(int(r)) + ")";
}

struct Version {
    static constexpr bool GROUPED_HEADS = true;  // the forward reads K, V by group (Call::group)
    static constexpr bool STRIDED = true;        // reads q, k, v, dO with their strides (tensor_map)
    static constexpr bool MODS = mods::HOOKED;   // a build with mods (-DMODS_FILE) takes a mods::Args
    static size_t shared_bytes(Pass pass, int d) {
        return pass == FORWARD ? flash3_hopper::shared_bytes(d) : flash3_hopper_backward::shared_bytes(d);
    }
    // Per (batch, head) slice. Forward, persistent: the counter of work tiles taken (an int, in the
    // first slice's float). Backward: dQ's fp32 sums (Tr query tiles of Br x d), D (N) and,
    // deterministic, a counter per query tile and consumer.
    static long long scratch_floats(Pass pass, int N, int d) {
        const long long tiles = ceil_div(N, flash3_hopper_backward::Br);
        return pass == FORWARD ? flash3_hopper::PERSISTENT : tiles * flash3_hopper_backward::Br * d + N + 2 * tiles;
    }

    static std::string forward(const Call& c) {
        if (std::string err = error(c); !err.empty()) return err;
        if (c.dtype == BFLOAT16) return c.d == 64 ? forward_64<__nv_bfloat16>(c) : run<__nv_bfloat16, 128, 2>(c);
        return c.d == 64 ? forward_64<__half>(c) : run<__half, 128, 2>(c);
    }
    // The consumer warpgroups of a forward: two, or at d = 64 three of 64 rows (work tiles of 192) where
    // the work is long and the tiles many: a third consumer hides more of each one's softmax under the
    // others' products, but a 192-row tile computes more of the causal diagonal than a 128-row one, and
    // where the tiles are few the last round of them leaves multiprocessors idle longer (notebook 8, step
    // 6 measures both). Hence: N >= 4096, and at least 4 work tiles of 192 rows per multiprocessor.
    // (mf_forward_consumers, below, asks it for the tests; tools/sanitize.py's build,
    // -DTHREE_CONSUMERS_ALWAYS, takes three at every d = 64, so that launches small enough for racecheck
    // run them.)
    static int consumers(const Call& c) {
        if (!flash3_hopper::THREE_AT_64 || c.d != 64) return 2;
#ifdef THREE_CONSUMERS_ALWAYS
        return 3;
#else
        const long long tiles = ceil_div(c.N, flash3_hopper::Br<3>) * c.BH;
        return c.N >= 4096 && tiles >= 4LL * multiprocessors(c.device) ? 3 : 2;
#endif
    }
    template <class T>
    static std::string forward_64(const Call& c) {
        if constexpr (flash3_hopper::THREE_AT_64)
            if (consumers(c) == 3) return run<T, 64, 3>(c);
        return run<T, 64, 2>(c);
    }
    static std::string backward(const Call& c) {
        if (std::string err = error(c); !err.empty()) return err;
        if (c.dtype == BFLOAT16)
            return c.d == 64 ? run_backward<__nv_bfloat16, 64>(c) : run_backward<__nv_bfloat16, 128>(c);
        return c.d == 64 ? run_backward<__half, 64>(c) : run_backward<__half, 128>(c);
    }

    // What the kernels cannot take (minimal_flash.py checks these first, with the same words).
    static std::string error(const Call& c) {
        if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
        if (const int cc = capability(c.device); cc != 90)
            return "version 4 needs a Hopper GPU (compute capability 9.0); this one is " +
                   std::to_string(cc / 10) + "." + std::to_string(cc % 10);
        if (std::string err = half_precision_error(c, 4, c.d == 64 || c.d == 128, "64 or 128"); !err.empty())
            return err;
        // A tensor (if given) not 16-byte aligned, or its rows, heads or batches not a multiple of 16 bytes apart.
        auto misaligned = [](const void* p, const Strides& s) {
            return p && (reinterpret_cast<uintptr_t>(p) % 16 != 0 || s.batch % 8 || s.head % 8 || s.row % 8);
        };
        // The copy engine reads from 16-byte aligned addresses only, rows a multiple of 16 bytes apart.
        for (auto [p, s] :
             {std::pair{c.Q, c.Q_strides}, {c.K, c.K_strides}, {c.V, c.V_strides}, {c.dO, c.dO_strides}})
            if (misaligned(p, s))
                return "version 4 needs q, k, v, dO 16-byte aligned, their strides multiples of 16 bytes";
        // O, dQ, dK, dV, which minimal_flash.py allocates in q's, k's, v's layouts: stored (and O read)
        // 4 and 16 bytes at a time.
        for (auto [p, s] : {std::pair{c.O, c.O_strides}, {c.dQ, c.dQ_strides}, {c.dK, c.dK_strides},
                            {c.dV, c.dV_strides}})
            if (misaligned(p, s))
                return "internal error: version 4's O, dQ, dK, dV must be 16-byte aligned, their strides "
                       "multiples of 16 bytes";
        return "";
    }

    template <class T, int d, int C>
    static std::string run(const Call& c) {
        namespace fw = flash3_hopper;
        CUtensorMap tmQ, tmK, tmV;
        const int kv_heads = c.H / c.group;
        for (auto [map, data, strides, heads, rows] : {std::tuple{&tmQ, c.Q, c.Q_strides, c.H, fw::Br<C>},
                                                       {&tmK, c.K, c.K_strides, kv_heads, fw::Bc},
                                                       {&tmV, c.V, c.V_strides, kv_heads, fw::Bc}})
            if (std::string err = tensor_map(map, data, strides, heads, c, rows); !err.empty()) return err;
        // The work tiles (flash3_hopper::work_tile), a block each, or, persistent, a block per
        // multiprocessor (only one fits: its registers) taking them one after the other. In sections of
        // slices whose K and V take at most SECTION_BYTES, a third of the L2 cache of an H100 or H200.
        constexpr long long SECTION_BYTES = 16 << 20;
        const long long tiles = ceil_div(c.N, fw::Br<C>) * c.BH, kv_bytes = 2LL * c.N * d * 2;
        const int section = int(std::clamp(SECTION_BYTES / kv_bytes * c.group, 1LL, c.BH));
        if (tiles > INT_MAX)
            return "version 4: B * H * ceil(N / " + std::to_string(fw::Br<C>) + ") = " + std::to_string(tiles) +
                   " is too many";
        int* taken = reinterpret_cast<int*>(c.scratch);
        if (fw::PERSISTENT && !taken) return "internal error: version 4's forward needs its scratch";
        if (fw::PERSISTENT && cudaMemsetAsync(taken, 0, sizeof(int), c.stream) != cudaSuccess)
            return "zeroing the work counter failed: " + std::string(cudaGetErrorString(cudaGetLastError()));
        const int blocks = fw::PERSISTENT ? int(std::min<long long>(tiles, multiprocessors(c.device))) : int(tiles);
        return launch("flash3_hopper::forward", fw::forward<T, d, C>, dim3(blocks), fw::THREADS<C>,
                      fw::Shared<d, C>::bytes,
                      c, tmQ, tmK, tmV, c.N, c.H, int(c.BH), c.group, section, c.scale, c.causal, bits(c.O),
                      c.O_strides, c.L, taken, mods::of(c.mods));
    }

    // D = rowsum(dO * O) with the fp32 sums of dQ and the counters set to 0, the pass, dQ converted.
    template <class T, int d>
    static std::string run_backward(const Call& c) {
        namespace bw = flash3_hopper_backward;
        const long long rows = c.BH * c.N, tiles = c.BH * ceil_div(c.N, bw::Br), sums = tiles * bw::Br * d;
        float *dQ_sum = c.scratch, *D = c.scratch + sums;
        int* turns = reinterpret_cast<int*>(D + rows);  // deterministic: counters, from 0
        // K and V come with q's heads here (bindings.cu refuses a backward of grouped heads).
        CUtensorMap tmK, tmV, tmQ, tmdO;
        for (auto [map, data, strides, box_rows] : {std::tuple{&tmK, c.K, c.K_strides, bw::Bc},
                                                    {&tmV, c.V, c.V_strides, bw::Bc},
                                                    {&tmQ, c.Q, c.Q_strides, bw::Br},
                                                    {&tmdO, c.dO, c.dO_strides, bw::Br}})
            if (std::string err = tensor_map(map, data, strides, c.H, c, box_rows); !err.empty()) return err;
        const size_t padded_rows = tiles * bw::Br;  // a warp each, 8 to a block
        std::string err = launch("flash3_hopper_backward::preprocess", bw::preprocess<T, d>,
                                 dim3((padded_rows + 7) / 8), 256, 0, c, bits(c.O), c.O_strides, bits(c.dO),
                                 c.dO_strides, c.H, c.N, int(ceil_div(c.N, bw::Br)), padded_rows, D, dQ_sum, turns);
        if (err.empty())
            err = launch("flash3_hopper_backward::backward", bw::backward<T, d>,
                         dim3(ceil_div(c.N, bw::Bc), c.BH), bw::THREADS, bw::shared_bytes(d), c, tmK, tmV,
                         tmQ, tmdO, c.L, D, c.N, c.H, c.scale, c.causal, dQ_sum, bits(c.dK), c.dK_strides,
                         bits(c.dV), c.dV_strides, c.deterministic, turns, mods::of(c.mods));
        const size_t chunks = sums / 4;
        if (err.empty())
            err =
                launch("flash3_hopper_backward::convert_dQ", bw::convert_dQ<T, d>, dim3((chunks + 255) / 256),
                       256, 0, c, dQ_sum, chunks, c.H, c.N, int(ceil_div(c.N, bw::Br)), c.scale, bits(c.dQ),
                       c.dQ_strides);
        return err;
    }
};

// The consumer warpgroups of the forward for BH (batch, head) slices of N rows at head dim d on this
// device (on the CPU: its workers), as Version::consumers chooses them: a test asks it, not a copy of
// the rule, and so knows which kernel it ran.
extern "C" int mf_forward_consumers(long long BH, int N, int d, int device) {
    Call c{};
    c.BH = BH, c.N = N, c.d = d, c.device = device;
    return Version::consumers(c);
}

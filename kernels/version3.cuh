// Version 3, chapter 3: FlashAttention-2's loop order on tensor cores (mma.sync), bf16 and fp16 with
// fp32 accumulation.
//
//   forward   flash2_mma.cu            one block per (batch, head, 128 query rows), 4 warps of 32 rows
//                                      (above d = 128, 8 warps of 16)
//   backward  flash2_mma_backward.cu   D = rowsum(dO * O) (a thread per row) and fp32 sums of dQ set
//                                      to 0; one block per (batch, head, 128 keys), 8 warps of 16
//                                      keys (above d = 128, 64 keys, two warps on each 16, each with
//                                      half the columns), adding into the sums by atomics; dQ
//                                      converted to T
//   decode    flash_decode.cu          chapter 5: a few query rows against a KV cache (contiguous or
//                                      paged), split over the keys, then the splits combined; its
//                                      own C function, mf_decode (minimal_flash.flash_attn_with_kvcache)
//   varlen    mf_varlen (below)        the forward and backward above on sequences of different lengths
//                                      packed without padding (minimal_flash.flash_attn_varlen_func)
//
// Chapter 5's decode kernels live in this build: they share chapter 3's mma.sync fragments
// (mma.cuh), dtypes and head dims, and are no new version (no row in minimal_flash.VERSIONS).
// Block sizes: its own (Br and Bc do not apply). Head dims d = 32, 64, 96, 128, 192 and 256 (a warp's
// fragments are arrays of d / 16 and d / 8, so each d is compiled; the backward's dQ_i is split in
// two halves of columns, each a whole number of 16-column products; above 128, the forward's blocks
// have twice the warps, each one row tile, and the backward's half the keys, two warps sharing each
// 16 keys' columns);
// minimal_flash pads a d in between up to the next. The decode kernels: 64 and 128. softmax_scale > 0.
// Scratch (fp32, per row): none (forward), dQ's sums (d) and D (1) (backward).
// bindings.cu includes this file in its middle: Call and launch are defined there.
#include "flash2_mma.cu"
#include "flash2_mma_backward.cu"
#include "flash_decode.cu"

struct Version {
    static constexpr bool GROUPED_HEADS = true;  // the forward reads K, V by group (Call::group)
    static constexpr bool STRIDED = false;       // reads contiguous q, k, v, dO only (Call's strides checked)
    static constexpr bool MODS = mods::HOOKED;   // a build with mods (-DMODS_FILE) takes a mods::Args
    static size_t shared_bytes(Pass pass, int d) {
        return pass == FORWARD ? flash2_mma::shared_bytes(d) : flash2_mma_backward::shared_bytes(d);
    }
    static long long scratch_floats(Pass pass, int N, int d) { return pass == FORWARD ? 0 : N * (d + 1LL); }

    static std::string forward(const Call& c) { return dispatch<Forward>(c); }
    static std::string backward(const Call& c) { return dispatch<Backward>(c); }

    // What the kernels cannot take (minimal_flash.py checks these first, with the same words).
    static std::string error(const Call& c) {
        if (std::string err = grid_column_error(c.BH); !err.empty()) return err;
        return half_precision_error(c, 3,
                                    (c.d % 32 == 0 && c.d >= 32 && c.d <= 128) || c.d == 192 || c.d == 256,
                                    "32, 64, 96, 128, 192 or 256");
    }

    // Launcher<T, d>::run for the call's dtype and d.
    template <template <class, int> class Launcher>
    static std::string dispatch(const Call& c) {
        if (std::string err = error(c); !err.empty()) return err;
        return c.dtype == BFLOAT16 ? with_head_dim<Launcher, __nv_bfloat16>(c)
                                   : with_head_dim<Launcher, __half>(c);
    }
    template <template <class, int> class Launcher, class T>
    static std::string with_head_dim(const Call& c) {
        switch (c.d) {
            case 32:
                return Launcher<T, 32>::run(c);
            case 64:
                return Launcher<T, 64>::run(c);
            case 96:
                return Launcher<T, 96>::run(c);
            case 128:
                return Launcher<T, 128>::run(c);
            case 192:
                return Launcher<T, 192>::run(c);
            default:
                return Launcher<T, 256>::run(c);  // error() took d = 256 only, then
        }
    }

    template <class T, int d>
    struct Forward {
        static std::string run(const Call& c) {
            namespace fw = flash2_mma;
            return launch("flash2_mma::forward", fw::forward<T, d>, dim3(ceil_div(c.N, fw::Br), c.BH),
                          32 * fw::warps(d), fw::shared_bytes(d), c, bits(c.Q), bits(c.K), bits(c.V), c.N,
                          c.group, c.cu_seqlens_q, c.cu_seqlens_k, c.H, c.scale, c.causal, bits(c.O), c.L,
                          mods::of(c.mods));
        }
    };

    template <class T, int d>
    struct Backward {
        static std::string run(const Call& c) { return flash2_mma_backward::run<T, d>(c); }
    };
};

// minimal_flash.flash_attn_varlen_func: a pass of the kernels above on sequences of different lengths
// packed without padding (bindings.cu's Call has the layout; tiles.cuh's slice_rows, the addressing).
// B sequences, H query heads, `group` of them per head of k, v (the forward's; the backward takes k, v
// with q's heads, as mf_run's); cu_seqlens_q, _k: (B + 1) row offsets; max_seqlen_q, _k: the
// longest sequence's queries and keys, the grid's size. Pass 0: forward, 1: backward, as mf_run.
// mod_args: a build with mods' mods::Args (the official window_size, softcap, alibi_slopes; b is the
// sequence, q_idx and kv_idx positions in it; a block mask where one serves every sequence, else none:
// every tile PARTIAL), else null.
extern "C" const char* mf_varlen(int pass, const float* Q, const float* K, const float* V, float* O,
                                 const float* dO, float* L, float* dQ, float* dK, float* dV, float* scratch,
                                 const int* cu_seqlens_q, const int* cu_seqlens_k, int B, int H, int group,
                                 int max_seqlen_q, int max_seqlen_k, long long total_q, int d, float scale,
                                 bool causal, const void* mod_args, int dtype, int device, void* stream) {
    static thread_local std::string message;         // lives until the next call from this thread
    Call c{Q, K, V, dO, O, L, dQ, dK, dV, scratch};  // the addresses; the rest by name
    c.BH = (long long)B * H, c.group = group, c.N = max_seqlen_q, c.d = d, c.scale = scale, c.causal = causal;
    c.dtype = dtype, c.device = device, c.stream = cudaStream_t(stream);
    c.cu_seqlens_q = cu_seqlens_q, c.cu_seqlens_k = cu_seqlens_k, c.H = H, c.Nk = max_seqlen_k;
    c.rows = total_q * H, c.mods = mod_args;
    if (!cu_seqlens_q || !cu_seqlens_k || B < 1 || H < 1 || group < 1 || H % group != 0 ||
        (pass != FORWARD && group != 1) || mods::HOOKED != (mod_args != nullptr)) {
        message = "internal error: packed sequences with " + std::to_string(H) + " query heads, " +
                  std::to_string(group) + " per head of k, v" +
                  (mods::HOOKED != (mod_args != nullptr) ? ", mods and the build disagree" : "");
    } else {
        const OnDevice on(device);
        message = pass == FORWARD ? Version::forward(c) : Version::backward(c);
    }
    return message.c_str();
}

// Hopper's own instructions (chapter 4), each a line or two of inline PTX; sm_90a for wgmma and
// setmaxnreg (minimal_flash.py builds version 4 with -gencode=arch=compute_90a,code=sm_90a).
// On the CPU, kernels/cpu_cuda.h defines the same functions with the same semantics.
//
//   TMA        the copy engine: one thread asks for a whole tile (a "box") of a tensor described by a
//              tensor map made on the host (its sizes and strides, up to 5 dimensions: any strided
//              layout whose strides are multiples of 16 bytes); it lands in shared memory, swizzled,
//              rows past the tensor's end zero-filled, and counts its bytes on an mbarrier.
//   mbarrier   a barrier in shared memory with a phase: it completes when its expected arrivals have
//              arrived AND its expected bytes (expect_tx) have landed; waiters wait on a phase's parity.
//   wgmma      a warpgroup (4 warps, 128 threads) multiplies a 64 x N tile by an N x 16 one, B (and A)
//              read straight from shared memory through 64-bit descriptors; asynchronous: issued,
//              committed as a group, waited for.
//   setmaxnreg a warpgroup gives registers back (the producer) or takes them (the consumers).
//   bar.sync   named barriers: a subset of the block's threads meets at barrier id 1..15.
//
// Layouts (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate Operation"):
//   Accumulator D (64 x N, fp32) of warpgroup thread t: warp w = t / 32 owns rows 16w .. 16w + 15,
//     and within them lane (g, q) = (lane / 4, lane % 4) holds, as mma.sync's C does (kernels/mma.cuh),
//     d[n][0..1] = D[16w + g][8n + 2q, 8n + 2q + 1], d[n][2..3] = D[16w + g + 8][8n + 2q, 8n + 2q + 1].
//   A from registers (64 x 16): a[0] = A[16w + g][2q, 2q + 1], a[1] = A[16w + g + 8][2q, 2q + 1],
//     a[2] = A[16w + g][2q + 8, 2q + 9], a[3] = A[16w + g + 8][2q + 8, 2q + 9], two 16-bit values
//     per register, the lower column in the low half: the layout of a_operands in kernels/mma.cuh.
//   Tiles in shared memory: rows of 64 16-bit values (128 bytes), 1024-byte aligned, with the 128-byte
//     swizzle (the 16-byte chunk c of row r stored at chunk c ^ (r % 8)): what TMA writes with
//     CU_TENSOR_MAP_SWIZZLE_128B and what a descriptor with swizzle mode 1 reads, with no bank
//     conflicts. A tile of d = 128 columns is two such tiles side by side: columns 0-63, then 64-127.
#pragma once
#include <cstdint>
#include <type_traits>
#include "tiles.cuh"  // smem

// A shared-memory address as the PTX instructions take it: 32 bits, counted from the start of the
// block's shared memory window.
#ifdef __CUDACC__
#include <cuda.h>  // CUtensorMap
__device__ inline unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
#else
inline unsigned shared_address(const void* p) {  // the emulation's shared memory: the worker's buffer
    return unsigned(reinterpret_cast<const char*>(p) - reinterpret_cast<const char*>(smem));
}
#endif

// The 64-bit matrix descriptor of a tile in shared memory, 128-byte swizzle (PTX ISA, "Matrix
// Descriptor Format"): bits 0-13 the start address / 16, 16-29 the leading-dimension byte offset
// (LBO) / 16, 32-45 the stride-dimension byte offset (SBO) / 16, 62-63 the swizzle mode (1: 128 bytes).
//   K-major (rows of K values, as Q_i and K_j): SBO = 1024, from one 8-row group to the next; LBO is
//     not used. Step k16 of a 64-column tile starts 32 bytes further (the swizzle is applied to the
//     address bits after that offset, so the step stays within each 128-byte row).
//   MN-major (rows of N values, as V_j read as the B of P V): SBO = 1024, from 8 rows of K to the
//     next 8; LBO, from one 64-column tile to the next (columns 64-127 of a d = 128 tile).
//   An MN-major A (rows of M values: the backward's dS read from dS^T) reads the same way, M for N;
//     at M = 64 its rows are one 128-byte tile and LBO is not reached.
__host__ __device__ inline uint64_t smem_descriptor(unsigned address, unsigned lbo_bytes,
                                                    unsigned sbo_bytes) {
    return uint64_t((address & 0x3FFFF) >> 4) | uint64_t((lbo_bytes & 0x3FFFF) >> 4) << 16 |
           uint64_t((sbo_bytes & 0x3FFFF) >> 4) << 32 | uint64_t(1) << 62;
}

#ifdef __CUDACC__  // on the CPU, cpu_cuda.h defines the same functions

// Version 3's build, for any GPU, holds chapter 5's decode kernel, whose bulk copies run only on sm_90:
// there the mbarrier and bulk-copy instructions it uses compile, for an older GPU, to a trap.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define SM90(...) __trap()
#else
#define SM90(...) __VA_ARGS__
#endif

// ---- mbarrier ------------------------------------------------------------------------------------
// init: `arrivals` arrivals complete a phase (with the bytes announced by expect_tx). The fence makes
// the initialized barrier visible to the copy engine, which completes bytes on it.
__device__ inline void mbarrier_init(uint64_t* bar, unsigned arrivals) {
    SM90(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals)));
}
__device__ inline void fence_mbarrier_init() {
    SM90(asm volatile("fence.mbarrier_init.release.cluster;" :: : "memory"));
}
__device__ inline void mbarrier_arrive(uint64_t* bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(shared_address(bar)) : "memory");
}
// One arrival that also announces `bytes` more to land in this phase (by TMA's complete_tx).
__device__ inline void mbarrier_arrive_expect_tx(uint64_t* bar, unsigned bytes) {
    SM90(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)),
                      "r"(bytes) : "memory"));
}
// Has the phase of this parity completed? A barrier starts in phase 0; waiting on parity 1 at the
// start returns at once (the phase "before" 0 counts as completed), which is how a producer's first
// wait for an empty buffer passes.
__device__ inline bool mbarrier_try_wait(uint64_t* bar, unsigned parity) {
    unsigned done = 1;
    SM90(
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, "
                     "1, 0, p;\n}" : "=r"(done) : "r"(shared_address(bar)),
                     "r"(parity) : "memory"));
    return done;
}
__device__ inline void mbarrier_wait(uint64_t* bar, unsigned parity) {
    while (!mbarrier_try_wait(bar, parity)) {
    }
}

// ---- TMA -----------------------------------------------------------------------------------------
// The box of `map` at coordinates (x, y, z) of a 3-D tensor map, or (x, y, z, w) of a 4-D one (x the
// innermost: columns, y rows; version 4's maps: z the head, w the batch) into shared memory at `to`,
// its bytes completed on `bar`. Issued by one thread.
__device__ inline void tma_load(void* to, const CUtensorMap* map, int x, int y, int z, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
        "%3, %4}], [%5];" ::"r"(shared_address(to)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(shared_address(bar))
        : "memory");
}
__device__ inline void tma_load(void* to, const CUtensorMap* map, int x, int y, int z, int w, uint64_t* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, "
        "%3, %4, %5}], [%6];" ::"r"(shared_address(to)),
        "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(z), "r"(w), "r"(shared_address(bar))
        : "memory");
}

// ---- flags between blocks ------------------------------------------------------------------------
// Polls until *flag == value, each read an acquire at GPU scope: what the block that set it did
// before its release (a bulk reduce it waited for) is visible after. The other side: release_increment.
__device__ inline void wait_until_equal(const int* flag, int value) {
    int now;
    do {
        asm volatile("ld.acquire.gpu.global.b32 %0, [%1];" : "=r"(now) : "l"(flag) : "memory");
    } while (now != value);
}
__device__ inline void release_increment(int* flag) {
    asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(flag) : "memory");
}

// ---- programmatic dependent launch (sm_90; on an older GPU, nothing) ------------------------------
// launch_dependents: the kernel launched after this one with LAUNCH_AFTER (kernels/bindings.cu) may
// start once every block of this one has said so or ended (its blocks then wait in
// wait_for_prior_grid, taking no time from this kernel's launch). wait_for_prior_grid: until the
// kernel before this one on the stream has ended and its writes are visible.
__device__ inline void launch_dependents() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ inline void wait_for_prior_grid() {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// ---- fences, registers, named barriers -----------------------------------------------------------
// Shared memory written by ordinary stores that wgmma or TMA (the "async proxy") reads next.
__device__ inline void fence_proxy_async() {
    SM90(asm volatile("fence.proxy.async.shared::cta;" :: : "memory"));
}
template <int R>
__device__ inline void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" ::"n"(R));
}
template <int R>
__device__ inline void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" ::"n"(R));
}
// `threads` threads (a multiple of 32) meet at barrier `id` (1-15; 0 is __syncthreads'): sync waits
// for all of them, arrive counts itself and goes on.
__device__ inline void named_barrier_sync(int id, int threads) {
    asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
__device__ inline void named_barrier_arrive(int id, int threads) {
    asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// ---- bulk copies (the copy engine without a tensor map) ---------------------------------------------
// Copies `bytes` (a multiple of 16) of global memory at `from` into shared memory at `to`, both
// 16-byte aligned, as one request to the copy engine; its bytes complete on `bar`, as a TMA box's do.
// Issued by one thread. (sm_90: chapter 5's decode kernel, in version 3's build, calls it only there.)
__device__ inline void bulk_load(void* to, const void* from, unsigned bytes, uint64_t* bar) {
    SM90(asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            shared_address(to)),
        "l"(from), "r"(bytes), "r"(shared_address(bar)) : "memory"));
}
// Adds `bytes` (a multiple of 16) of fp32 from shared memory into global memory, element by element
// and atomically, as one request to the copy engine (the backward's dQ: each block adds its share).
// Issued by one thread; commit groups its requests, wait_read<n> returns once all but the newest n
// groups have read their shared memory (which may then be overwritten). Both addresses 16-byte aligned.
__device__ inline void bulk_reduce_add(float* to, const float* from, unsigned bytes) {
    asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;" ::"l"(to),
                 "r"(shared_address(from)), "r"(bytes)
                 : "memory");
}
__device__ inline void bulk_commit() { asm volatile("cp.async.bulk.commit_group;" ::: "memory"); }
template <int n>
__device__ inline void bulk_wait_read() {
    asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(n) : "memory");
}
// wait<n>: until the global memory writes of all but the newest n groups are complete, too.
template <int n>
__device__ inline void bulk_wait() {
    asm volatile("cp.async.bulk.wait_group %0;" ::"n"(n) : "memory");
}

// ---- wgmma ---------------------------------------------------------------------------------------
// fence: before the first wgmma that reads registers (accumulators, A) written by other instructions.
// commit: the wgmma issued since the last commit become one group. wait<n>: until at most n groups
// are still running; only then may their accumulators be read, or their shared memory overwritten.
__device__ inline void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ inline void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int n>
__device__ inline void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;" ::"n"(n) : "memory");
}
// Keeps the compiler from moving reads or writes of accumulators across the asynchronous wgmma.
template <int NT>
__device__ inline void fence_operands(float (&d)[NT][4]) {
#pragma unroll
    for (int n = 0; n < NT; ++n)
#pragma unroll
        for (int i = 0; i < 4; ++i) asm volatile("" : "+f"(d[n][i])::"memory");
}

// The accumulators as inline-assembly operands: 4 per 8 columns.
#define MF_D4(n) "+f"(d[n][0]), "+f"(d[n][1]), "+f"(d[n][2]), "+f"(d[n][3])
#define MF_D16 MF_D4(0), MF_D4(1), MF_D4(2), MF_D4(3)
#define MF_D32 MF_D4(0), MF_D4(1), MF_D4(2), MF_D4(3), MF_D4(4), MF_D4(5), MF_D4(6), MF_D4(7)
#define MF_D64 MF_D32, MF_D4(8), MF_D4(9), MF_D4(10), MF_D4(11), MF_D4(12), MF_D4(13), MF_D4(14), MF_D4(15)
#define MF_W4(n) "=f"(d[n][0]), "=f"(d[n][1]), "=f"(d[n][2]), "=f"(d[n][3])  // written only
#define MF_W16 MF_W4(0), MF_W4(1), MF_W4(2), MF_W4(3)
#define MF_W32 MF_W4(0), MF_W4(1), MF_W4(2), MF_W4(3), MF_W4(4), MF_W4(5), MF_W4(6), MF_W4(7)
#define MF_W64 MF_W32, MF_W4(8), MF_W4(9), MF_W4(10), MF_W4(11), MF_W4(12), MF_W4(13), MF_W4(14), MF_W4(15)
#define MF_R16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define MF_R32                                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define MF_R64                                                                                              \
    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, " \
    "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, "  \
    "%42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, "  \
    "%62, %63}"
// D = A B (+ D if accumulate), A 64 x 16 and B 16 x N (given as N rows of 16, K-major) both from
// shared memory: "SS". Operands after the accumulators: %R the A descriptor, %R+1 B's, %R+2 accumulate,
// %R+3 and %R+4 the immediates that say A, B are MN-major instead ("transposed"; 16-bit types only).
#define MF_WGMMA_SS(N, TYPE, REGS, A, B, C, TA, TB, ...)                                            \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " C ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N \
                 "k16.f32." TYPE "." TYPE " " REGS ", " A ", " B ", p, 1, 1, " TA ", " TB ";\n}"    \
                 : __VA_ARGS__                                                                      \
                 : "l"(a_desc), "l"(b_desc), "r"(int(accumulate)), "n"(int(TRANS_A)), "n"(int(TRANS_B)))
// Its cases by N and type, the accumulators given as D16, D32, D64 (MF_D: read and written; MF_W:
// written only).
#define MF_WGMMA_SS_CASES(D16, D32, D64)                                                                    \
    if constexpr (N == 32 && bf16) MF_WGMMA_SS(32, "bf16", MF_R16, "%16", "%17", "%18", "%19", "%20", D16); \
    if constexpr (N == 32 && !bf16) MF_WGMMA_SS(32, "f16", MF_R16, "%16", "%17", "%18", "%19", "%20", D16); \
    if constexpr (N == 64 && bf16) MF_WGMMA_SS(64, "bf16", MF_R32, "%32", "%33", "%34", "%35", "%36", D32); \
    if constexpr (N == 64 && !bf16) MF_WGMMA_SS(64, "f16", MF_R32, "%32", "%33", "%34", "%35", "%36", D32); \
    if constexpr (N == 128 && bf16)                                                                         \
        MF_WGMMA_SS(128, "bf16", MF_R64, "%64", "%65", "%66", "%67", "%68", D64);                           \
    if constexpr (N == 128 && !bf16) MF_WGMMA_SS(128, "f16", MF_R64, "%64", "%65", "%66", "%67", "%68", D64)
// D = A B (+ D), A from registers (a[4], the layout above), B 16 x N from shared memory, MN-major
// (rows of N values: "transposed", the last immediate): "RS".
#define MF_WGMMA_RS(N, TYPE, REGS, A0, B, C, ACC)                                                   \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " C ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N \
                 "k16.f32." TYPE "." TYPE " " REGS ", " A0 ", " B ", p, 1, 1, 1;\n}"                \
                 : ACC                                                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(int(accumulate)))

template <class T, int N, bool TRANS_A = false, bool TRANS_B = false>
__device__ inline void wgmma_ss(float (&d)[N / 8][4], uint64_t a_desc, uint64_t b_desc, bool accumulate) {
    static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss: N = 32, 64 or 128");
    constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
    MF_WGMMA_SS_CASES(MF_D16, MF_D32, MF_D64);
}
// D = A B, the first product of a chain: wgmma_ss with accumulate off, but D given to the compiler as
// written only ("=f"), where wgmma_ss's "+f" says read and written. With "+f" the last tile's values
// of D count as read by this tile's first product, so they stay alive into it; in version 4's backward
// with mods, the compiler then copied accumulators between the products of a chain, into registers
// an in-flight wgmma owns, and ptxas serialized the wgmmas (warnings C7512, C7517) or spilled.
template <class T, int N, bool TRANS_A = false, bool TRANS_B = false>
__device__ inline void wgmma_ss_first(float (&d)[N / 8][4], uint64_t a_desc, uint64_t b_desc) {
    static_assert(N == 32 || N == 64 || N == 128, "wgmma_ss_first: N = 32, 64 or 128");
    constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>, accumulate = false;
    MF_WGMMA_SS_CASES(MF_W16, MF_W32, MF_W64);
}
template <class T, int N>
__device__ inline void wgmma_rs(float (&d)[N / 8][4], const unsigned (&a)[4], uint64_t b_desc,
                                bool accumulate) {
    static_assert(N == 64 || N == 128, "wgmma_rs: N = 64 or 128");
    constexpr bool bf16 = std::is_same_v<T, __nv_bfloat16>;
    if constexpr (N == 64 && bf16)
        MF_WGMMA_RS(64, "bf16", MF_R32, "{%32, %33, %34, %35}", "%36", "%37", MF_D32);
    if constexpr (N == 64 && !bf16)
        MF_WGMMA_RS(64, "f16", MF_R32, "{%32, %33, %34, %35}", "%36", "%37", MF_D32);
    if constexpr (N == 128 && bf16)
        MF_WGMMA_RS(128, "bf16", MF_R64, "{%64, %65, %66, %67}", "%68", "%69", MF_D64);
    if constexpr (N == 128 && !bf16)
        MF_WGMMA_RS(128, "f16", MF_R64, "{%64, %65, %66, %67}", "%68", "%69", MF_D64);
}
#undef MF_WGMMA_SS
#undef MF_WGMMA_SS_CASES
#undef MF_WGMMA_RS

#endif  // __CUDACC__

// wait<n>, then the accumulators it completes fenced (fence_operands): the compiler sees them as
// written by the wgmma that was issued, so without the fence it could read them before the wait.
template <int n, class... Accumulators>
__device__ inline void wgmma_wait(Accumulators&... accumulators) {
    wgmma_wait<n>();
    (fence_operands(accumulators), ...);
}

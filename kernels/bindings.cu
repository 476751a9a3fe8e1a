// Host side of the kernels: shared-memory opt-in, scratch buffers, launch, error check.
// nvcc compiles this file for the GPU; kernels/cpu.cpp includes it so that g++ builds the very
// same kernels for the CPU emulation of cpu_cuda.h. minimal_flash.py validates the inputs first.
#include <torch/extension.h>
#ifdef __CUDACC__
#include <ATen/cuda/CUDAContext.h>
#define LAUNCH(kernel, grid, block, shared_bytes) \
    kernel<<<grid, block, shared_bytes, at::cuda::getCurrentCUDAStream()>>>
static size_t max_shared_bytes() {
    return at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
}
#else
#include "cpu_cuda.h"
#endif
#include "flash.cu"
#include "flash2.cu"
#include "flash_backward.cu"
#include "flash2_backward.cu"

// Errors go back to Python as a message ("" means success) that minimal_flash.py raises. We throw
// no C++ exceptions across into Python: with torch 2.11 on our H200 machine, one crashed the process.

// A kernel gets more than 48 KB of dynamic shared memory only if it opts in. (minimal_flash.py has
// already checked the device's limit, with forward_shared_bytes and device_shared_bytes.)
template <class Kernel>
static std::string reserve_shared(Kernel* kernel, size_t bytes) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    if (err == cudaSuccess) return "";
    cudaGetLastError();  // reported here: clear it, or the next launch check would report it again
    return "cannot reserve shared memory: " + std::string(cudaGetErrorString(err));
}

// Every launch is checked: a bad configuration or a fault becomes a Python exception.
static std::string launch_error(const char* kernel) {
    const cudaError_t err = cudaGetLastError();
    return err == cudaSuccess ? "" : kernel + std::string(" failed: ") + cudaGetErrorString(err);
}

// The kernels index raw pointers, so a wrong layout here would read out of bounds. minimal_flash.py
// rejects bad inputs with a precise message; this is the last line of defence.
static bool bad_layout(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& q) {
    return t.sizes() != shape || !t.is_contiguous() || t.scalar_type() != at::kFloat ||
           t.device() != q.device();
}

static size_t forward_shared_bytes(int64_t d, int G) { return forward_shared_floats(d, G) * sizeof(float); }
static size_t flash2_shared_bytes(int64_t d, int G) { return flash2_shared_floats(d, G * Br) * sizeof(float); }
static size_t backward_shared_bytes(int64_t d, int G) { return backward_shared_floats(d, G) * sizeof(float); }
static size_t flash2_backward_shared_bytes(int64_t d, int G) {
    return flash2_backward_shared_floats(d, G * Bc) * sizeof(float);
}

static size_t device_shared_bytes(const at::Tensor& on) {
    const at::OptionalDeviceGuard guard(at::device_of(on));
    return max_shared_bytes();
}

// How many groups of `rows` threads (Br for a Q tile, Bc for a K tile) a block gets, each working on
// its own tile: one per tile, up to max_threads, as far as the device's shared memory and the
// kernel's registers allow (a kernel that uses many registers per thread can only be launched with
// fewer threads per block).
template <class Kernel, class SharedBytes>
static int thread_groups(Kernel* kernel, int64_t N, int rows, SharedBytes shared_bytes, int max_threads = 1024) {
    cudaFuncAttributes attributes{};
    cudaFuncGetAttributes(&attributes, kernel);  // on failure the launch check reports it
    int G = std::min<int64_t>((N + rows - 1) / rows, std::min(attributes.maxThreadsPerBlock, max_threads) / rows);
    while (G > 1 && shared_bytes(G) > max_shared_bytes()) --G;
    return std::max(G, 1);
}

// Version 2's grids have one column of blocks per (batch, head) slice: grid.y, at most 65535.
static std::string grid_column_error(int64_t BH) {
    if (BH <= 65535) return "";
    return "B * H = " + std::to_string(BH) + " is more than the 65535 blocks a grid column may have";
}

// FlashAttention-2's loop order: one block per (batch, head, tile of G * Br query rows). Blocks
// are independent, so the grid has plenty; 4 warps per block give each multiprocessor's schedulers
// warps to switch between while one waits for memory.
static std::string forward2(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                            at::Tensor& O, at::Tensor& L, bool causal, double scale) {
    const int64_t BH = Q.size(0) * Q.size(1), N = Q.size(2), d = Q.size(3);
    if (std::string err = grid_column_error(BH); !err.empty()) return err;
    const int G = thread_groups(flash2_forward, N, Br, [&](int G) { return flash2_shared_bytes(d, G); }, 128);
    const size_t bytes = flash2_shared_bytes(d, G);
    if (std::string err = reserve_shared(flash2_forward, bytes); !err.empty()) return err;
    LAUNCH(flash2_forward, dim3((N + G * Br - 1) / (G * Br), BH), dim3(G * Br), bytes)(
        Q.data_ptr<float>(), K.data_ptr<float>(), V.data_ptr<float>(), int(N), int(d), float(scale),
        causal, O.data_ptr<float>(), L.data_ptr<float>());
    return launch_error("flash2_forward");
}

// O = softmax(scale * Q K^T) V and L = rowwise log-sum-exp, written into O and L, by flash.cu
// (version 1, Algorithm 1) or flash2.cu (version 2, FlashAttention-2's loop order).
std::string forward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, at::Tensor& O,
                    at::Tensor& L, bool causal, double scale, int version) {
    for (const at::Tensor& t : {Q, K, V, O})
        if (bad_layout(t, Q.sizes(), Q)) return "internal error: q, k, v, O differ in layout";
    if (bad_layout(L, Q.sizes().slice(0, 3), Q)) return "internal error: L has the wrong layout";
    const int64_t BH = Q.size(0) * Q.size(1), N = Q.size(2), d = Q.size(3);
    const at::OptionalDeviceGuard guard(at::device_of(Q));
    if (version == 2) return forward2(Q, K, V, O, L, causal, scale);
    at::Tensor l = at::empty_like(L), m = at::empty_like(L);  // Algorithm 1's running l and m
    const int G = thread_groups(flash_forward, N, Br, [&](int G) { return forward_shared_bytes(d, G); });
    const size_t bytes = forward_shared_bytes(d, G);
    if (std::string err = reserve_shared(flash_forward, bytes); !err.empty()) return err;
    LAUNCH(flash_forward, dim3(BH), dim3(G * Br), bytes)(
        Q.data_ptr<float>(), K.data_ptr<float>(), V.data_ptr<float>(), int(N), int(d),
        float(scale), causal, O.data_ptr<float>(), l.data_ptr<float>(), m.data_ptr<float>(),
        L.data_ptr<float>());
    return launch_error("flash_forward");
}

// FlashAttention-2's backward: D first (one thread per row), then one block per (batch, head, tile
// of G * Bc keys), 4 warps as in the forward. The blocks add into dQ, so it starts at 0.
static std::string backward2(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                             const at::Tensor& O, const at::Tensor& dO, const at::Tensor& L,
                             at::Tensor& dQ, at::Tensor& dK, at::Tensor& dV, bool causal, double scale) {
    const int64_t BH = Q.size(0) * Q.size(1), N = Q.size(2), d = Q.size(3);
    if (std::string err = grid_column_error(BH); !err.empty()) return err;
    at::Tensor D = at::empty_like(L);
    const int threads = 256;
    LAUNCH(flash2_backward_D, dim3((BH * N + threads - 1) / threads), dim3(threads), 0)(
        O.data_ptr<float>(), dO.data_ptr<float>(), size_t(BH * N), int(d), D.data_ptr<float>());
    if (std::string err = launch_error("flash2_backward_D"); !err.empty()) return err;
    dQ.zero_();
    const int G = thread_groups(flash2_backward, N, Bc, [&](int G) { return flash2_backward_shared_bytes(d, G); }, 128);
    const size_t bytes = flash2_backward_shared_bytes(d, G);
    if (std::string err = reserve_shared(flash2_backward, bytes); !err.empty()) return err;
    LAUNCH(flash2_backward, dim3((N + G * Bc - 1) / (G * Bc), BH), dim3(G * Bc), bytes)(
        Q.data_ptr<float>(), K.data_ptr<float>(), V.data_ptr<float>(), dO.data_ptr<float>(),
        L.data_ptr<float>(), D.data_ptr<float>(), int(N), int(d), float(scale), causal,
        dQ.data_ptr<float>(), dK.data_ptr<float>(), dV.data_ptr<float>());
    return launch_error("flash2_backward");
}

// dQ, dK, dV of the loss, given dO and the forward's O and L, written into dQ, dK, dV, by
// flash_backward.cu (version 1, Algorithm 4) or flash2_backward.cu (version 2, FlashAttention-2).
std::string backward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V,
                     const at::Tensor& O, const at::Tensor& dO, const at::Tensor& L, at::Tensor& dQ,
                     at::Tensor& dK, at::Tensor& dV, bool causal, double scale, int version) {
    for (const at::Tensor& t : {Q, K, V, O, dO, dQ, dK, dV})
        if (bad_layout(t, Q.sizes(), Q)) return "internal error: q, k, v, O, dO, dQ, dK, dV differ in layout";
    if (bad_layout(L, Q.sizes().slice(0, 3), Q)) return "internal error: L has the wrong layout";
    const int64_t BH = Q.size(0) * Q.size(1), N = Q.size(2), d = Q.size(3);
    const at::OptionalDeviceGuard guard(at::device_of(Q));
    if (version == 2) return backward2(Q, K, V, O, dO, L, dQ, dK, dV, causal, scale);
    at::Tensor D = at::empty_like(L);  // D_i = rowsum(dO_i * O_i), filled by the kernel
    const int G = thread_groups(flash_backward, N, Br, [&](int G) { return backward_shared_bytes(d, G); });
    const size_t bytes = backward_shared_bytes(d, G);
    if (std::string err = reserve_shared(flash_backward, bytes); !err.empty()) return err;
    LAUNCH(flash_backward, dim3(BH), dim3(G * Br), bytes)(
        Q.data_ptr<float>(), K.data_ptr<float>(), V.data_ptr<float>(), O.data_ptr<float>(),
        dO.data_ptr<float>(), L.data_ptr<float>(), int(N), int(d), float(scale), causal,
        D.data_ptr<float>(), dQ.data_ptr<float>(), dK.data_ptr<float>(), dV.data_ptr<float>());
    return launch_error("flash_backward");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("forward", &forward, "FlashAttention forward into O and L: version 1 (Algorithm 1) or 2 (FlashAttention-2)");
    module.def("backward", &backward, "FlashAttention backward into dQ, dK, dV: version 1 (Algorithm 4) or 2 (FlashAttention-2)");
    module.def("forward_shared_bytes", [](int64_t d) { return forward_shared_bytes(d, 1); },
               "the least shared memory a forward block needs for head dim d (one thread group)");
    module.def("flash2_shared_bytes", [](int64_t d) { return flash2_shared_bytes(d, 1); },
               "the least shared memory a FlashAttention-2 forward block needs for head dim d (one thread group)");
    module.def("backward_shared_bytes", [](int64_t d) { return backward_shared_bytes(d, 1); },
               "the least shared memory a backward block needs for head dim d (one thread group)");
    module.def("flash2_backward_shared_bytes", [](int64_t d) { return flash2_backward_shared_bytes(d, 1); },
               "the least shared memory a FlashAttention-2 backward block needs for head dim d (one thread group)");
    module.def("device_shared_bytes", &device_shared_bytes, "the most a block may have on this tensor's device");
    module.attr("Br") = Br;
    module.attr("Bc") = Bc;
}

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

// A kernel gets more than 48 KB of dynamic shared memory only if it opts in; past the device's
// limit there is nothing to opt into, and the caller gets an error that says what to change.
template <class Kernel>
static void reserve_shared(Kernel* kernel, size_t bytes, int64_t d) {
    TORCH_CHECK_VALUE(bytes <= max_shared_bytes(), "head dim d = ", d, " needs ", bytes,
                      " bytes of shared memory per block with Br = ", Br, ", Bc = ", Bc,
                      ", more than the ", max_shared_bytes(),
                      " this device allows: use a smaller d or smaller block sizes");
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
    TORCH_CHECK(err == cudaSuccess, "cannot reserve shared memory: ", cudaGetErrorString(err));
}

// Every launch is checked: a bad configuration or a fault becomes a Python exception.
static void check_launch(const char* kernel) {
    const cudaError_t err = cudaGetLastError();
    TORCH_CHECK(err == cudaSuccess, kernel, " failed: ", cudaGetErrorString(err));
}

// The kernels index raw pointers, so a wrong layout here would read out of bounds. minimal_flash.py
// rejects bad inputs with a precise message; this is the last line of defence.
static void check_layout(const at::Tensor& t, at::IntArrayRef shape, const at::Tensor& q) {
    TORCH_CHECK(t.sizes() == shape && t.is_contiguous() && t.scalar_type() == at::kFloat &&
                    t.device() == q.device(),
                "internal error: expected a contiguous float32 tensor of shape ", shape, " on ",
                q.device(), ", got ", t.sizes(), " ", t.scalar_type(), " on ", t.device());
}

// O = softmax(scale * Q K^T) V and L = rowwise log-sum-exp, written into O and L.
void forward(const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, at::Tensor& O,
             at::Tensor& L, bool causal, double scale) {
    for (const at::Tensor& t : {Q, K, V, O}) check_layout(t, Q.sizes(), Q);
    check_layout(L, Q.sizes().slice(0, 3), Q);
    const int64_t BH = Q.size(0) * Q.size(1), N = Q.size(2), d = Q.size(3);
    const at::OptionalDeviceGuard guard(at::device_of(Q));
    at::Tensor l = at::empty_like(L), m = at::empty_like(L);  // Algorithm 1's running l and m
    const size_t bytes = forward_shared_floats(d) * sizeof(float);
    reserve_shared(flash_forward, bytes, d);
    LAUNCH(flash_forward, dim3(BH), dim3(Br), bytes)(
        Q.data_ptr<float>(), K.data_ptr<float>(), V.data_ptr<float>(), int(N), int(d),
        float(scale), causal, O.data_ptr<float>(), l.data_ptr<float>(), m.data_ptr<float>(),
        L.data_ptr<float>());
    check_launch("flash_forward");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, module) {
    module.def("forward", &forward, "FlashAttention forward (Algorithm 1) into O and L");
    module.attr("Br") = Br;
    module.attr("Bc") = Bc;
}

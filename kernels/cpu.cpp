// The CPU build: g++ compiles the same host code and kernels as nvcc does, with cpu_cuda.h
// standing in for the CUDA runtime (bindings.cu includes it when __CUDACC__ is not defined).
#include "bindings.cu"

// For the tests alone: the emulation's launches on n OS threads (0: one per core, the default), so that
// a test can make its blocks run in another order (tests/test_kernels.py, the deterministic backward).
extern "C" void mf_cpu_set_workers(int n) { cpu_cuda::cpu_set_workers(n > 0 ? unsigned(n) : 0u); }

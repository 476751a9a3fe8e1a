// The CPU build: g++ compiles the same host code and kernels as nvcc does, with cpu_cuda.h
// standing in for the CUDA runtime (bindings.cu includes it when __CUDACC__ is not defined).
#include "bindings.cu"

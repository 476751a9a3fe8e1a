// cp.async, for the kernels of chapters 2 and 3: flash2_backward.cu, and flash2_mma.cu and
// flash2_mma_backward.cu through mma.cuh.
#pragma once

#ifdef __CUDACC__  // on the CPU, cpu_cuda.h defines the same functions, with the same semantics
// cp.async (sm_80 and later): a 16-byte copy from global to shared memory that the thread issues and
// does not wait for, so the next tile's loads fly while this tile's products run, and the data
// goes to shared memory without passing through registers. A thread groups its copies with
// cp_async_commit; cp_async_wait<n> returns once all but its newest n groups have landed. Only the
// issuing thread is waited for: a __syncthreads after the wait makes the tile complete for all.
// With valid false, 16 zero bytes are written and nothing is read.
__device__ inline void cp_async16(void* to, const void* from, bool valid) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(to));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(address), "l"(from),
                 "r"(valid ? 16 : 0));
}
// The same for 4 bytes, one float, whose source need only be 4-byte aligned (a copy's addresses must
// be multiples of its size). .ca: .cg, which skips the L1 cache, takes only 16-byte copies.
__device__ inline void cp_async4(void* to, const void* from, bool valid) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(to));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(address), "l"(from),
                 "r"(valid ? 4 : 0));
}
// The same 16 bytes, marked in L2 to be evicted first: a stream read once (a decode step's cache) then
// leaves the L2 to what is read again. The data that lands is the same: only the cache's policy differs.
__device__ inline void cp_async16_first(void* to, const void* from, bool valid) {
    const unsigned address = static_cast<unsigned>(__cvta_generic_to_shared(to));
    unsigned long long policy;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(policy));
    asm volatile("cp.async.cg.shared.global.L2::cache_hint [%0], [%1], 16, %2, %3;" ::"r"(address), "l"(from),
                 "r"(valid ? 16 : 0), "l"(policy));
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
template <int n>
__device__ inline void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(n));
}
#endif

// A block's timeline, for tools/block_timeline.py: where version 4's forward spends a block's time
// besides its tiles. Built with -DBLOCK_TIMELINE (a build of its own, for the tool only), the kernel
// notes the SM's clock (clock64, cycles) as a block starts, once Q_i has landed, once its last product
// into O is done and after its epilogue, and the GPU's global timer (ns) at the start and the end; each
// consumer's thread 0 writes them, as int32, over its first 8 rows of L:
//   [SM, start (ns), end (ns), Q landed, loop done, epilogue done (cycles after the start), consumers, 0]
// (consumers: the launch's, 2 or 3, so the tool knows the work tiles' rows without the launch's rule)
// so that build's L is no log-sum-exp. In every other build the marks are nothing at all.
#pragma once

#ifdef BLOCK_TIMELINE
struct BlockTimeline {
    long long start, q_landed, loop_done;
    unsigned start_ns;
};
__device__ inline unsigned global_ns() {  // the low 32 bits: a block lasts far less than 4 s
    unsigned ns;
    asm volatile("mov.u32 %0, %%globaltimer_lo;" : "=r"(ns));
    return ns;
}
__device__ inline void timeline_end(const BlockTimeline& t, float* L, int row, int N, int consumers) {
    __syncwarp();  // the warp's lanes have written their rows of L: thread 0 writes over 8 of them
    const long long end = clock64();
    const unsigned end_ns = global_ns();
    unsigned sm;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    if (threadIdx.x % 128 == 0 && row + 8 <= N) {
        int* out = reinterpret_cast<int*>(L + row);
        out[0] = sm, out[1] = t.start_ns, out[2] = end_ns;
        out[3] = int(t.q_landed - t.start), out[4] = int(t.loop_done - t.start), out[5] = int(end - t.start);
        out[6] = consumers, out[7] = 0;
    }
}
#define TIMELINE_START() BlockTimeline timeline_{clock64(), 0, 0, global_ns()}
#define TIMELINE_MARK(point) timeline_.point = clock64()
#define TIMELINE_END(L, row, N, consumers) timeline_end(timeline_, L, row, N, consumers)
#else
#define TIMELINE_START()
#define TIMELINE_MARK(point)
#define TIMELINE_END(L, row, N, consumers)
#endif

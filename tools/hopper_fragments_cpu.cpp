// The CPU build of tools/hopper_fragments.cu: the same source against the emulation.
#include "cpu_cuda.h"
#include "hopper_fragments.cu"

// The CPU build of tools/fragments.cu: the same source against the emulation.
#include "cpu_cuda.h"
#include "fragments.cu"

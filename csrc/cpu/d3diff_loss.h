// D3Diff score-matching loss, C++ CPU kernel: a launcher on raw pointers (no torch, no pybind11).
// The operands are unif2ace/args.h's D3DiffLossArgs; the formula lives in unif2ace/d3diff_math.h.
#pragma once

#include "unif2ace/args.h"
#include "unif2ace/common.h"

namespace unif2ace {

// The loss rows and, when a.grad is not null, their gradient, one pass per row (OpenMP over rows;
// fp32 accumulation for every dtype).
Status d3diff_loss_fwd_cpu(const D3DiffLossArgs& a);

// The instruction-set variant of the row kernel in use: "baseline" (the build's default target,
// SSE2 on x86-64), "avx_fma", "avx2_fma" or "avx512". Picked once from the CPU on first use; the
// environment variable UNIF2ACE_CPU_SIMD caps it at a lower level.
const char* d3diff_cpu_simd_level();

// Select a variant by name for the rest of the process (tests). kBadArgument if the name is unknown
// or this CPU cannot run it.
Status d3diff_cpu_set_simd_level(const char* name);

}  // namespace unif2ace

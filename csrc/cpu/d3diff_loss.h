// D3Diff score-matching loss, C++ CPU kernel: launchers on raw pointers (no torch, no pybind11).
// The formula lives in unif2ace/d3diff_math.h; shared/DESIGN.md §4 has the derivation.
#pragma once

#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {

// Per row i of logits z [n_rows, n_cols] (element row stride row_stride, column stride 1, dtype
// code `dtype`: common.h DType), with x0 = targets[i], a = ratio[i]:
//   loss[i] = w_ce[i]·CE + alpha·w_se[i]·SE          (0 when x0 == ignore_index)
//   grad[i, y] = grad_scale[i] · dℓ/dz_y             (only when grad != nullptr; 0 on ignored rows)
// targets int64 [n_rows]; ratio, w_ce, w_se, loss, grad_scale float32 [n_rows], all contiguous;
// grad [n_rows, n_cols] in the logits' dtype with row stride grad_row_stride (column stride 1).
// grad may alias logits exactly (grad == logits and grad_row_stride == row_stride: the in-place
// gradient); any other overlap between the two is undefined. grad_scale == nullptr means scale 1.
// A target that is neither ignore_index nor in [0, n_cols) is never read through: that row's loss
// and gradient are NaN. Parallel over rows with OpenMP; fp32 accumulation for every dtype.
Status d3diff_loss_fwd_cpu(const void* logits, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                           int dtype, const int64_t* targets, const float* ratio, const float* w_ce,
                           const float* w_se, float alpha, int64_t ignore_index, float* loss,
                           void* grad, int64_t grad_row_stride, const float* grad_scale);

// The instruction-set variant of the row kernel in use: "baseline" (the build's default target,
// SSE2 on x86-64), "avx_fma", "avx2_fma" or "avx512". Picked once from the CPU
// (__builtin_cpu_supports) on first use; the environment variable UNIF2ACE_CPU_SIMD caps it at a
// lower level (for tests of every variant, and for timing them against each other).
const char* d3diff_cpu_simd_level();

// Select a variant by name for the rest of the process (tests). kBadArgument if the name is unknown
// or this CPU cannot run it.
Status d3diff_cpu_set_simd_level(const char* name);

}  // namespace unif2ace

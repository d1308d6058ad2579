// D3Diff score-matching loss, CUDA launchers (shared/DESIGN.md §4). Raw pointers in, nothing torch,
// nothing pybind11, and no CUDA header either: the stream travels as `void*` (a cudaStream_t), so
// the binding file compiles with the host compiler alone.
//
// Per row r of logits z [N, K] (column stride 1, element row stride `row_stride`):
//   loss[r] = w_ce·CE + α·w_se·SE (0 for target == ignore_index, NaN for a target outside [0, K))
//   grad[r, :] = grad_scale[r] · ∂loss[r]/∂z[r, :] (0 for an ignored row, NaN for a bad target)
// The row math itself lives in unif2ace/d3diff_math.h, shared with the C++ CPU kernel.
#pragma once

#include <cstdint>

namespace unif2ace {

// Bytes of device workspace `d3diff_loss_fwd_cuda` can use for (n_rows, n_cols) on the *current*
// CUDA device (it depends on that device's SM count). 0 when the row kernel alone is used (many
// rows, or short rows); then a null workspace is fine. Host-only query, no synchronisation.
int64_t d3diff_loss_workspace_bytes_cuda(int64_t n_rows, int64_t n_cols);

// Forward (+ gradient when grad != nullptr) on `stream`, asynchronously. Returns a Status
// (unif2ace/common.h); kCudaError means a launch failed: d3diff_loss_last_cuda_error() names it.
//
//   logits       [n_rows, n_cols] of `dtype` (DType), element row stride row_stride, col stride 1
//   targets      int64 [n_rows]; ratio, w_ce, w_se: float32 [n_rows]
//   loss         float32 [n_rows], written
//   grad         nullptr, or [n_rows, n_cols] of `dtype` with element row stride grad_row_stride;
//                may be logits itself (same pointer and same stride: in-place), otherwise it must
//                not overlap logits
//   grad_scale   nullptr (= 1), or float32 [n_rows] multiplying each row's gradient
//   workspace    device memory of workspace_bytes bytes (8-byte aligned), or nullptr / 0 bytes.
//                Fewer bytes than d3diff_loss_workspace_bytes_cuda() asks for only means fewer
//                (or no) column splits, never an error.
int d3diff_loss_fwd_cuda(const void* logits, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                         int dtype, const int64_t* targets, const float* ratio, const float* w_ce,
                         const float* w_se, float alpha, int64_t ignore_index, float* loss,
                         void* grad, int64_t grad_row_stride, const float* grad_scale,
                         void* workspace, int64_t workspace_bytes, void* stream);

// The CUDA error string of the last kCudaError returned on this host thread ("no error" if none).
const char* d3diff_loss_last_cuda_error();

}  // namespace unif2ace

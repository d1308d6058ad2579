// D3Diff score-matching loss, CUDA launchers. Raw pointers in (unif2ace/args.h's D3DiffLossArgs),
// nothing torch, nothing pybind11, and no CUDA header either: the stream travels as `void*` (a
// cudaStream_t), so the binding file compiles with the host compiler alone. The row math lives in
// unif2ace/d3diff_math.h, shared with the C++ CPU kernel.
#pragma once

#include <cstdint>

#include "launch.h"
#include "unif2ace/args.h"

namespace unif2ace {

// Bytes of device workspace `d3diff_loss_fwd_cuda` can use for (n_rows, n_cols) on the *current*
// CUDA device (it depends on that device's SM count). 0 when the row kernel alone is used (many
// rows, or short rows); then a null workspace is fine. Host-only query, no synchronisation.
int64_t d3diff_loss_workspace_bytes_cuda(int64_t n_rows, int64_t n_cols);

// Forward (+ gradient when a.grad != nullptr) on `stream`, asynchronously. Returns a Status
// (unif2ace/common.h); kCudaError means a launch failed: cuda_last_error() names it. Every pointer
// is aligned to its element size. workspace: device memory of workspace_bytes bytes (8-byte
// aligned), or nullptr / 0 bytes; fewer bytes than d3diff_loss_workspace_bytes_cuda() asks for
// only means fewer (or no) column splits, never an error.
int d3diff_loss_fwd_cuda(const D3DiffLossArgs& a, void* workspace, int64_t workspace_bytes,
                         void* stream);

}  // namespace unif2ace

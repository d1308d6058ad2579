// Discrete-diffusion mask sampling, CUDA launchers. Raw pointers in (unif2ace/args.h), nothing
// torch, nothing pybind11, no CUDA header: the stream travels as `void*` (a cudaStream_t), so the
// binding file compiles with the host compiler alone.
//
// The semantics are the launcher contract of the mask-sampling op family (Philox counter layout,
// Gumbel from 32 bits, tie rules); unif2ace/philox.h holds the shared Philox-4x32-10 and Gumbel
// transform. Every function launches asynchronously on `stream`, never synchronises the host and
// never allocates device memory (CUDA-graph safe); each returns a Status (unif2ace/common.h), and
// kCudaError means a launch failed (cuda_last_error() names it).
#pragma once

#include <cstdint>

#include "launch.h"
#include "unif2ace/args.h"

namespace unif2ace {

// Training-time masking; every operand in device memory.
int mask_tokens_fwd_cuda(const MaskTokensArgs& a, void* stream);

// Bytes of device workspace maskgit_step_fwd_cuda can use for [B, L, K] logits on the *current*
// device (depends on its SM count): > 0 only for the split-over-K path (few positions, long rows).
// Host-only query, no synchronisation.
int64_t maskgit_step_workspace_bytes_cuda(int64_t B, int64_t L, int64_t K);

// One MaskGIT / Show-o decode step. guidance: each product and the difference are rounded to fp32,
// no FMA, as the reference computes it. workspace: device memory of workspace_bytes (16-byte
// aligned) or nullptr / 0; fewer bytes than maskgit_step_workspace_bytes_cuda() asks for only mean
// fewer (or no) column splits, never an error.
int maskgit_step_fwd_cuda(const MaskgitStepArgs& a, void* workspace, int64_t workspace_bytes,
                          void* stream);

}  // namespace unif2ace

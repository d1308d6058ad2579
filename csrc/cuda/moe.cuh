// Grouped MoE dispatch, CUDA launchers (the semantics: the MoE op family's launcher contract,
// §1-§6). Raw pointers in (unif2ace/args.h), nothing torch; the stream travels as `void*` (a
// cudaStream_t). Every launcher is asynchronous, allocates nothing and never synchronises with the
// host; each returns a Status (unif2ace/common.h), and kCudaError means a launch failed
// (cuda_last_error() names it).
#pragma once

#include <cstdint>

#include "launch.h"
#include "unif2ace/args.h"

namespace unif2ace {

// Bytes of device workspace moe_route_fwd_cuda needs for T tokens and E experts (host arithmetic).
int64_t moe_route_workspace_bytes_cuda(int64_t T, int64_t num_experts);

// Contract §1: top-k routing, one warp per token, float64 keys, equal keys → lower expert index;
// the same arithmetic as the C++ kernel. workspace: moe_route_workspace_bytes_cuda(T, E) bytes of
// device memory (4-byte aligned). E <= 256 and k <= 32 (kBadShape otherwise: the caller falls
// back). Deterministic, no atomics.
int moe_route_fwd_cuda(const MoeRouteArgs& a, void* workspace, int64_t workspace_bytes,
                       void* stream);

// Bytes of device workspace moe_plan_cuda needs for n slots and E experts (host-only arithmetic).
int64_t moe_plan_workspace_bytes_cuda(int64_t n, int64_t num_experts);

// Contract §3: stable counting sort of the slots by expert (histogram + scan + scatter). An id
// outside [0, E) drops its slot (slot_pos[s] = -1; the positions past offsets[E] get
// sorted_slot = -1). workspace: moe_plan_workspace_bytes_cuda(n, E) bytes of device memory
// (4-byte aligned). E must be in [1, 8192] (one int per expert in shared memory).
int moe_plan_cuda(const MoePlanArgs& a, void* workspace, int64_t workspace_bytes, void* stream);

// Contract §4: a row of zeros for a dropped slot; elem_size 2 or 4 (the rows are copied as bytes).
int moe_permute_cuda(const MoePermuteArgs& a, void* stream);

// Contract §5.
int moe_combine_cuda(const MoeCombineArgs& a, void* stream);

// Contract §6: each grad_src element is read (as src) before it is overwritten, by the same
// thread; fixed-order fp32 sums.
int moe_combine_bwd_cuda(const MoeCombineBwdArgs& a, void* stream);

}  // namespace unif2ace

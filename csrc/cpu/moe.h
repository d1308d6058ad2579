// Grouped MoE dispatch, C++ CPU kernels: launchers on raw pointers (no torch, no pybind11). The
// operands are unif2ace/args.h's; the semantics are the launcher contract of the MoE op family.
// Index arrays of the plan are int32 (N = T·k < 2^31 is checked by the caller); element offsets
// are computed in 64 bits.
#pragma once

#include "unif2ace/args.h"
#include "unif2ace/common.h"

namespace unif2ace {

// Routing forward, one pass per token (OpenMP over tokens). Selection key = score + bias in
// double; ties -> lower expert index. prob_sums: per-thread partial sums added in thread order
// (deterministic for a fixed thread count). kBadArgument: a group id out of range, k larger than a
// token's group, bad n_group / topk_group.
Status moe_route_fwd_cpu(const MoeRouteArgs& a);

// Routing backward.
Status moe_route_bwd_cpu(const MoeRouteBwdArgs& a);

// Plan. kBadArgument: an id outside [0, E) (nothing is scattered then), max_tiles too small. The
// tile map's unused entries are -1 / n_slots.
Status moe_plan_cpu(const MoePlanArgs& a);

// Permute (any dtype: rows are copied). A slot outside [0, T·k) gives a zero row and kBadArgument.
Status moe_permute_cpu(const MoePermuteArgs& a);

// Combine, fp32 accumulation.
Status moe_combine_cpu(const MoeCombineArgs& a);

// Combine backward. grad_src may be src itself (same rows, src_row_stride == D): each source row is
// read before it is overwritten.
Status moe_combine_bwd_cpu(const MoeCombineBwdArgs& a);

// SiLU-GLU: a = silu(gate)·up, and its backward fused with the recomputation of a (when a.a is not
// null). One pass over the rows each, fp32 math.
Status moe_silu_glu_fwd_cpu(const MoeActivationArgs& a);
Status moe_silu_glu_bwd_cpu(const MoeActivationArgs& a);

// GELU, a = x·Φ(x) (erf form) or 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (tanh form), and its
// backward dh = da·gelu'(h) fused with a = gelu(h) (a required). fp32 math (erf within 2.2e-7 of
// fp64).
Status moe_gelu_fwd_cpu(const MoeActivationArgs& a);
Status moe_gelu_bwd_cpu(const MoeActivationArgs& a);

}  // namespace unif2ace

// Grouped MoE dispatch, C++ CPU kernels: host launchers on raw pointers (no torch, no pybind11).
// The contract (every backend's) is the comment block at the top of python/unif2ace/ops/moe.py;
// shared/DESIGN.md §6 has the design. Index arrays of the plan are int32 (N = T·k < 2^31 is checked
// by the caller); element offsets are computed in 64 bits.
#pragma once

#include <cstdint>

#include "unif2ace/common.h"

namespace unif2ace {

enum MoEScoring : int { kScoreSoftmax = 0, kScoreSigmoid = 1 };
enum IndexType : int { kIndex32 = 0, kIndex64 = 1 };

// Routing forward, one pass per token (OpenMP over tokens). logits [T, E] (row stride
// logits_row_stride elements, column stride 1, dtype code: common.h DType). group_offsets int64
// [G+1]; group_ids int64 [T] or nullptr (all tokens in group 0); bias float32 [E] or nullptr.
// Selection key = score + bias in double; ties -> lower expert index. n_group = 0: no group limit.
// Writes ids int64 [T, k], weights float32 [T, k], counts int32 [E], prob_sums float32 [E]
// (per-thread partial sums added in thread order: deterministic for a fixed thread count).
// kBadArgument: a group id out of range, k larger than a token's group, bad n_group/topk_group.
Status moe_route_fwd_cpu(const void* logits, int64_t T, int64_t E, int64_t logits_row_stride,
                         int dtype, const int64_t* group_offsets, int64_t G,
                         const int64_t* group_ids, const float* bias, int64_t k, int scoring,
                         bool renormalize, int64_t n_group, int64_t topk_group, float scaling,
                         int64_t* ids, float* weights, int32_t* counts, float* prob_sums);

// Routing backward: grad_logits float32 [T, E] contiguous (0 outside each token's group) from
// grad_weights float32 [T, k] (or nullptr) and grad_prob_sums float32 [E] (or nullptr).
Status moe_route_bwd_cpu(const void* logits, int64_t T, int64_t E, int64_t logits_row_stride,
                         int dtype, const int64_t* group_offsets, int64_t G,
                         const int64_t* group_ids, const int64_t* ids, int64_t k, int scoring,
                         bool renormalize, float scaling, const float* grad_weights,
                         const float* grad_prob_sums, float* grad_logits);

// Plan: stable counting sort of the N = n_slots slot ids (ids int32 or int64 by id_type) by expert.
// Writes counts [E], offsets [E+1], sorted_slot [N], slot_pos [N] and, when block_m > 0, the tile
// map tile_expert / tile_row [max_tiles] (unused entries -1 / N). All int32.
// kBadArgument: an id outside [0, E) (nothing is scattered then), max_tiles too small.
Status moe_plan_cpu(const void* ids, int id_type, int64_t n_slots, int64_t E, int64_t block_m,
                    int32_t* counts, int32_t* offsets, int32_t* sorted_slot, int32_t* slot_pos,
                    int32_t* tile_expert, int32_t* tile_row, int64_t max_tiles);

// Permute (gather): xs[p, :] = x[sorted_slot[p] / k, :]. x [T, D] with row stride x_row_stride;
// xs [n_rows, D] contiguous; elem_size bytes per element (any dtype: rows are copied).
Status moe_permute_cpu(const void* x, int64_t T, int64_t D, int64_t x_row_stride,
                       int64_t elem_size, const int32_t* sorted_slot, int64_t n_rows, int64_t k,
                       void* xs);

// Combine: out[t] = sum_{j<k, ascending} w[t, j] * src[slot_pos[t*k + j]], fp32 accumulation.
// src [n_src, D] (row stride src_row_stride), weights float32 [T, k] or nullptr (= 1),
// out [T, D] contiguous in src's dtype.
Status moe_combine_cpu(const void* src, int64_t n_src, int64_t D, int64_t src_row_stride,
                       int dtype, const int32_t* slot_pos, int64_t T, int64_t k,
                       const float* weights, void* out);

// Combine backward: grad_src[slot_pos[t*k + j]] = w[t, j] * grad_out[t] (src's dtype, contiguous
// [n_src, D]); grad_weights[t, j] = <grad_out[t], src[slot_pos[t*k + j]]> in fp32 (nullptr: skip).
// grad_out [T, D] row stride go_row_stride; weights nullptr = 1. grad_src may be src itself (same
// rows, src_row_stride == D): each source row is read before it is overwritten.
Status moe_combine_bwd_cpu(const void* grad_out, int64_t go_row_stride, const void* src,
                           int64_t n_src, int64_t D, int64_t src_row_stride, int dtype,
                           const int32_t* slot_pos, int64_t T, int64_t k, const float* weights,
                           void* grad_src, float* grad_weights);

// SiLU-GLU activation of the up projection h [n_rows, 2F] (row stride h_row_stride, gate columns
// [0, F), up columns [F, 2F)): a = silu(gate) · up  ->  a [n_rows, F] contiguous. One pass, fp32 math.
Status moe_silu_glu_fwd_cpu(const void* h, int64_t n_rows, int64_t F, int64_t h_row_stride,
                            int dtype, void* a);

// Its backward, fused with the recomputation of a: from h and da [n_rows, F] (contiguous) writes
// dh [n_rows, 2F] (contiguous) and, when a != nullptr, a = silu(gate) · up (needed for the down
// projection's weight gradient). One pass over the rows, fp32 math. dh may be h itself
// (h_row_stride == 2F): the backward then consumes the saved pre-activation in place.
Status moe_silu_glu_bwd_cpu(const void* h, const void* da, int64_t n_rows, int64_t F,
                            int64_t h_row_stride, int dtype, void* dh, void* a);

// GELU of the up projection h [n_rows, F] (row stride h_row_stride): a = x·Φ(x) (tanh_form false,
// erf GELU) or Phi's tanh approximation 0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³))) (tanh_form
// true)  ->  a [n_rows, F] contiguous. One pass, fp32 math (erf within 2.2e-7 of fp64).
Status moe_gelu_fwd_cpu(const void* h, int64_t n_rows, int64_t F, int64_t h_row_stride,
                        bool tanh_form, int dtype, void* a);

// Its backward fused with the recomputation of a (needed for the down projection's weight
// gradient): dh = da · gelu'(h) and a = gelu(h), both [n_rows, F] contiguous (a required). dh may
// be h itself (h_row_stride == F).
Status moe_gelu_bwd_cpu(const void* h, const void* da, int64_t n_rows, int64_t F,
                        int64_t h_row_stride, bool tanh_form, int dtype, void* dh, void* a);

}  // namespace unif2ace

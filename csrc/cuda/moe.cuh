// Grouped MoE dispatch, CUDA launchers (shared/DESIGN.md §6; contract: python/unif2ace/ops/moe.py
// §3-§6). Raw pointers in, nothing torch; the stream travels as `void*` (a cudaStream_t).
// Every launcher is asynchronous, allocates nothing and never synchronises with the host.
#pragma once

#include <cstdint>

namespace unif2ace {

// Bytes of device workspace moe_route_fwd_cuda needs for T tokens and E experts (host arithmetic).
int64_t moe_route_workspace_bytes_cuda(int64_t T, int64_t num_experts);

// Contract §1: top-k routing, softmax (scoring 0) or sigmoid (1) over each token's task group,
// optional DeepSeek-V3 group limit (n_group > 0) and selection bias; float64 keys, equal keys →
// lower expert index; the same arithmetic as the C++ kernel.
//   logits [T, E] of `dtype` (DType), element row stride logits_row_stride, column stride 1
//   group_offsets int64 [G+1]; group_ids int64 [T] or null; bias float32 [E] or null
//   ids int64 [T, k], weights float32 [T, k], counts int32 [E], prob_sums float32 [E]: written
//   workspace  moe_route_workspace_bytes_cuda(T, E) bytes of device memory (4-byte aligned)
// E <= 256 and k <= 32 (kBadShape otherwise: the caller falls back). Deterministic, no atomics.
int moe_route_fwd_cuda(const void* logits, int64_t T, int64_t E, int64_t logits_row_stride,
                       int dtype, const int64_t* group_offsets, int64_t G,
                       const int64_t* group_ids, const float* bias, int64_t top_k, int scoring,
                       int renormalize, int64_t n_group, int64_t topk_group, float scaling,
                       int64_t* ids, float* weights, int32_t* counts, float* prob_sums,
                       void* workspace, int64_t workspace_bytes, void* stream);

// Bytes of device workspace moe_plan_cuda needs for n slots and E experts (host-only arithmetic).
int64_t moe_plan_workspace_bytes_cuda(int64_t n, int64_t num_experts);

// Contract §3: stable counting sort of the n = T·k slots by expert (histogram + scan + scatter).
//   ids          int32 (ids_is_int64 = 0) or int64 [n]; an id outside [0, E) drops its slot
//                (slot_pos[s] = -1; the positions past offsets[E] get sorted_slot = -1)
//   counts [E], offsets [E+1], sorted_slot [n], slot_pos [n]: int32, written
//   tile_expert, tile_row: int32 [max_tiles] (max_tiles = n / block_m + E), or null when block_m = 0
//   workspace    moe_plan_workspace_bytes_cuda(n, E) bytes of device memory (4-byte aligned)
// E must be in [1, 8192] (one int per expert in shared memory).
int moe_plan_cuda(const void* ids, int ids_is_int64, int64_t n, int64_t num_experts,
                  int64_t block_m, int32_t* counts, int32_t* offsets, int32_t* sorted_slot,
                  int32_t* slot_pos, int32_t* tile_expert, int32_t* tile_row, int64_t max_tiles,
                  void* workspace, int64_t workspace_bytes, void* stream);

// Contract §4: xs[p, :] = x[sorted_slot[p] / top_k, :] (a row of zeros for a dropped slot).
//   x [T, D] (element row stride x_row_stride, column stride 1), xs [n, D] contiguous; elem_bytes
//   2 or 4 (the rows are copied as bytes).
int moe_permute_cuda(const void* x, int64_t T, int64_t D, int64_t x_row_stride, int elem_bytes,
                     const int32_t* sorted_slot, int64_t n, int64_t top_k, void* xs, void* stream);

// Contract §5: out[t] = Σ_j weights[t, j] · src[slot_pos[t·k + j]] in fp32, j ascending.
//   src [n, D] of `dtype` (DType), element row stride src_row_stride; weights float32 [T, k] or
//   null (= 1); out [T, D] contiguous, src's dtype. Slots whose position is outside [0, n) add 0.
int moe_combine_cuda(const void* src, int64_t n, int64_t D, int64_t src_row_stride, int dtype,
                     const int32_t* slot_pos, int64_t T, int64_t top_k, const float* weights,
                     void* out, void* stream);

// Contract §6: grad_src[slot_pos[t·k + j]] = weights[t, j] · grad_out[t] (src's dtype) and
// grad_weights[t, j] = Σ_d grad_out[t, d] · src[slot_pos[t·k + j], d] (fp32, fixed order).
//   grad_out [T, D] of `dtype`, element row stride grad_out_row_stride; grad_src [n, D]
//   contiguous, may be src itself (each element is read before it is overwritten, by the same
//   thread); weights / grad_weights may be null.
int moe_combine_bwd_cuda(const void* grad_out, int64_t grad_out_row_stride, const void* src,
                         int64_t n, int64_t D, int64_t src_row_stride, int dtype,
                         const int32_t* slot_pos, int64_t T, int64_t top_k, const float* weights,
                         void* grad_src, float* grad_weights, void* stream);

// The CUDA error string of the last kCudaError returned on this host thread.
const char* moe_last_cuda_error();

}  // namespace unif2ace

// The operands of every launcher, one struct per kernel, shared by its C++ and CUDA launchers
// (csrc/cpu/*.h, csrc/cuda/*.cuh). The bindings fill them from tensor descriptors after checking
// each operand (csrc/binding_args.h), so a kernel's signature is written here once. Pointers are
// raw device or host pointers, sizes and strides count elements, `dtype` is a unif2ace/dtype.h
// code; "or null" marks an optional operand. The semantics of each kernel are the launcher contract
// of its op family (python/unif2ace/ops/<family>/_torch.py).
#pragma once

#include <cstdint>

namespace unif2ace {

// ---- D3Diff loss ----------------------------------------------------------------------------

// Per row i of logits z [n_rows, n_cols] with x0 = targets[i], a = ratio[i]:
//   loss[i] = w_ce[i]·CE + alpha·w_se[i]·SE          (0 when x0 == ignore_index)
//   grad[i, y] = grad_scale[i] · dloss[i]/dz_y        (when grad is not null; 0 on ignored rows)
// A target that is neither ignore_index nor in [0, n_cols) is never read through: that row's loss
// and gradient are NaN. unif2ace/d3diff_math.h has the formula.
struct D3DiffLossArgs {
  const void* logits;  // [n_rows, n_cols] of dtype, row stride row_stride, column stride 1
  int dtype;
  int64_t n_rows, n_cols, row_stride;
  const int64_t* targets;  // [n_rows]
  const float* ratio;      // [n_rows]
  const float* w_ce;       // [n_rows]
  const float* w_se;       // [n_rows]
  float alpha;
  int64_t ignore_index;
  float* loss;  // [n_rows], written
  // Null (loss only) or [n_rows, n_cols] of dtype, row stride grad_row_stride, column stride 1.
  // May be logits itself with the same stride (the in-place gradient); no other overlap.
  void* grad;
  int64_t grad_row_stride;
  const float* grad_scale;  // [n_rows] or null (= 1)
};

// ---- mask sampling --------------------------------------------------------------------------

// Training-time masking of ids [B, L]. mode 0 ("count"): row b masks the clamp(n_mask[b], 0, L)
// positions with the smallest (Philox key, position); mode 1 ("bernoulli"): a position is masked
// iff float(w0 >> 8) < gamma[b]·2^24.
struct MaskTokensArgs {
  const int64_t* ids;  // [B, L] contiguous
  int64_t B, L;
  const float* gamma;     // [B] (read in mode 1) or null
  const int64_t* n_mask;  // [B] (read in mode 0) or null
  int64_t mask_id;
  uint64_t seed;
  uint32_t offset;
  int mode;
  int64_t* out_ids;  // [B, L] contiguous, written: mask_id where masked, else ids
  bool* out_mask;    // [B, L] contiguous, written
};

// One MaskGIT / Show-o decode step: sample every masked position (guidance, temperature, Gumbel
// race), its confidence, then re-mask the clamp(mask_len[b], 0, L) least confident of sequence b.
struct MaskgitStepArgs {
  const void* logits;  // [B, L, K] of dtype, strides (stride_b, stride_l, 1), read only
  int dtype;
  int64_t B, L, K, stride_b, stride_l;
  const void* uncond;  // null, or [B, L, K] of dtype with strides (ustride_b, ustride_l, 1)
  int64_t ustride_b, ustride_l;
  const int64_t* ids;       // [B, L] contiguous; the known positions are ids != mask_id
  const int64_t* mask_len;  // [B]
  int64_t mask_id;
  double guidance;  // z = fp32(1 + g)·cond − fp32(g)·uncond
  float inv_temperature;
  float choice_temperature;  // τ (τ·G_choice is skipped at 0)
  uint64_t seed;
  uint32_t offset;
  const float* gumbel;  // [B, L, K] contiguous noise, or null (the Philox stream)
  const float* choice;  // [B, L] contiguous noise, or null (the Philox stream)
  int64_t* out_ids;     // [B, L] contiguous, written
  bool* out_mask;       // [B, L] contiguous, written
  float* confidence;    // [B, L] contiguous, written
};

// ---- grouped MoE dispatch -------------------------------------------------------------------

enum MoEScoring : int { kScoreSoftmax = 0, kScoreSigmoid = 1 };

// The routing logits and their task groups, read by the forward and the backward: token t's
// candidates are the experts [group_offsets[g], group_offsets[g + 1]) of its group
// g = group_ids[t].
struct MoeRouteLogits {
  const void* logits;  // [T, E] of dtype, row stride row_stride, column stride 1
  int dtype;
  int64_t T, E, row_stride;
  const int64_t* group_offsets;  // [G + 1]
  int64_t G;
  const int64_t* group_ids;  // [T], or null (every token in group 0)
  int scoring;               // MoEScoring
  bool renormalize;
  float scaling;
};

// Top-k routing forward; k experts per token, the DeepSeek-V3 group limit when n_group > 0.
struct MoeRouteArgs {
  MoeRouteLogits in;
  const float* bias;  // [E] selection bias, or null
  int64_t k, n_group, topk_group;
  int64_t* ids;      // [T, k], written
  float* weights;    // [T, k], written
  int32_t* counts;   // [E], written
  float* prob_sums;  // [E], written
};

// Routing backward: grad_logits [T, E] contiguous (0 outside each token's group).
struct MoeRouteBwdArgs {
  MoeRouteLogits in;
  const int64_t* ids;  // [T, k] from the forward
  int64_t k;
  const float* grad_weights;    // [T, k], or null
  const float* grad_prob_sums;  // [E], or null
  float* grad_logits;           // [T, E] contiguous, written
};

// Plan: stable counting sort of the n_slots slot ids by expert; all outputs int32.
struct MoePlanArgs {
  const void* ids;  // [n_slots] of ids_dtype (kInt32 or kInt64), contiguous
  int ids_dtype;
  int64_t n_slots, E, block_m;
  int32_t* counts;       // [E]
  int32_t* offsets;      // [E + 1]
  int32_t* sorted_slot;  // [n_slots]
  int32_t* slot_pos;     // [n_slots]
  int32_t* tile_expert;  // [max_tiles] (written when block_m > 0)
  int32_t* tile_row;     // [max_tiles]
  int64_t max_tiles;
};

// Permute (gather): xs[p, :] = x[sorted_slot[p] / k, :], rows copied as bytes.
struct MoePermuteArgs {
  const void* x;  // [T, D], row stride x_row_stride, column stride 1
  int64_t T, D, x_row_stride, elem_size;
  const int32_t* sorted_slot;  // [n_rows]
  int64_t n_rows, k;
  void* xs;  // [n_rows, D] contiguous, written
};

// The expert rows of the slots and their weights, read by combine and its backward.
struct MoeCombineInput {
  const void* src;  // [n_src, D] of dtype, row stride src_row_stride, column stride 1
  int dtype;
  int64_t n_src, D, src_row_stride;
  const int32_t* slot_pos;  // [T·k]; positions outside [0, n_src) add nothing
  int64_t T, k;
  const float* weights;  // [T, k], or null (= 1)
};

// Combine: out[t] = Σ_{j<k, ascending} w[t, j]·src[slot_pos[t·k + j]] in fp32.
struct MoeCombineArgs {
  MoeCombineInput in;
  void* out;  // [T, D] contiguous of dtype, written
};

// Combine backward: grad_src[slot_pos[t·k + j]] = w[t, j]·grad_out[t] and
// grad_weights[t, j] = <grad_out[t], src[slot_pos[t·k + j]]> in fp32.
struct MoeCombineBwdArgs {
  MoeCombineInput in;
  const void* grad_out;  // [T, D] of dtype, row stride grad_out_row_stride, column stride 1
  int64_t grad_out_row_stride;
  void* grad_src;       // [n_src, D] contiguous of dtype, written; may be src itself
  float* grad_weights;  // [T, k], written, or null
};

// The expert activation of the up projection h [n_rows, F_in] (row stride h_row_stride, column
// stride 1): SiLU-GLU (F_in = 2F, gate columns [0, F), up columns [F, 2F)) or GELU (F_in = F, erf
// or tanh form). Forward: a [n_rows, F] contiguous. Backward, fused with the recomputation of a:
// dh [n_rows, F_in] contiguous from da [n_rows, F] contiguous (dh may be h itself when its rows
// are contiguous), and a when not null.
struct MoeActivationArgs {
  const void* h;
  int dtype;
  int64_t n_rows, F, h_row_stride;
  bool tanh_form;  // GELU only
  const void* da;  // backward
  void* dh;        // backward
  void* a;         // written (optional in the SiLU-GLU backward)
};

// ---- omni-attention -------------------------------------------------------------------------

// One [B, L, H, Dh] fp32 operand: the element strides of the batch, sequence and head dimensions;
// the head dimension Dh is contiguous.
struct BLHD {
  const float* p;
  int64_t sb, sl, sh;
};

// Query i of sequence b may attend to key j when (j < limit[b, i] and key_valid[b, j]) or j == i.
// rope_half > 0: q and k are first turned by the rotary embedding (rotate-half convention,
// elements d and d + half of each head, d < half, 2·half <= Dh) by the angles whose cos / sin are
// rope_cos / rope_sin [B, L, rope_half] contiguous.
struct OmniAttentionArgs {
  BLHD q, k, v;
  int64_t B, L, H, Dh;
  const int32_t* limit;      // [B, L] contiguous
  const uint8_t* key_valid;  // [B, L] contiguous, 0 / 1
  const float* rope_cos;
  const float* rope_sin;
  int64_t rope_half;
  float scale;  // the score multiplier (1/sqrt(Dh) usually)
};

}  // namespace unif2ace

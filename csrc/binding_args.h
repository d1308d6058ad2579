// Each kernel's operands checked and turned into its launcher struct (unif2ace/args.h): one
// function per kernel, shared by the CPU module (bindings.cpp) and the CUDA module
// (bindings_cuda.cpp). Sizes and strides come from the descriptors; only true scalars (top_k,
// seeds, alpha, ...) are passed as numbers. Every check that fails raises a ValueError naming the
// operand (binding_util.h), before any launcher runs.
#pragma once

#include <cstdint>
#include <string>

#include "binding_util.h"
#include "unif2ace/args.h"

namespace unif2ace {

// ---- D3Diff loss ----------------------------------------------------------------------------

inline D3DiffLossArgs d3diff_loss_args(const TensorDesc& logits, const TensorDesc& targets,
                                       const TensorDesc& ratio, const TensorDesc& w_ce,
                                       const TensorDesc& w_se, float alpha, int64_t ignore_index,
                                       const TensorDesc& loss, const TensorDesc& grad,
                                       const TensorDesc& grad_scale) {
  const char* op = "d3diff_loss_fwd";
  const Arg z(op, "logits", logits);
  z.required().floating().ndim(2).unit_last_stride();
  const int64_t n = logits.size(0), k = logits.size(1);
  Arg(op, "targets", targets).required().dtype(kInt64).shape({n}).contiguous();
  for (const auto& [name, t] : {std::pair<const char*, const TensorDesc&>{"ratio", ratio},
                                {"w_ce", w_ce},
                                {"w_se", w_se},
                                {"loss", loss}})
    Arg(op, name, t).required().dtype(kFloat32).shape({n}).contiguous();
  Arg(op, "grad", grad).same_dtype(z).shape({n, k}).unit_last_stride();
  Arg(op, "grad_scale", grad_scale).dtype(kFloat32).shape({n}).contiguous();
  D3DiffLossArgs a{};
  a.logits = logits.data;
  a.dtype = logits.dtype;
  a.n_rows = n;
  a.n_cols = k;
  a.row_stride = logits.stride(0);
  a.targets = targets.ptr<const int64_t>();
  a.ratio = ratio.ptr<const float>();
  a.w_ce = w_ce.ptr<const float>();
  a.w_se = w_se.ptr<const float>();
  a.alpha = alpha;
  a.ignore_index = ignore_index;
  a.loss = loss.ptr<float>();
  a.grad = grad.ptr<void>();
  a.grad_row_stride = grad.present ? grad.stride(0) : 0;
  a.grad_scale = grad_scale.ptr<const float>();
  return a;
}

inline std::string detail(const D3DiffLossArgs& a) {
  return "n_rows=" + std::to_string(a.n_rows) + ", n_cols=" + std::to_string(a.n_cols) +
         ", row_stride=" + std::to_string(a.row_stride) + ", dtype=" + dtype_name(a.dtype) +
         (a.grad != nullptr && a.grad == a.logits ? ", in place" : "");
}

// ---- mask sampling --------------------------------------------------------------------------

// A [B, L] output of the per-position kernels: out_ids int64, out_mask bool, confidence float32.
inline void check_positions(const char* op, const TensorDesc& out_ids, const TensorDesc& out_mask,
                            int64_t B, int64_t L) {
  Arg(op, "out_ids", out_ids).required().dtype(kInt64).shape({B, L}).contiguous();
  Arg(op, "out_mask", out_mask).required().dtype(kBool, kUInt8).shape({B, L}).contiguous();
}

inline MaskTokensArgs mask_tokens_args(const TensorDesc& ids, const TensorDesc& gamma,
                                       const TensorDesc& n_mask, int64_t mask_id, uint64_t seed,
                                       uint32_t offset, int mode, const TensorDesc& out_ids,
                                       const TensorDesc& out_mask) {
  const char* op = "mask_tokens_fwd";
  Arg(op, "ids", ids).required().dtype(kInt64).ndim(2).contiguous();
  const int64_t B = ids.size(0), L = ids.size(1);
  const Arg g(op, "gamma", gamma), n(op, "n_mask", n_mask);
  g.dtype(kFloat32).shape({B}).contiguous();
  n.dtype(kInt64).shape({B}).contiguous();
  if (mode == 0) n.required();  // mode 0 ("count") reads n_mask, mode 1 ("bernoulli") gamma
  if (mode == 1) g.required();
  check_positions(op, out_ids, out_mask, B, L);
  MaskTokensArgs a{};
  a.ids = ids.ptr<const int64_t>();
  a.B = B;
  a.L = L;
  a.gamma = gamma.ptr<const float>();
  a.n_mask = n_mask.ptr<const int64_t>();
  a.mask_id = mask_id;
  a.seed = seed;
  a.offset = offset;
  a.mode = mode;
  a.out_ids = out_ids.ptr<int64_t>();
  a.out_mask = out_mask.ptr<bool>();
  return a;
}

inline MaskgitStepArgs maskgit_step_args(
    const TensorDesc& logits, const TensorDesc& uncond, const TensorDesc& ids,
    const TensorDesc& mask_len, int64_t mask_id, double guidance, float inv_temperature,
    float choice_temperature, uint64_t seed, uint32_t offset, const TensorDesc& gumbel,
    const TensorDesc& choice, const TensorDesc& out_ids, const TensorDesc& out_mask,
    const TensorDesc& confidence) {
  const char* op = "maskgit_step_fwd";
  const Arg z(op, "logits", logits);
  z.required().floating().ndim(3).unit_last_stride();
  const int64_t B = logits.size(0), L = logits.size(1), K = logits.size(2);
  Arg(op, "uncond", uncond).same_dtype(z).same_shape(z).unit_last_stride();
  Arg(op, "ids", ids).required().dtype(kInt64).shape({B, L}).contiguous();
  Arg(op, "mask_len", mask_len).required().dtype(kInt64).shape({B}).contiguous();
  Arg(op, "gumbel", gumbel).dtype(kFloat32).shape({B, L, K}).contiguous();
  Arg(op, "choice", choice).dtype(kFloat32).shape({B, L}).contiguous();
  check_positions(op, out_ids, out_mask, B, L);
  Arg(op, "confidence", confidence).required().dtype(kFloat32).shape({B, L}).contiguous();
  MaskgitStepArgs a{};
  a.logits = logits.data;
  a.dtype = logits.dtype;
  a.B = B;
  a.L = L;
  a.K = K;
  a.stride_b = logits.stride(0);
  a.stride_l = logits.stride(1);
  a.uncond = uncond.ptr<const void>();
  a.ustride_b = uncond.present ? uncond.stride(0) : 0;
  a.ustride_l = uncond.present ? uncond.stride(1) : 0;
  a.ids = ids.ptr<const int64_t>();
  a.mask_len = mask_len.ptr<const int64_t>();
  a.mask_id = mask_id;
  a.guidance = guidance;
  a.inv_temperature = inv_temperature;
  a.choice_temperature = choice_temperature;
  a.seed = seed;
  a.offset = offset;
  a.gumbel = gumbel.ptr<const float>();
  a.choice = choice.ptr<const float>();
  a.out_ids = out_ids.ptr<int64_t>();
  a.out_mask = out_mask.ptr<bool>();
  a.confidence = confidence.ptr<float>();
  return a;
}

// ---- grouped MoE dispatch -------------------------------------------------------------------

inline MoeRouteLogits route_logits(const char* op, const TensorDesc& logits,
                                   const TensorDesc& group_offsets, const TensorDesc& group_ids,
                                   int scoring, bool renormalize, float scaling) {
  Arg(op, "logits", logits).required().floating().ndim(2).unit_last_stride();
  const int64_t T = logits.size(0);
  Arg(op, "group_offsets", group_offsets).required().dtype(kInt64).ndim(1).contiguous();
  Arg(op, "group_ids", group_ids).dtype(kInt64).shape({T}).contiguous();
  MoeRouteLogits in{};
  in.logits = logits.data;
  in.dtype = logits.dtype;
  in.T = T;
  in.E = logits.size(1);
  in.row_stride = logits.stride(0);
  in.group_offsets = group_offsets.ptr<const int64_t>();
  in.G = group_offsets.size(0) - 1;
  in.group_ids = group_ids.ptr<const int64_t>();
  in.scoring = scoring;
  in.renormalize = renormalize;
  in.scaling = scaling;
  return in;
}

inline MoeRouteArgs moe_route_args(const TensorDesc& logits, const TensorDesc& group_offsets,
                                   const TensorDesc& group_ids, const TensorDesc& bias,
                                   int64_t top_k, int scoring, bool renormalize, int64_t n_group,
                                   int64_t topk_group, float scaling, const TensorDesc& ids,
                                   const TensorDesc& weights, const TensorDesc& counts,
                                   const TensorDesc& prob_sums) {
  const char* op = "moe_route_fwd";
  const MoeRouteLogits in =
      route_logits(op, logits, group_offsets, group_ids, scoring, renormalize, scaling);
  Arg(op, "bias", bias).dtype(kFloat32).shape({in.E}).contiguous();
  Arg(op, "ids", ids).required().dtype(kInt64).shape({in.T, top_k}).contiguous();
  Arg(op, "weights", weights).required().dtype(kFloat32).shape({in.T, top_k}).contiguous();
  Arg(op, "counts", counts).required().dtype(kInt32).shape({in.E}).contiguous();
  Arg(op, "prob_sums", prob_sums).required().dtype(kFloat32).shape({in.E}).contiguous();
  MoeRouteArgs a{};
  a.in = in;
  a.bias = bias.ptr<const float>();
  a.k = top_k;
  a.n_group = n_group;
  a.topk_group = topk_group;
  a.ids = ids.ptr<int64_t>();
  a.weights = weights.ptr<float>();
  a.counts = counts.ptr<int32_t>();
  a.prob_sums = prob_sums.ptr<float>();
  return a;
}

inline MoeRouteBwdArgs moe_route_bwd_args(const TensorDesc& logits, const TensorDesc& group_offsets,
                                          const TensorDesc& group_ids, const TensorDesc& ids,
                                          int scoring, bool renormalize, float scaling,
                                          const TensorDesc& grad_weights,
                                          const TensorDesc& grad_prob_sums,
                                          const TensorDesc& grad_logits) {
  const char* op = "moe_route_bwd";
  const MoeRouteLogits in =
      route_logits(op, logits, group_offsets, group_ids, scoring, renormalize, scaling);
  Arg(op, "ids", ids).required().dtype(kInt64).ndim(2).shape({in.T, -1}).contiguous();
  const int64_t k = ids.size(1);
  Arg(op, "grad_weights", grad_weights).dtype(kFloat32).shape({in.T, k}).contiguous();
  Arg(op, "grad_prob_sums", grad_prob_sums).dtype(kFloat32).shape({in.E}).contiguous();
  Arg(op, "grad_logits", grad_logits).required().dtype(kFloat32).shape({in.T, in.E}).contiguous();
  MoeRouteBwdArgs a{};
  a.in = in;
  a.ids = ids.ptr<const int64_t>();
  a.k = k;
  a.grad_weights = grad_weights.ptr<const float>();
  a.grad_prob_sums = grad_prob_sums.ptr<const float>();
  a.grad_logits = grad_logits.ptr<float>();
  return a;
}

inline MoePlanArgs moe_plan_args(const TensorDesc& ids, int64_t block_m, const TensorDesc& counts,
                                 const TensorDesc& offsets, const TensorDesc& sorted_slot,
                                 const TensorDesc& slot_pos, const TensorDesc& tile_expert,
                                 const TensorDesc& tile_row) {
  const char* op = "moe_plan";
  Arg(op, "ids", ids).required().dtype(kInt32, kInt64).contiguous();
  const int64_t n = ids.numel();
  Arg(op, "counts", counts).required().dtype(kInt32).ndim(1).contiguous();
  const int64_t E = counts.size(0);
  Arg(op, "offsets", offsets).required().dtype(kInt32).shape({E + 1}).contiguous();
  Arg(op, "sorted_slot", sorted_slot).required().dtype(kInt32).shape({n}).contiguous();
  Arg(op, "slot_pos", slot_pos).required().dtype(kInt32).shape({n}).contiguous();
  const Arg te(op, "tile_expert", tile_expert);
  te.dtype(kInt32).ndim(1).contiguous();
  Arg(op, "tile_row", tile_row).dtype(kInt32).same_shape(te).contiguous();
  if (tile_expert.present != tile_row.present)
    throw pybind11::value_error("moe_plan: tile_expert and tile_row must both be given or None");
  MoePlanArgs a{};
  a.ids = ids.data;
  a.ids_dtype = ids.dtype;
  a.n_slots = n;
  a.E = E;
  a.block_m = block_m;
  a.counts = counts.ptr<int32_t>();
  a.offsets = offsets.ptr<int32_t>();
  a.sorted_slot = sorted_slot.ptr<int32_t>();
  a.slot_pos = slot_pos.ptr<int32_t>();
  a.tile_expert = tile_expert.ptr<int32_t>();
  a.tile_row = tile_row.ptr<int32_t>();
  a.max_tiles = tile_expert.present ? tile_expert.size(0) : 0;
  return a;
}

inline MoePermuteArgs moe_permute_args(const TensorDesc& x, const TensorDesc& sorted_slot,
                                       int64_t top_k, const TensorDesc& xs) {
  const char* op = "moe_permute";
  const Arg xa(op, "x", x);
  xa.required().ndim(2).unit_last_stride();
  if (dtype_size(x.dtype) == 0)
    throw pybind11::value_error("moe_permute: x must have a dtype the kernels know, got an "
                                "unsupported dtype");
  Arg(op, "sorted_slot", sorted_slot).required().dtype(kInt32).ndim(1).contiguous();
  const int64_t n = sorted_slot.size(0), D = x.size(1);
  Arg(op, "xs", xs).required().same_dtype(xa).shape({n, D}).contiguous();
  MoePermuteArgs a{};
  a.x = x.data;
  a.T = x.size(0);
  a.D = D;
  a.x_row_stride = x.stride(0);
  a.elem_size = dtype_size(x.dtype);
  a.sorted_slot = sorted_slot.ptr<const int32_t>();
  a.n_rows = n;
  a.k = top_k;
  a.xs = xs.data;
  return a;
}

// src [n_src, D], slot_pos [T·k] and weights [T, k] of combine and its backward; T comes from the
// output (combine) or grad_out (backward).
inline MoeCombineInput combine_input(const char* op, const TensorDesc& src,
                                     const TensorDesc& slot_pos, const TensorDesc& weights,
                                     int64_t T) {
  Arg(op, "src", src).required().floating().ndim(2).unit_last_stride();
  Arg(op, "slot_pos", slot_pos).required().dtype(kInt32).ndim(1).contiguous();
  const int64_t n_slots = slot_pos.size(0);
  const int64_t k = T > 0 ? n_slots / T : 1;
  if (T * k != n_slots)
    throw pybind11::value_error(std::string(op) + ": slot_pos must hold T·k slots for T = " +
                                std::to_string(T) + " tokens, got " + std::to_string(n_slots));
  Arg(op, "weights", weights).dtype(kFloat32).shape({T, k}).contiguous();
  MoeCombineInput in{};
  in.src = src.data;
  in.dtype = src.dtype;
  in.n_src = src.size(0);
  in.D = src.size(1);
  in.src_row_stride = src.stride(0);
  in.slot_pos = slot_pos.ptr<const int32_t>();
  in.T = T;
  in.k = k;
  in.weights = weights.ptr<const float>();
  return in;
}

inline MoeCombineArgs moe_combine_args(const TensorDesc& src, const TensorDesc& slot_pos,
                                       const TensorDesc& weights, const TensorDesc& out) {
  const char* op = "moe_combine";
  const Arg o(op, "out", out);
  o.required().ndim(2).contiguous();
  const MoeCombineInput in = combine_input(op, src, slot_pos, weights, out.size(0));
  o.same_dtype(Arg(op, "src", src)).shape({in.T, in.D});
  MoeCombineArgs a{};
  a.in = in;
  a.out = out.data;
  return a;
}

inline MoeCombineBwdArgs moe_combine_bwd_args(const TensorDesc& grad_out, const TensorDesc& src,
                                              const TensorDesc& slot_pos,
                                              const TensorDesc& weights,
                                              const TensorDesc& grad_src,
                                              const TensorDesc& grad_weights) {
  const char* op = "moe_combine_bwd";
  const Arg go(op, "grad_out", grad_out);
  go.required().ndim(2).unit_last_stride();
  const MoeCombineInput in = combine_input(op, src, slot_pos, weights, grad_out.size(0));
  const Arg s(op, "src", src);
  go.same_dtype(s).shape({in.T, in.D});
  Arg(op, "grad_src", grad_src).required().same_dtype(s).same_shape(s).contiguous();
  Arg(op, "grad_weights", grad_weights).dtype(kFloat32).shape({in.T, in.k}).contiguous();
  MoeCombineBwdArgs a{};
  a.in = in;
  a.grad_out = grad_out.data;
  a.grad_out_row_stride = grad_out.stride(0);
  a.grad_src = grad_src.data;
  a.grad_weights = grad_weights.ptr<float>();
  return a;
}

// The expert activations: h [n_rows, F_in] with F_in = 2F (SiLU-GLU, glu) or F (GELU); a, da
// [n_rows, F] and dh [n_rows, F_in] contiguous, all of h's dtype. F is read from a (forward) or da
// (backward); a is optional only in the SiLU-GLU backward.
inline MoeActivationArgs moe_activation_args(const char* op, bool glu, bool backward,
                                             const TensorDesc& h, const TensorDesc& da,
                                             const TensorDesc& dh, const TensorDesc& a,
                                             bool tanh_form) {
  const Arg ha(op, "h", h);
  ha.required().floating().ndim(2).unit_last_stride();
  const Arg src = backward ? Arg(op, "da", da) : Arg(op, "a", a);
  src.required().same_dtype(ha).ndim(2).contiguous();
  const int64_t n = h.size(0), F = (backward ? da : a).size(1), F_in = glu ? 2 * F : F;
  ha.shape({n, F_in});
  Arg(op, "da", da).shape({n, F});
  const Arg dha(op, "dh", dh);
  dha.same_dtype(ha).shape({n, F_in}).contiguous();
  const Arg aa(op, "a", a);
  aa.same_dtype(ha).shape({n, F}).contiguous();
  if (backward) dha.required();
  if (!(backward && glu)) aa.required();
  MoeActivationArgs args{};
  args.h = h.data;
  args.dtype = h.dtype;
  args.n_rows = n;
  args.F = F;
  args.h_row_stride = h.stride(0);
  args.tanh_form = tanh_form;
  args.da = da.ptr<const void>();
  args.dh = dh.ptr<void>();
  args.a = a.ptr<void>();
  return args;
}

// ---- omni-attention -------------------------------------------------------------------------

inline BLHD blhd(const TensorDesc& t) {
  return BLHD{t.ptr<const float>(), t.stride(0), t.stride(1), t.stride(2)};
}

// q, k, v [B, L, H, Dh] float32 with a dense head dimension; limit int32 and key_valid uint8 / bool
// [B, L]; rope_cos / rope_sin float32 [B, L, half] (both or neither).
inline OmniAttentionArgs omni_attention_args(const char* op, const TensorDesc& q,
                                             const TensorDesc& k, const TensorDesc& v,
                                             const TensorDesc& limit, const TensorDesc& key_valid,
                                             const TensorDesc& rope_cos,
                                             const TensorDesc& rope_sin, float scale) {
  const Arg qa(op, "q", q);
  qa.required().dtype(kFloat32).ndim(4).unit_last_stride();
  for (const auto& [name, t] : {std::pair<const char*, const TensorDesc&>{"k", k}, {"v", v}})
    Arg(op, name, t).required().dtype(kFloat32).same_shape(qa).unit_last_stride();
  const int64_t B = q.size(0), L = q.size(1);
  Arg(op, "limit", limit).required().dtype(kInt32).shape({B, L}).contiguous();
  Arg(op, "key_valid", key_valid).required().dtype(kUInt8, kBool).shape({B, L}).contiguous();
  const Arg c(op, "rope_cos", rope_cos);
  c.dtype(kFloat32).ndim(3).shape({B, L, -1}).contiguous();
  Arg(op, "rope_sin", rope_sin).dtype(kFloat32).same_shape(c).contiguous();
  if (rope_cos.present != rope_sin.present)
    throw pybind11::value_error(std::string(op) +
                                ": rope_cos and rope_sin must both be given or None");
  OmniAttentionArgs a{};
  a.q = blhd(q);
  a.k = blhd(k);
  a.v = blhd(v);
  a.B = B;
  a.L = L;
  a.H = q.size(2);
  a.Dh = q.size(3);
  a.limit = limit.ptr<const int32_t>();
  a.key_valid = key_valid.ptr<const uint8_t>();
  a.rope_cos = rope_cos.ptr<const float>();
  a.rope_sin = rope_sin.ptr<const float>();
  a.rope_half = rope_cos.present ? rope_cos.size(2) : 0;
  a.scale = scale;
  return a;
}

inline std::string detail(const OmniAttentionArgs& a) {
  return "B=" + std::to_string(a.B) + ", L=" + std::to_string(a.L) + ", H=" +
         std::to_string(a.H) + ", Dh=" + std::to_string(a.Dh);
}

// A [B, L, H, Dh] (or [B, H, L] for lse) float32 output or saved operand of the attention.
inline void check_attention_tensor(const char* op, const char* name, const TensorDesc& t,
                                   std::initializer_list<int64_t> shape, bool dense) {
  const Arg a(op, name, t);
  a.required().dtype(kFloat32).shape(shape);
  if (dense) {
    a.contiguous();
  } else {
    a.unit_last_stride();
  }
}

// ---- CUDA workspace -------------------------------------------------------------------------

struct Workspace {
  void* ptr;
  int64_t bytes;
};

// A uint8 [bytes] device buffer (None: no workspace).
inline Workspace workspace_arg(const char* op, const TensorDesc& ws) {
  Arg(op, "workspace", ws).dtype(kUInt8).ndim(1).contiguous();
  return ws.present ? Workspace{ws.data, ws.size(0)} : Workspace{nullptr, 0};
}

}  // namespace unif2ace

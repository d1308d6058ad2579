// pybind11 module unif2ace._C: the C++ CPU kernels. Each function takes its tensors as descriptors
// (python/unif2ace/ops/_native.py: desc) and its true scalars as numbers, checks every operand
// (binding_args.h), runs the launcher with the GIL released, and raises on a non-zero Status.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "binding_args.h"
#include "binding_util.h"
#include "cpu/attention.h"
#include "cpu/d3diff_loss.h"
#include "cpu/mask_sampling.h"
#include "cpu/moe.h"

namespace py = pybind11;
using unif2ace::TensorDesc;

namespace {

using unif2ace::raise_if_error;

// The MoE activations: forward a = act(h), backward (dh, a) from (h, da).
void activation(const char* op, unif2ace::Status (*launcher)(const unif2ace::MoeActivationArgs&),
                bool glu, bool backward, const TensorDesc& h, const TensorDesc& da,
                const TensorDesc& dh, const TensorDesc& a, bool tanh_form) {
  const auto args = unif2ace::moe_activation_args(op, glu, backward, h, da, dh, a, tanh_form);
  raise_if_error(launcher(args), op,
                 "n_rows=" + std::to_string(args.n_rows) + ", F=" + std::to_string(args.F));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  namespace u = unif2ace;
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "unif2ace C++ CPU kernels (tensor descriptors in; see unif2ace.ops for the tensor API)";

  // ---- D3Diff loss ----------------------------------------------------------------------------
  m.def(
      "d3diff_loss_fwd",
      [](const TensorDesc& logits, const TensorDesc& targets, const TensorDesc& ratio,
         const TensorDesc& w_ce, const TensorDesc& w_se, float alpha, int64_t ignore_index,
         const TensorDesc& loss, const TensorDesc& grad, const TensorDesc& grad_scale) {
        const auto a = u::d3diff_loss_args(logits, targets, ratio, w_ce, w_se, alpha,
                                           ignore_index, loss, grad, grad_scale);
        raise_if_error(u::d3diff_loss_fwd_cpu(a), "d3diff_loss_fwd", u::detail(a));
      },
      py::arg("logits"), py::arg("targets"), py::arg("ratio"), py::arg("w_ce"), py::arg("w_se"),
      py::arg("alpha"), py::arg("ignore_index"), py::arg("loss"), py::arg("grad"),
      py::arg("grad_scale"), nogil(),
      "D3Diff loss rows and (optionally, grad not None) their gradient, OpenMP over rows "
      "(operands: csrc/include/unif2ace/args.h D3DiffLossArgs).");
  m.def(
      "d3diff_simd_level", [] { return std::string(u::d3diff_cpu_simd_level()); },
      "Instruction-set variant the D3Diff CPU kernel runs: baseline, avx_fma, avx2_fma or avx512 "
      "(UNIF2ACE_CPU_SIMD caps it).");
  m.def(
      "d3diff_set_simd_level",
      [](const std::string& name) {
        raise_if_error(u::d3diff_cpu_set_simd_level(name.c_str()), "d3diff_set_simd_level",
                       "'" + name + "' unknown or not supported by this CPU");
      },
      py::arg("name"), "Force a variant of the D3Diff CPU kernel (tests, timings).");

  // ---- grouped MoE dispatch (operands: unif2ace/args.h, Moe*Args) ----------------------------
  m.def(
      "moe_route_fwd",
      [](const TensorDesc& logits, const TensorDesc& group_offsets, const TensorDesc& group_ids,
         const TensorDesc& bias, int64_t top_k, int scoring, bool renormalize, int64_t n_group,
         int64_t topk_group, float scaling, const TensorDesc& ids, const TensorDesc& weights,
         const TensorDesc& counts, const TensorDesc& prob_sums) {
        const auto a = u::moe_route_args(logits, group_offsets, group_ids, bias, top_k, scoring,
                                         renormalize, n_group, topk_group, scaling, ids, weights,
                                         counts, prob_sums);
        raise_if_error(u::moe_route_fwd_cpu(a), "moe_route_fwd",
                       "T=" + std::to_string(a.in.T) + ", E=" + std::to_string(a.in.E) +
                           ", G=" + std::to_string(a.in.G) + ", k=" + std::to_string(top_k) +
                           ", n_group=" + std::to_string(n_group) +
                           ", topk_group=" + std::to_string(topk_group));
      },
      py::arg("logits"), py::arg("group_offsets"), py::arg("group_ids"), py::arg("bias"),
      py::arg("top_k"), py::arg("scoring"), py::arg("renormalize"), py::arg("n_group"),
      py::arg("topk_group"), py::arg("scaling"), py::arg("ids"), py::arg("weights"),
      py::arg("counts"), py::arg("prob_sums"), nogil(),
      "Routing forward: ids, weights, counts and prob_sums from the logits.");
  m.def(
      "moe_route_bwd",
      [](const TensorDesc& logits, const TensorDesc& group_offsets, const TensorDesc& group_ids,
         const TensorDesc& ids, int scoring, bool renormalize, float scaling,
         const TensorDesc& grad_weights, const TensorDesc& grad_prob_sums,
         const TensorDesc& grad_logits) {
        const auto a = u::moe_route_bwd_args(logits, group_offsets, group_ids, ids, scoring,
                                             renormalize, scaling, grad_weights, grad_prob_sums,
                                             grad_logits);
        raise_if_error(u::moe_route_bwd_cpu(a), "moe_route_bwd",
                       "T=" + std::to_string(a.in.T) + ", E=" + std::to_string(a.in.E) +
                           ", k=" + std::to_string(a.k));
      },
      py::arg("logits"), py::arg("group_offsets"), py::arg("group_ids"), py::arg("ids"),
      py::arg("scoring"), py::arg("renormalize"), py::arg("scaling"), py::arg("grad_weights"),
      py::arg("grad_prob_sums"), py::arg("grad_logits"), nogil(),
      "Routing backward: grad_logits float32 [T, E].");
  m.def(
      "moe_plan",
      [](const TensorDesc& ids, int64_t block_m, const TensorDesc& counts,
         const TensorDesc& offsets, const TensorDesc& sorted_slot, const TensorDesc& slot_pos,
         const TensorDesc& tile_expert, const TensorDesc& tile_row) {
        const auto a = u::moe_plan_args(ids, block_m, counts, offsets, sorted_slot, slot_pos,
                                        tile_expert, tile_row);
        raise_if_error(u::moe_plan_cpu(a), "moe_plan",
                       "n_slots=" + std::to_string(a.n_slots) + ", E=" + std::to_string(a.E) +
                           ", block_m=" + std::to_string(block_m) +
                           " (an expert id outside [0, E)?)");
      },
      py::arg("ids"), py::arg("block_m"), py::arg("counts"), py::arg("offsets"),
      py::arg("sorted_slot"), py::arg("slot_pos"), py::arg("tile_expert"), py::arg("tile_row"),
      nogil(), "Plan: stable counting sort of the slot ids by expert, int32 outputs.");
  m.def(
      "moe_permute",
      [](const TensorDesc& x, const TensorDesc& sorted_slot, int64_t top_k, const TensorDesc& xs) {
        const auto a = u::moe_permute_args(x, sorted_slot, top_k, xs);
        raise_if_error(u::moe_permute_cpu(a), "moe_permute",
                       "T=" + std::to_string(a.T) + ", D=" + std::to_string(a.D));
      },
      py::arg("x"), py::arg("sorted_slot"), py::arg("top_k"), py::arg("xs"), nogil(),
      "Permute: xs[p] = x[sorted_slot[p] / top_k].");
  m.def(
      "moe_combine",
      [](const TensorDesc& src, const TensorDesc& slot_pos, const TensorDesc& weights,
         const TensorDesc& out) {
        const auto a = u::moe_combine_args(src, slot_pos, weights, out);
        raise_if_error(u::moe_combine_cpu(a), "moe_combine",
                       "T=" + std::to_string(a.in.T) + ", D=" + std::to_string(a.in.D));
      },
      py::arg("src"), py::arg("slot_pos"), py::arg("weights"), py::arg("out"), nogil(),
      "Combine: out[t] = sum_j w[t, j] src[slot_pos[t*k + j]], fp32 accumulation.");
  m.def(
      "moe_combine_bwd",
      [](const TensorDesc& grad_out, const TensorDesc& src, const TensorDesc& slot_pos,
         const TensorDesc& weights, const TensorDesc& grad_src, const TensorDesc& grad_weights) {
        const auto a =
            u::moe_combine_bwd_args(grad_out, src, slot_pos, weights, grad_src, grad_weights);
        raise_if_error(u::moe_combine_bwd_cpu(a), "moe_combine_bwd",
                       "T=" + std::to_string(a.in.T) + ", D=" + std::to_string(a.in.D));
      },
      py::arg("grad_out"), py::arg("src"), py::arg("slot_pos"), py::arg("weights"),
      py::arg("grad_src"), py::arg("grad_weights"), nogil(),
      "Combine backward: grad_src and (grad_weights not None) grad_weights.");
  m.def(
      "moe_silu_glu_fwd",
      [](const TensorDesc& h, const TensorDesc& a) {
        activation("moe_silu_glu_fwd", u::moe_silu_glu_fwd_cpu, true, false, h, {}, {}, a, false);
      },
      py::arg("h"), py::arg("a"), nogil(), "a = silu(h[:, :F]) * h[:, F:].");
  m.def(
      "moe_silu_glu_bwd",
      [](const TensorDesc& h, const TensorDesc& da, const TensorDesc& dh, const TensorDesc& a) {
        activation("moe_silu_glu_bwd", u::moe_silu_glu_bwd_cpu, true, true, h, da, dh, a, false);
      },
      py::arg("h"), py::arg("da"), py::arg("dh"), py::arg("a"), nogil(),
      "dh (and a, when not None) from h and da for a = silu(gate) * up; dh may be h.");
  m.def(
      "moe_gelu_fwd",
      [](const TensorDesc& h, bool tanh_form, const TensorDesc& a) {
        activation("moe_gelu_fwd", u::moe_gelu_fwd_cpu, false, false, h, {}, {}, a, tanh_form);
      },
      py::arg("h"), py::arg("tanh_form"), py::arg("a"), nogil(),
      "a = gelu(h), erf or tanh form.");
  m.def(
      "moe_gelu_bwd",
      [](const TensorDesc& h, const TensorDesc& da, bool tanh_form, const TensorDesc& dh,
         const TensorDesc& a) {
        activation("moe_gelu_bwd", u::moe_gelu_bwd_cpu, false, true, h, da, dh, a, tanh_form);
      },
      py::arg("h"), py::arg("da"), py::arg("tanh_form"), py::arg("dh"), py::arg("a"), nogil(),
      "dh = da * gelu'(h) and a = gelu(h), erf or tanh form; dh may be h.");

  // ---- omni-attention (operands: unif2ace/args.h, OmniAttentionArgs) --------------------------
  m.def("omni_attention_supported", &u::omni_attention_supported, py::arg("head_dim"),
        "Whether a kernel is compiled for this head size.");
  m.def(
      "omni_attention_fwd",
      [](const TensorDesc& q, const TensorDesc& k, const TensorDesc& v, const TensorDesc& limit,
         const TensorDesc& key_valid, const TensorDesc& rope_cos, const TensorDesc& rope_sin,
         float scale, const TensorDesc& out, const TensorDesc& lse) {
        const char* op = "omni_attention_fwd";
        const auto a =
            u::omni_attention_args(op, q, k, v, limit, key_valid, rope_cos, rope_sin, scale);
        u::check_attention_tensor(op, "out", out, {a.B, a.L, a.H, a.Dh}, true);
        u::check_attention_tensor(op, "lse", lse, {a.B, a.H, a.L}, true);
        raise_if_error(u::omni_attention_fwd_cpu(a, out.ptr<float>(), lse.ptr<float>()), op,
                       u::detail(a));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("limit"), py::arg("key_valid"),
      py::arg("rope_cos"), py::arg("rope_sin"), py::arg("scale"), py::arg("out"), py::arg("lse"),
      nogil(),
      "out [B, L, H, Dh] contiguous and lse [B, H, L]; q, k, v fp32 [B, L, H, Dh] with the head "
      "dimension contiguous; rope_cos / rope_sin [B, L, half] or None turn q and k first.");
  m.def(
      "omni_attention_bwd",
      [](const TensorDesc& q, const TensorDesc& k, const TensorDesc& v, const TensorDesc& out,
         const TensorDesc& grad_out, const TensorDesc& limit, const TensorDesc& key_valid,
         const TensorDesc& rope_cos, const TensorDesc& rope_sin, float scale,
         const TensorDesc& lse, const TensorDesc& dq, const TensorDesc& dk,
         const TensorDesc& dv) {
        const char* op = "omni_attention_bwd";
        const auto a =
            u::omni_attention_args(op, q, k, v, limit, key_valid, rope_cos, rope_sin, scale);
        const std::initializer_list<int64_t> blhd = {a.B, a.L, a.H, a.Dh};
        u::check_attention_tensor(op, "out", out, blhd, false);
        u::check_attention_tensor(op, "grad_out", grad_out, blhd, false);
        u::check_attention_tensor(op, "lse", lse, {a.B, a.H, a.L}, true);
        u::check_attention_tensor(op, "dq", dq, blhd, true);
        u::check_attention_tensor(op, "dk", dk, blhd, true);
        u::check_attention_tensor(op, "dv", dv, blhd, true);
        raise_if_error(u::omni_attention_bwd_cpu(a, u::blhd(out), u::blhd(grad_out),
                                                 lse.ptr<const float>(), dq.ptr<float>(),
                                                 dk.ptr<float>(), dv.ptr<float>()),
                       op, u::detail(a));
      },
      py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("grad_out"),
      py::arg("limit"), py::arg("key_valid"), py::arg("rope_cos"), py::arg("rope_sin"),
      py::arg("scale"), py::arg("lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"), nogil(),
      "dq, dk, dv [B, L, H, Dh] contiguous from the forward's out and lse.");

  // ---- mask sampling (operands: unif2ace/args.h, MaskTokensArgs / MaskgitStepArgs) ------------
  m.def(
      "mask_tokens_fwd",
      [](const TensorDesc& ids, const TensorDesc& gamma, const TensorDesc& n_mask,
         int64_t mask_id, uint64_t seed, uint32_t offset, int mode, const TensorDesc& out_ids,
         const TensorDesc& out_mask) {
        const auto a = u::mask_tokens_args(ids, gamma, n_mask, mask_id, seed, offset, mode,
                                           out_ids, out_mask);
        raise_if_error(u::mask_tokens_cpu(a), "mask_tokens_fwd",
                       "B=" + std::to_string(a.B) + ", L=" + std::to_string(a.L) +
                           ", mode=" + std::to_string(mode) + ", offset=" + std::to_string(offset));
      },
      py::arg("ids"), py::arg("gamma"), py::arg("n_mask"), py::arg("mask_id"), py::arg("seed"),
      py::arg("offset"), py::arg("mode"), py::arg("out_ids"), py::arg("out_mask"), nogil(),
      "Training-time masking (mode 0 count / 1 bernoulli) of int64 ids [B, L].");
  m.def(
      "maskgit_step_fwd",
      [](const TensorDesc& logits, const TensorDesc& uncond, const TensorDesc& ids,
         const TensorDesc& mask_len, int64_t mask_id, double guidance, float inv_temperature,
         float choice_temperature, uint64_t seed, uint32_t offset, const TensorDesc& gumbel,
         const TensorDesc& choice, const TensorDesc& out_ids, const TensorDesc& out_mask,
         const TensorDesc& confidence) {
        const auto a = u::maskgit_step_args(logits, uncond, ids, mask_len, mask_id, guidance,
                                            inv_temperature, choice_temperature, seed, offset,
                                            gumbel, choice, out_ids, out_mask, confidence);
        raise_if_error(u::maskgit_step_cpu(a), "maskgit_step_fwd",
                       "B=" + std::to_string(a.B) + ", L=" + std::to_string(a.L) +
                           ", K=" + std::to_string(a.K) + ", dtype=" + u::dtype_name(a.dtype));
      },
      py::arg("logits"), py::arg("uncond"), py::arg("ids"), py::arg("mask_len"),
      py::arg("mask_id"), py::arg("guidance"), py::arg("inv_temperature"),
      py::arg("choice_temperature"), py::arg("seed"), py::arg("offset"), py::arg("gumbel"),
      py::arg("choice"), py::arg("out_ids"), py::arg("out_mask"), py::arg("confidence"), nogil(),
      "One fused MaskGIT / Show-o decode step (sample, confidence, re-mask).");
  m.def(
      "philox_gumbel",
      [](uint64_t seed, uint32_t offset, const TensorDesc& out) {
        u::Arg("philox_gumbel", "out", out).required().dtype(u::kFloat32).ndim(1).contiguous();
        raise_if_error(u::philox_gumbel_cpu(seed, offset, out.size(0), out.ptr<float>()),
                       "philox_gumbel", "n=" + std::to_string(out.size(0)));
      },
      py::arg("seed"), py::arg("offset"), py::arg("out"), nogil(),
      "out.numel() float32 Gumbels of the step's sampling stream at (b=0, l=0, k=0..n-1).");
  m.def(
      "mask_sampling_simd_level", [] { return std::string(u::mask_sampling_cpu_simd_level()); },
      "Instruction-set variant the mask-sampling CPU kernel runs.");
}

// pybind11 module unif2ace._C: the C++ CPU kernels. A thin layer: raw pointers (tensor.data_ptr()),
// sizes, strides and scalars in; the launchers return a Status and the binding raises. The GIL is
// released while a kernel runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>

#include "cpu/attention.h"  // omni-attention
#include "cpu/d3diff_loss.h"
#include "cpu/mask_sampling.h"  // mask sampling
#include "cpu/moe.h"  // MoE dispatch

namespace py = pybind11;
using unif2ace::Status;

namespace {

template <class T>
T* ptr(std::uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

// A [B, L, H, Dh] operand from Python: (data_ptr, stride(0), stride(1), stride(2)).
using BLHDArg = std::tuple<std::uintptr_t, int64_t, int64_t, int64_t>;
unif2ace::BLHD blhd(const BLHDArg& a) {
  return {ptr<const float>(std::get<0>(a)), std::get<1>(a), std::get<2>(a), std::get<3>(a)};
}

// Bad arguments are ValueError (the Python layer validates first; this is the second line), any
// other failure RuntimeError.
void raise_if_error(int status, const char* op, const std::string& detail) {
  if (status == unif2ace::kOk) return;
  const std::string msg =
      std::string(op) + ": " + unif2ace::status_message(status) + " (" + detail + ")";
  switch (status) {
    case unif2ace::kBadDtype:
    case unif2ace::kBadShape:
    case unif2ace::kBadStride:
    case unif2ace::kBadArgument: throw py::value_error(msg);
    default: throw std::runtime_error(msg);
  }
}

void d3diff_loss_fwd(std::uintptr_t logits_ptr, int64_t n_rows, int64_t n_cols, int64_t row_stride,
                     int dtype, std::uintptr_t targets_ptr, std::uintptr_t ratio_ptr,
                     std::uintptr_t w_ce_ptr, std::uintptr_t w_se_ptr, float alpha,
                     int64_t ignore_index, std::uintptr_t loss_ptr, std::uintptr_t grad_ptr,
                     int64_t grad_row_stride, std::uintptr_t grad_scale_ptr) {
  int status;
  {
    py::gil_scoped_release nogil;
    status = unif2ace::d3diff_loss_fwd_cpu(
        ptr<const void>(logits_ptr), n_rows, n_cols, row_stride, dtype,
        ptr<const int64_t>(targets_ptr), ptr<const float>(ratio_ptr), ptr<const float>(w_ce_ptr),
        ptr<const float>(w_se_ptr), alpha, ignore_index, ptr<float>(loss_ptr), ptr<void>(grad_ptr),
        grad_row_stride, ptr<const float>(grad_scale_ptr));
  }
  raise_if_error(status, "d3diff_loss_fwd",
                 "n_rows=" + std::to_string(n_rows) + ", n_cols=" + std::to_string(n_cols) +
                     ", row_stride=" + std::to_string(row_stride) +
                     ", dtype=" + std::to_string(dtype) +
                     ", grad_row_stride=" + std::to_string(grad_row_stride) +
                     (grad_ptr != 0 && grad_ptr == logits_ptr ? ", in place" : ""));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "unif2ace C++ CPU kernels (raw pointers in; see unif2ace.ops for the tensor API)";

  m.def("d3diff_loss_fwd", &d3diff_loss_fwd, py::arg("logits_ptr"), py::arg("n_rows"),
        py::arg("n_cols"), py::arg("row_stride"), py::arg("dtype"), py::arg("targets_ptr"),
        py::arg("ratio_ptr"), py::arg("w_ce_ptr"), py::arg("w_se_ptr"), py::arg("alpha"),
        py::arg("ignore_index"), py::arg("loss_ptr"), py::arg("grad_ptr"),
        py::arg("grad_row_stride"), py::arg("grad_scale_ptr"),
        R"doc(D3Diff loss rows and (optionally) their gradient, one pass per row, OpenMP over rows.

logits [n_rows, n_cols] at logits_ptr, row stride row_stride elements, column stride 1, dtype code
0 float32 / 1 bfloat16 / 2 float16; targets int64 [n_rows]; ratio, w_ce, w_se float32 [n_rows].
Writes loss float32 [n_rows]: w_ce*CE + alpha*w_se*SE (0 where target == ignore_index, NaN where the
target is outside [0, n_cols)). grad_ptr 0: no gradient; else grad [n_rows, n_cols] in the logits'
dtype with row stride grad_row_stride, times grad_scale[row] (float32 [n_rows]; 0 = scale 1); grad
may be logits itself (in place, same stride). Raises ValueError on a bad dtype code, shape or
stride.)doc");

  m.def(
      "d3diff_simd_level", [] { return std::string(unif2ace::d3diff_cpu_simd_level()); },
      "Instruction-set variant the D3Diff CPU kernel runs: baseline, avx_fma, avx2_fma or avx512 "
      "(UNIF2ACE_CPU_SIMD caps it).");
  m.def(
      "d3diff_set_simd_level",
      [](const std::string& name) {
        raise_if_error(unif2ace::d3diff_cpu_set_simd_level(name.c_str()), "d3diff_set_simd_level",
                       "'" + name + "' unknown or not supported by this CPU");
      },
      py::arg("name"), "Force a variant of the D3Diff CPU kernel (tests, timings).");

  // ---- MoE dispatch (csrc/cpu/moe.h; contract in python/unif2ace/ops/moe.py) ------------------
  // Every pointer is a uintptr_t from tensor.data_ptr() (0 = absent); sizes and strides are in
  // elements. Each launcher runs with the GIL released; a non-zero Status raises.
  m.def(
      "moe_route_fwd",
      [](std::uintptr_t logits, int64_t T, int64_t E, int64_t row_stride, int dtype,
         std::uintptr_t group_offsets, int64_t G, std::uintptr_t group_ids, std::uintptr_t bias,
         int64_t k, int scoring, bool renormalize, int64_t n_group, int64_t topk_group,
         float scaling, std::uintptr_t ids, std::uintptr_t weights, std::uintptr_t counts,
         std::uintptr_t prob_sums) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_route_fwd_cpu(
              ptr<const void>(logits), T, E, row_stride, dtype, ptr<const int64_t>(group_offsets),
              G, ptr<const int64_t>(group_ids), ptr<const float>(bias), k, scoring, renormalize,
              n_group, topk_group, scaling, ptr<int64_t>(ids), ptr<float>(weights),
              ptr<int32_t>(counts), ptr<float>(prob_sums));
        }
        raise_if_error(s, "moe_route_fwd",
                       "T=" + std::to_string(T) + ", E=" + std::to_string(E) + ", G=" +
                           std::to_string(G) + ", k=" + std::to_string(k) + ", n_group=" +
                           std::to_string(n_group) + ", topk_group=" + std::to_string(topk_group));
      },
      "Routing forward: ids int64 [T,k], weights/prob_sums float32, counts int32 (see moe.h).");
  m.def(
      "moe_route_bwd",
      [](std::uintptr_t logits, int64_t T, int64_t E, int64_t row_stride, int dtype,
         std::uintptr_t group_offsets, int64_t G, std::uintptr_t group_ids, std::uintptr_t ids,
         int64_t k, int scoring, bool renormalize, float scaling, std::uintptr_t grad_weights,
         std::uintptr_t grad_prob_sums, std::uintptr_t grad_logits) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_route_bwd_cpu(
              ptr<const void>(logits), T, E, row_stride, dtype, ptr<const int64_t>(group_offsets),
              G, ptr<const int64_t>(group_ids), ptr<const int64_t>(ids), k, scoring, renormalize,
              scaling, ptr<const float>(grad_weights), ptr<const float>(grad_prob_sums),
              ptr<float>(grad_logits));
        }
        raise_if_error(s, "moe_route_bwd",
                       "T=" + std::to_string(T) + ", E=" + std::to_string(E) + ", k=" +
                           std::to_string(k));
      },
      "Routing backward: grad_logits float32 [T,E] (see moe.h).");
  m.def(
      "moe_plan",
      [](std::uintptr_t ids, int id_type, int64_t n_slots, int64_t E, int64_t block_m,
         std::uintptr_t counts, std::uintptr_t offsets, std::uintptr_t sorted_slot,
         std::uintptr_t slot_pos, std::uintptr_t tile_expert, std::uintptr_t tile_row,
         int64_t max_tiles) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_plan_cpu(ptr<const void>(ids), id_type, n_slots, E, block_m,
                                     ptr<int32_t>(counts), ptr<int32_t>(offsets),
                                     ptr<int32_t>(sorted_slot), ptr<int32_t>(slot_pos),
                                     ptr<int32_t>(tile_expert), ptr<int32_t>(tile_row), max_tiles);
        }
        raise_if_error(s, "moe_plan",
                       "n_slots=" + std::to_string(n_slots) + ", E=" + std::to_string(E) +
                           ", block_m=" + std::to_string(block_m) +
                           " (an expert id outside [0, E)?)");
      },
      "Plan: stable counting sort of slot ids by expert, int32 outputs (see moe.h).");
  m.def(
      "moe_permute",
      [](std::uintptr_t x, int64_t T, int64_t D, int64_t row_stride, int64_t elem_size,
         std::uintptr_t sorted_slot, int64_t n_rows, int64_t k, std::uintptr_t xs) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_permute_cpu(ptr<const void>(x), T, D, row_stride, elem_size,
                                        ptr<const int32_t>(sorted_slot), n_rows, k, ptr<void>(xs));
        }
        raise_if_error(s, "moe_permute", "T=" + std::to_string(T) + ", D=" + std::to_string(D));
      },
      "Permute: xs[p] = x[sorted_slot[p] / k] (see moe.h).");
  m.def(
      "moe_combine",
      [](std::uintptr_t src, int64_t n_src, int64_t D, int64_t row_stride, int dtype,
         std::uintptr_t slot_pos, int64_t T, int64_t k, std::uintptr_t weights, std::uintptr_t out) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_combine_cpu(ptr<const void>(src), n_src, D, row_stride, dtype,
                                        ptr<const int32_t>(slot_pos), T, k,
                                        ptr<const float>(weights), ptr<void>(out));
        }
        raise_if_error(s, "moe_combine", "T=" + std::to_string(T) + ", D=" + std::to_string(D));
      },
      "Combine: out[t] = sum_j w[t,j] src[slot_pos[t*k+j]], fp32 accumulation (see moe.h).");
  m.def(
      "moe_combine_bwd",
      [](std::uintptr_t grad_out, int64_t go_row_stride, std::uintptr_t src, int64_t n_src,
         int64_t D, int64_t src_row_stride, int dtype, std::uintptr_t slot_pos, int64_t T,
         int64_t k, std::uintptr_t weights, std::uintptr_t grad_src, std::uintptr_t grad_weights) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_combine_bwd_cpu(
              ptr<const void>(grad_out), go_row_stride, ptr<const void>(src), n_src, D,
              src_row_stride, dtype, ptr<const int32_t>(slot_pos), T, k, ptr<const float>(weights),
              ptr<void>(grad_src), ptr<float>(grad_weights));
        }
        raise_if_error(s, "moe_combine_bwd",
                       "T=" + std::to_string(T) + ", D=" + std::to_string(D));
      },
      "Combine backward: grad_src and grad_weights (see moe.h).");
  m.def(
      "moe_silu_glu_fwd",
      [](std::uintptr_t h, int64_t n_rows, int64_t F, int64_t h_row_stride, int dtype,
         std::uintptr_t a) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_silu_glu_fwd_cpu(ptr<const void>(h), n_rows, F, h_row_stride, dtype,
                                             ptr<void>(a));
        }
        raise_if_error(s, "moe_silu_glu_fwd", "n_rows=" + std::to_string(n_rows) + ", F=" +
                                                  std::to_string(F));
      },
      "a = silu(h[:, :F]) * h[:, F:] (see moe.h).");
  m.def(
      "moe_silu_glu_bwd",
      [](std::uintptr_t h, std::uintptr_t da, int64_t n_rows, int64_t F, int64_t h_row_stride,
         int dtype, std::uintptr_t dh, std::uintptr_t a) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_silu_glu_bwd_cpu(ptr<const void>(h), ptr<const void>(da), n_rows, F,
                                             h_row_stride, dtype, ptr<void>(dh), ptr<void>(a));
        }
        raise_if_error(s, "moe_silu_glu_bwd", "n_rows=" + std::to_string(n_rows) + ", F=" +
                                                  std::to_string(F));
      },
      "dh (and a) from h and da for a = silu(gate) * up (see moe.h).");
  m.def(
      "moe_gelu_fwd",
      [](std::uintptr_t h, int64_t n_rows, int64_t F, int64_t h_row_stride, bool tanh_form,
         int dtype, std::uintptr_t a) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_gelu_fwd_cpu(ptr<const void>(h), n_rows, F, h_row_stride, tanh_form,
                                         dtype, ptr<void>(a));
        }
        raise_if_error(s, "moe_gelu_fwd", "n_rows=" + std::to_string(n_rows) + ", F=" +
                                              std::to_string(F));
      },
      "a = gelu(h), erf or tanh form (see moe.h).");
  m.def(
      "moe_gelu_bwd",
      [](std::uintptr_t h, std::uintptr_t da, int64_t n_rows, int64_t F, int64_t h_row_stride,
         bool tanh_form, int dtype, std::uintptr_t dh, std::uintptr_t a) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::moe_gelu_bwd_cpu(ptr<const void>(h), ptr<const void>(da), n_rows, F,
                                         h_row_stride, tanh_form, dtype, ptr<void>(dh),
                                         ptr<void>(a));
        }
        raise_if_error(s, "moe_gelu_bwd", "n_rows=" + std::to_string(n_rows) + ", F=" +
                                              std::to_string(F));
      },
      "dh = da * gelu'(h) (and a = gelu(h)), erf or tanh form (see moe.h).");
  // ---- end MoE dispatch ---------------------------------------------------------------------

  // ---- omni-attention (python/unif2ace/ops/attention.py has the contract) --------------------
  m.def("omni_attention_supported", &unif2ace::omni_attention_supported, py::arg("head_dim"),
        "Whether a kernel is compiled for this head size.");
  m.def(
      "omni_attention_fwd",
      [](const BLHDArg& q, const BLHDArg& k, const BLHDArg& v, int64_t B, int64_t L, int64_t H,
         int64_t Dh, std::uintptr_t limit, std::uintptr_t key_valid, std::uintptr_t rope_cos,
         std::uintptr_t rope_sin, int64_t rope_half, float scale, std::uintptr_t out,
         std::uintptr_t lse) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::omni_attention_fwd_cpu(
              blhd(q), blhd(k), blhd(v), B, L, H, Dh, ptr<const int32_t>(limit),
              ptr<const uint8_t>(key_valid), ptr<const float>(rope_cos),
              ptr<const float>(rope_sin), rope_half, scale, ptr<float>(out), ptr<float>(lse));
        }
        raise_if_error(s, "omni_attention_fwd", "B=" + std::to_string(B) + ", L=" +
                                                    std::to_string(L) + ", H=" + std::to_string(H) +
                                                    ", Dh=" + std::to_string(Dh));
      },
      "out [B, L, H, Dh] contiguous and lse [B, H, L] (see attention.h); operands are "
      "(ptr, stride_b, stride_l, stride_h) tuples, fp32, head dimension contiguous; rope_half = 0 "
      "or rope_cos / rope_sin [B, L, rope_half] turn q and k first.");
  m.def(
      "omni_attention_bwd",
      [](const BLHDArg& q, const BLHDArg& k, const BLHDArg& v, const BLHDArg& out,
         const BLHDArg& grad_out, int64_t B, int64_t L, int64_t H, int64_t Dh,
         std::uintptr_t limit, std::uintptr_t key_valid, std::uintptr_t rope_cos,
         std::uintptr_t rope_sin, int64_t rope_half, float scale, std::uintptr_t lse,
         std::uintptr_t dq, std::uintptr_t dk, std::uintptr_t dv) {
        int s;
        {
          py::gil_scoped_release nogil;
          s = unif2ace::omni_attention_bwd_cpu(
              blhd(q), blhd(k), blhd(v), blhd(out), blhd(grad_out), B, L, H, Dh,
              ptr<const int32_t>(limit), ptr<const uint8_t>(key_valid),
              ptr<const float>(rope_cos), ptr<const float>(rope_sin), rope_half, scale,
              ptr<const float>(lse), ptr<float>(dq), ptr<float>(dk), ptr<float>(dv));
        }
        raise_if_error(s, "omni_attention_bwd", "B=" + std::to_string(B) + ", L=" +
                                                    std::to_string(L) + ", H=" + std::to_string(H) +
                                                    ", Dh=" + std::to_string(Dh));
      },
      "dq, dk, dv [B, L, H, Dh] contiguous from the forward's out and lse (see attention.h).");

  // ---- mask sampling (python/unif2ace/ops/mask_sampling.py has the contract) ----------------
  m.def(
      "mask_tokens_fwd",
      [](std::uintptr_t ids, int64_t B, int64_t L, std::uintptr_t gamma, std::uintptr_t n_mask,
         int64_t mask_id, uint64_t seed, uint32_t offset, int mode, std::uintptr_t out_ids,
         std::uintptr_t out_mask) {
        int status;
        {
          py::gil_scoped_release nogil;
          status = unif2ace::mask_tokens_cpu(ptr<const int64_t>(ids), B, L, ptr<const float>(gamma),
                                             ptr<const int64_t>(n_mask), mask_id, seed, offset, mode,
                                             ptr<int64_t>(out_ids), ptr<uint8_t>(out_mask));
        }
        raise_if_error(status, "mask_tokens_fwd",
                       "B=" + std::to_string(B) + ", L=" + std::to_string(L) +
                           ", mode=" + std::to_string(mode) + ", offset=" + std::to_string(offset));
      },
      py::arg("ids_ptr"), py::arg("B"), py::arg("L"), py::arg("gamma_ptr"), py::arg("n_mask_ptr"),
      py::arg("mask_id"), py::arg("seed"), py::arg("offset"), py::arg("mode"),
      py::arg("out_ids_ptr"), py::arg("out_mask_ptr"),
      "Training-time masking (count / bernoulli) of int64 ids [B, L]; see mask_sampling.h.");
  m.def(
      "maskgit_step_fwd",
      [](std::uintptr_t logits, int64_t B, int64_t L, int64_t K, int64_t stride_b, int64_t stride_l,
         int dtype, std::uintptr_t uncond, int64_t ustride_b, int64_t ustride_l, std::uintptr_t ids,
         std::uintptr_t mask_len, int64_t mask_id, double guidance, float inv_temperature,
         float choice_temperature, uint64_t seed, uint32_t offset, std::uintptr_t gumbel,
         std::uintptr_t choice, std::uintptr_t out_ids, std::uintptr_t out_mask,
         std::uintptr_t confidence) {
        int status;
        {
          py::gil_scoped_release nogil;
          status = unif2ace::maskgit_step_cpu(
              ptr<const void>(logits), B, L, K, stride_b, stride_l, dtype, ptr<const void>(uncond),
              ustride_b, ustride_l, ptr<const int64_t>(ids), ptr<const int64_t>(mask_len), mask_id,
              guidance, inv_temperature, choice_temperature, seed, offset, ptr<const float>(gumbel),
              ptr<const float>(choice), ptr<int64_t>(out_ids), ptr<uint8_t>(out_mask),
              ptr<float>(confidence));
        }
        raise_if_error(status, "maskgit_step_fwd",
                       "B=" + std::to_string(B) + ", L=" + std::to_string(L) + ", K=" +
                           std::to_string(K) + ", strides=(" + std::to_string(stride_b) + ", " +
                           std::to_string(stride_l) + "), dtype=" + std::to_string(dtype));
      },
      py::arg("logits_ptr"), py::arg("B"), py::arg("L"), py::arg("K"), py::arg("stride_b"),
      py::arg("stride_l"), py::arg("dtype"), py::arg("uncond_ptr"), py::arg("ustride_b"),
      py::arg("ustride_l"), py::arg("ids_ptr"), py::arg("mask_len_ptr"), py::arg("mask_id"),
      py::arg("guidance"), py::arg("inv_temperature"), py::arg("choice_temperature"),
      py::arg("seed"), py::arg("offset"), py::arg("gumbel_ptr"), py::arg("choice_ptr"),
      py::arg("out_ids_ptr"), py::arg("out_mask_ptr"), py::arg("confidence_ptr"),
      "One fused MaskGIT / Show-o decode step (sample, confidence, re-mask); see mask_sampling.h.");
  m.def(
      "philox_gumbel",
      [](uint64_t seed, uint32_t offset, int64_t n, std::uintptr_t out) {
        int status;
        {
          py::gil_scoped_release nogil;
          status = unif2ace::philox_gumbel_cpu(seed, offset, n, ptr<float>(out));
        }
        raise_if_error(status, "philox_gumbel", "n=" + std::to_string(n));
      },
      py::arg("seed"), py::arg("offset"), py::arg("n"), py::arg("out_ptr"),
      "n float32 Gumbels of the step's sampling stream at (b=0, l=0, k=0..n-1) (tail tests).");
  m.def(
      "mask_sampling_simd_level", [] { return std::string(unif2ace::mask_sampling_cpu_simd_level()); },
      "Instruction-set variant the mask-sampling CPU kernel runs.");
  // ---- end mask sampling ----------------------------------------------------------------------
}

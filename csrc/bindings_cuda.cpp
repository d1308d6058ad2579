// pybind11 module unif2ace._C_cuda: the CUDA kernels. The same typed boundary as _C (tensor
// descriptors in, every operand checked by binding_args.h) plus a device workspace (a uint8
// descriptor, or None) and the stream (torch.cuda.current_stream().cuda_stream) where a launcher
// takes them; nothing torch. Every launch is asynchronous: no host synchronisation, no allocation
// (CUDA-graph safe). A launcher's error code becomes a Python exception here and nowhere else:
// ValueError for a bad dtype / shape / stride / null or misaligned pointer, RuntimeError with the
// CUDA error string when a launch fails.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "binding_args.h"
#include "binding_util.h"
#include "cuda/d3diff_loss.cuh"
#include "cuda/mask_sampling.cuh"
#include "cuda/moe.cuh"

namespace py = pybind11;
using unif2ace::TensorDesc;

namespace {

void* as_stream(std::uintptr_t s) { return reinterpret_cast<void*>(s); }

void raise_if_error(int status, const char* op) {
  unif2ace::raise_if_error(status, op, "", unif2ace::cuda_last_error());
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
  namespace u = unif2ace;
  using nogil = py::call_guard<py::gil_scoped_release>;
  m.doc() = "unif2ace CUDA kernels (tensor descriptors and a stream in; no torch at build time)";

  // ---- D3Diff loss ----------------------------------------------------------------------------
  m.def("d3diff_loss_workspace_bytes", &u::d3diff_loss_workspace_bytes_cuda, py::arg("n_rows"),
        py::arg("n_cols"),
        "Bytes of device workspace d3diff_loss_fwd can use for [n_rows, n_cols] logits on the "
        "current device (0: the row kernel alone runs, pass None). Host query, no sync.");
  m.def(
      "d3diff_loss_fwd",
      [](const TensorDesc& logits, const TensorDesc& targets, const TensorDesc& ratio,
         const TensorDesc& w_ce, const TensorDesc& w_se, float alpha, int64_t ignore_index,
         const TensorDesc& loss, const TensorDesc& grad, const TensorDesc& grad_scale,
         const TensorDesc& workspace, std::uintptr_t stream) {
        const auto a = u::d3diff_loss_args(logits, targets, ratio, w_ce, w_se, alpha,
                                           ignore_index, loss, grad, grad_scale);
        const auto ws = u::workspace_arg("d3diff_loss_fwd", workspace);
        raise_if_error(u::d3diff_loss_fwd_cuda(a, ws.ptr, ws.bytes, as_stream(stream)),
                       "d3diff_loss_fwd");
      },
      py::arg("logits"), py::arg("targets"), py::arg("ratio"), py::arg("w_ce"), py::arg("w_se"),
      py::arg("alpha"), py::arg("ignore_index"), py::arg("loss"), py::arg("grad"),
      py::arg("grad_scale"), py::arg("workspace"), py::arg("stream"), nogil(),
      "D3Diff loss per row, and its gradient when grad is not None (operands: "
      "csrc/include/unif2ace/args.h D3DiffLossArgs). Row-major logits with any row stride and "
      "element offset; grad may be logits itself (in place).");

  // ---- mask sampling --------------------------------------------------------------------------
  m.def(
      "mask_tokens_fwd",
      [](const TensorDesc& ids, const TensorDesc& gamma, const TensorDesc& n_mask,
         int64_t mask_id, uint64_t seed, uint32_t offset, int mode, const TensorDesc& out_ids,
         const TensorDesc& out_mask, std::uintptr_t stream) {
        const auto a = u::mask_tokens_args(ids, gamma, n_mask, mask_id, seed, offset, mode,
                                           out_ids, out_mask);
        raise_if_error(u::mask_tokens_fwd_cuda(a, as_stream(stream)), "mask_tokens_fwd");
      },
      py::arg("ids"), py::arg("gamma"), py::arg("n_mask"), py::arg("mask_id"), py::arg("seed"),
      py::arg("offset"), py::arg("mode"), py::arg("out_ids"), py::arg("out_mask"),
      py::arg("stream"), nogil(),
      "Training-time masking (mode 0 count / 1 bernoulli) of int64 ids [B, L] on the stream.");
  m.def("maskgit_step_workspace_bytes", &u::maskgit_step_workspace_bytes_cuda, py::arg("B"),
        py::arg("L"), py::arg("K"),
        "Bytes of device workspace maskgit_step_fwd can use for [B, L, K] logits on the current "
        "device (0 unless B*L is small and K long). Host query, no sync.");
  m.def(
      "maskgit_step_fwd",
      [](const TensorDesc& logits, const TensorDesc& uncond, const TensorDesc& ids,
         const TensorDesc& mask_len, int64_t mask_id, double guidance, float inv_temperature,
         float choice_temperature, uint64_t seed, uint32_t offset, const TensorDesc& gumbel,
         const TensorDesc& choice, const TensorDesc& out_ids, const TensorDesc& out_mask,
         const TensorDesc& confidence, const TensorDesc& workspace, std::uintptr_t stream) {
        const auto a = u::maskgit_step_args(logits, uncond, ids, mask_len, mask_id, guidance,
                                            inv_temperature, choice_temperature, seed, offset,
                                            gumbel, choice, out_ids, out_mask, confidence);
        const auto ws = u::workspace_arg("maskgit_step_fwd", workspace);
        raise_if_error(u::maskgit_step_fwd_cuda(a, ws.ptr, ws.bytes, as_stream(stream)),
                       "maskgit_step_fwd");
      },
      py::arg("logits"), py::arg("uncond"), py::arg("ids"), py::arg("mask_len"),
      py::arg("mask_id"), py::arg("guidance"), py::arg("inv_temperature"),
      py::arg("choice_temperature"), py::arg("seed"), py::arg("offset"), py::arg("gumbel"),
      py::arg("choice"), py::arg("out_ids"), py::arg("out_mask"), py::arg("confidence"),
      py::arg("workspace"), py::arg("stream"), nogil(),
      "One MaskGIT / Show-o decode step on the stream (sample, confidence, re-mask).");

  // ---- grouped MoE dispatch -------------------------------------------------------------------
  m.def("moe_route_workspace_bytes", &u::moe_route_workspace_bytes_cuda, py::arg("T"),
        py::arg("num_experts"), "Bytes of workspace moe_route_fwd needs (host arithmetic).");
  m.def(
      "moe_route_fwd",
      [](const TensorDesc& logits, const TensorDesc& group_offsets, const TensorDesc& group_ids,
         const TensorDesc& bias, int64_t top_k, int scoring, bool renormalize, int64_t n_group,
         int64_t topk_group, float scaling, const TensorDesc& ids, const TensorDesc& weights,
         const TensorDesc& counts, const TensorDesc& prob_sums, const TensorDesc& workspace,
         std::uintptr_t stream) {
        const auto a = u::moe_route_args(logits, group_offsets, group_ids, bias, top_k, scoring,
                                         renormalize, n_group, topk_group, scaling, ids, weights,
                                         counts, prob_sums);
        const auto ws = u::workspace_arg("moe_route_fwd", workspace);
        raise_if_error(u::moe_route_fwd_cuda(a, ws.ptr, ws.bytes, as_stream(stream)),
                       "moe_route_fwd");
      },
      py::arg("logits"), py::arg("group_offsets"), py::arg("group_ids"), py::arg("bias"),
      py::arg("top_k"), py::arg("scoring"), py::arg("renormalize"), py::arg("n_group"),
      py::arg("topk_group"), py::arg("scaling"), py::arg("ids"), py::arg("weights"),
      py::arg("counts"), py::arg("prob_sums"), py::arg("workspace"), py::arg("stream"), nogil(),
      "Top-k routing (contract §1): one warp per token, fp64 keys.");
  m.def("moe_plan_workspace_bytes", &u::moe_plan_workspace_bytes_cuda, py::arg("n"),
        py::arg("num_experts"), "Bytes of int32 workspace moe_plan needs (host arithmetic).");
  m.def(
      "moe_plan",
      [](const TensorDesc& ids, int64_t block_m, const TensorDesc& counts,
         const TensorDesc& offsets, const TensorDesc& sorted_slot, const TensorDesc& slot_pos,
         const TensorDesc& tile_expert, const TensorDesc& tile_row, const TensorDesc& workspace,
         std::uintptr_t stream) {
        const auto a = u::moe_plan_args(ids, block_m, counts, offsets, sorted_slot, slot_pos,
                                        tile_expert, tile_row);
        const auto ws = u::workspace_arg("moe_plan", workspace);
        raise_if_error(u::moe_plan_cuda(a, ws.ptr, ws.bytes, as_stream(stream)), "moe_plan");
      },
      py::arg("ids"), py::arg("block_m"), py::arg("counts"), py::arg("offsets"),
      py::arg("sorted_slot"), py::arg("slot_pos"), py::arg("tile_expert"), py::arg("tile_row"),
      py::arg("workspace"), py::arg("stream"), nogil(),
      "Stable counting sort of the slots by expert (contract §3).");
  m.def(
      "moe_permute",
      [](const TensorDesc& x, const TensorDesc& sorted_slot, int64_t top_k, const TensorDesc& xs,
         std::uintptr_t stream) {
        const auto a = u::moe_permute_args(x, sorted_slot, top_k, xs);
        raise_if_error(u::moe_permute_cuda(a, as_stream(stream)), "moe_permute");
      },
      py::arg("x"), py::arg("sorted_slot"), py::arg("top_k"), py::arg("xs"), py::arg("stream"),
      nogil(), "xs[p] = x[sorted_slot[p] / top_k] (contract §4).");
  m.def(
      "moe_combine",
      [](const TensorDesc& src, const TensorDesc& slot_pos, const TensorDesc& weights,
         const TensorDesc& out, std::uintptr_t stream) {
        const auto a = u::moe_combine_args(src, slot_pos, weights, out);
        raise_if_error(u::moe_combine_cuda(a, as_stream(stream)), "moe_combine");
      },
      py::arg("src"), py::arg("slot_pos"), py::arg("weights"), py::arg("out"), py::arg("stream"),
      nogil(), "out[t] = sum_j w[t, j] src[slot_pos[t*k + j]] in fp32 (contract §5).");
  m.def(
      "moe_combine_bwd",
      [](const TensorDesc& grad_out, const TensorDesc& src, const TensorDesc& slot_pos,
         const TensorDesc& weights, const TensorDesc& grad_src, const TensorDesc& grad_weights,
         std::uintptr_t stream) {
        const auto a =
            u::moe_combine_bwd_args(grad_out, src, slot_pos, weights, grad_src, grad_weights);
        raise_if_error(u::moe_combine_bwd_cuda(a, as_stream(stream)), "moe_combine_bwd");
      },
      py::arg("grad_out"), py::arg("src"), py::arg("slot_pos"), py::arg("weights"),
      py::arg("grad_src"), py::arg("grad_weights"), py::arg("stream"), nogil(),
      "Backward of moe_combine (contract §6).");
}

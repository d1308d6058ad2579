// pybind11 module unif2ace._C_cuda: raw device pointers (tensor.data_ptr()), sizes, strides,
// scalars and the stream (torch.cuda.current_stream().cuda_stream) in; nothing torch. A launcher's
// error code becomes a Python exception here and nowhere else.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "cuda/d3diff_loss.cuh"
#include "cuda/mask_sampling.cuh"  // mask sampling (issue 3)
#include "cuda/moe.cuh"            // grouped MoE dispatch (issue 4)
#include "unif2ace/common.h"

namespace py = pybind11;

namespace {

void* as_ptr(std::uintptr_t p) { return reinterpret_cast<void*>(p); }

void raise_on_error(int status, const char* op) {
  if (status == unif2ace::kOk) return;
  std::string msg = std::string(op) + ": " + unif2ace::status_message(status);
  if (status == unif2ace::kCudaError) {
    msg += ": ";
    msg += unif2ace::d3diff_loss_last_cuda_error();
    throw std::runtime_error(msg);  // RuntimeError
  }
  throw std::invalid_argument(msg);  // ValueError
}

}  // namespace

// ==== mask sampling (issue 3): helper of the block at the end of the module =====================
namespace {
void raise_mask_sampling(int status, const char* op) {
  if (status == unif2ace::kOk) return;
  std::string msg = std::string(op) + ": " + unif2ace::status_message(status);
  if (status == unif2ace::kCudaError) {
    msg += ": ";
    msg += unif2ace::mask_sampling_last_cuda_error();
    throw std::runtime_error(msg);  // RuntimeError
  }
  throw std::invalid_argument(msg);  // ValueError
}
}  // namespace
// ==== end mask sampling helper ===================================================================

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "unif2ace CUDA kernels (raw device pointers and a stream in; no torch at build time)";

  m.def(
      "d3diff_loss_workspace_bytes",
      [](std::int64_t n_rows, std::int64_t n_cols) {
        return unif2ace::d3diff_loss_workspace_bytes_cuda(n_rows, n_cols);
      },
      py::arg("n_rows"), py::arg("n_cols"),
      R"doc(Bytes of device workspace ``d3diff_loss_fwd`` can use for an [n_rows, n_cols] input.

Depends on the *current* CUDA device (its SM count): call it with the logits' device current.
0 means the row kernel alone runs (many rows or short rows) and no workspace is needed; pass
``workspace_ptr=0, workspace_bytes=0`` (``torch.empty(0)`` is fine too). A positive size is for
the split-K path (n_rows < 2 x SMs and n_cols >= 16384): allocate it with torch on the logits'
device, e.g. ``torch.empty(nbytes, dtype=torch.uint8, device=logits.device)``. Its contents need
no initialisation. No host synchronisation; safe during CUDA-graph capture.)doc");

  m.def(
      "d3diff_loss_fwd",
      [](std::uintptr_t logits_ptr, std::int64_t n_rows, std::int64_t n_cols,
         std::int64_t row_stride, int dtype, std::uintptr_t targets_ptr, std::uintptr_t ratio_ptr,
         std::uintptr_t w_ce_ptr, std::uintptr_t w_se_ptr, double alpha, std::int64_t ignore_index,
         std::uintptr_t loss_ptr, std::uintptr_t grad_ptr, std::int64_t grad_row_stride,
         std::uintptr_t grad_scale_ptr, std::uintptr_t workspace_ptr, std::int64_t workspace_bytes,
         std::uintptr_t stream) {
        const int status = unif2ace::d3diff_loss_fwd_cuda(
            as_ptr(logits_ptr), n_rows, n_cols, row_stride, dtype,
            static_cast<const std::int64_t*>(as_ptr(targets_ptr)),
            static_cast<const float*>(as_ptr(ratio_ptr)),
            static_cast<const float*>(as_ptr(w_ce_ptr)),
            static_cast<const float*>(as_ptr(w_se_ptr)), static_cast<float>(alpha), ignore_index,
            static_cast<float*>(as_ptr(loss_ptr)), as_ptr(grad_ptr), grad_row_stride,
            static_cast<const float*>(as_ptr(grad_scale_ptr)), as_ptr(workspace_ptr),
            workspace_bytes, as_ptr(stream));
        raise_on_error(status, "d3diff_loss_fwd");
      },
      py::arg("logits_ptr"), py::arg("n_rows"), py::arg("n_cols"), py::arg("row_stride"),
      py::arg("dtype"), py::arg("targets_ptr"), py::arg("ratio_ptr"), py::arg("w_ce_ptr"),
      py::arg("w_se_ptr"), py::arg("alpha"), py::arg("ignore_index"), py::arg("loss_ptr"),
      py::arg("grad_ptr"), py::arg("grad_row_stride"), py::arg("grad_scale_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      R"doc(D3Diff loss per row, and its gradient when ``grad_ptr`` is not 0, on ``stream``.

Asynchronous (no host synchronisation, no allocation: CUDA-graph safe). Every pointer is a CUDA
device pointer on the current device, and ``stream`` (``torch.cuda.current_stream().cuda_stream``)
belongs to that device.

Parameters
----------
logits_ptr : [n_rows, n_cols] logits of ``dtype`` (0 = float32, 1 = bfloat16, 2 = float16);
    element row stride ``row_stride`` (>= n_cols when n_rows > 1), column stride 1. Any element
    offset works (a column range of a wider vocabulary); rows are read with 16-byte vector loads
    after a scalar head that reaches 16-byte alignment.
targets_ptr : int64 [n_rows]. ``ignore_index``: loss 0 and gradient 0, logits not read. A target
    outside [0, n_cols) that is not ``ignore_index``: loss NaN and a NaN gradient row (never an
    out-of-bounds read).
ratio_ptr, w_ce_ptr, w_se_ptr : float32 [n_rows]: a, w_ce, w_se. ``alpha``: the SE weight.
loss_ptr : float32 [n_rows], written:
    ``w_ce*CE + alpha*w_se*a*(CE + e^u - 1 - u)``, CE = LSE - z[x0], u = LSE - log K.
grad_ptr : 0 (loss only) or [n_rows, n_cols] of ``dtype``, element row stride ``grad_row_stride``:
    ``grad_scale[r] * (w_ce*p + alpha*w_se*a*e^(z - log K) - (w_ce + alpha*w_se*a)*[y = x0])``.
    May be ``logits_ptr`` itself with the same stride (in-place gradient); otherwise it must not
    overlap the logits.
grad_scale_ptr : 0 (scale 1) or float32 [n_rows], multiplies each row's gradient.
workspace_ptr, workspace_bytes : device workspace of ``d3diff_loss_workspace_bytes(n_rows, n_cols)``
    bytes (8-byte aligned; torch allocations are), or 0, 0. Less than asked only means fewer or no
    column splits (slower for few long rows), never an error.

Raises ValueError for a bad dtype code, shape, stride, null or misaligned pointer, and
RuntimeError (with the CUDA error string) when a launch fails.)doc");

  // ==== mask sampling (issue 3): launcher contract in python/unif2ace/ops/mask_sampling.py ======
  m.def(
      "mask_tokens_fwd",
      [](std::uintptr_t ids_ptr, std::int64_t B, std::int64_t L, std::uintptr_t gamma_ptr,
         std::uintptr_t n_mask_ptr, std::int64_t mask_id, std::uint64_t seed, std::uint32_t offset,
         int mode, std::uintptr_t out_ids_ptr, std::uintptr_t out_mask_ptr, std::uintptr_t stream) {
        const int status = unif2ace::mask_tokens_fwd_cuda(
            static_cast<const std::int64_t*>(as_ptr(ids_ptr)), B, L,
            static_cast<const float*>(as_ptr(gamma_ptr)),
            static_cast<const std::int64_t*>(as_ptr(n_mask_ptr)), mask_id, seed, offset, mode,
            static_cast<std::int64_t*>(as_ptr(out_ids_ptr)),
            static_cast<bool*>(as_ptr(out_mask_ptr)), as_ptr(stream));
        raise_mask_sampling(status, "mask_tokens_fwd");
      },
      py::arg("ids_ptr"), py::arg("B"), py::arg("L"), py::arg("gamma_ptr"), py::arg("n_mask_ptr"),
      py::arg("mask_id"), py::arg("seed"), py::arg("offset"), py::arg("mode"),
      py::arg("out_ids_ptr"), py::arg("out_mask_ptr"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      R"doc(Training-time masking on ``stream`` (contract: unif2ace.ops.mask_sampling).

ids int64 [B, L], out_ids int64 [B, L], out_mask bool [B, L], contiguous device memory.
mode 0 ("count"): the clamp(n_mask[b], 0, L) positions with the smallest (Philox key, l), n_mask
int64 [B]. mode 1 ("bernoulli"): float32(w0 >> 8) < gamma[b] * 2^24, gamma float32 [B].
Asynchronous, no allocation. ValueError for a bad shape/mode/null pointer, RuntimeError when a
launch fails.)doc");

  m.def(
      "maskgit_step_workspace_bytes",
      [](std::int64_t B, std::int64_t L, std::int64_t K) {
        return unif2ace::maskgit_step_workspace_bytes_cuda(B, L, K);
      },
      py::arg("B"), py::arg("L"), py::arg("K"),
      R"doc(Bytes of device workspace ``maskgit_step_fwd`` can use for [B, L, K] logits on the
current device (0 unless B*L is small and K long: the split-over-K path). Host query, no
sync.)doc");

  m.def(
      "maskgit_step_fwd",
      [](std::uintptr_t logits_ptr, std::int64_t B, std::int64_t L, std::int64_t K,
         std::int64_t stride_b, std::int64_t stride_l, int dtype, std::uintptr_t uncond_ptr,
         std::int64_t ustride_b, std::int64_t ustride_l, std::uintptr_t ids_ptr,
         std::uintptr_t mask_len_ptr, std::int64_t mask_id, double guidance,
         double inv_temperature, double choice_temperature, std::uint64_t seed,
         std::uint32_t offset, std::uintptr_t gumbel_ptr, std::uintptr_t choice_ptr,
         std::uintptr_t out_ids_ptr, std::uintptr_t out_mask_ptr, std::uintptr_t confidence_ptr,
         std::uintptr_t workspace_ptr, std::int64_t workspace_bytes, std::uintptr_t stream) {
        const int status = unif2ace::maskgit_step_fwd_cuda(
            as_ptr(logits_ptr), B, L, K, stride_b, stride_l, dtype, as_ptr(uncond_ptr), ustride_b,
            ustride_l, static_cast<const std::int64_t*>(as_ptr(ids_ptr)),
            static_cast<const std::int64_t*>(as_ptr(mask_len_ptr)), mask_id, guidance,
            static_cast<float>(inv_temperature), static_cast<float>(choice_temperature), seed,
            offset, static_cast<const float*>(as_ptr(gumbel_ptr)),
            static_cast<const float*>(as_ptr(choice_ptr)),
            static_cast<std::int64_t*>(as_ptr(out_ids_ptr)),
            static_cast<bool*>(as_ptr(out_mask_ptr)), static_cast<float*>(as_ptr(confidence_ptr)),
            as_ptr(workspace_ptr), workspace_bytes, as_ptr(stream));
        raise_mask_sampling(status, "maskgit_step_fwd");
      },
      py::arg("logits_ptr"), py::arg("B"), py::arg("L"), py::arg("K"), py::arg("stride_b"),
      py::arg("stride_l"), py::arg("dtype"), py::arg("uncond_ptr"), py::arg("ustride_b"),
      py::arg("ustride_l"), py::arg("ids_ptr"), py::arg("mask_len_ptr"), py::arg("mask_id"),
      py::arg("guidance"), py::arg("inv_temperature"), py::arg("choice_temperature"),
      py::arg("seed"), py::arg("offset"), py::arg("gumbel_ptr"), py::arg("choice_ptr"),
      py::arg("out_ids_ptr"), py::arg("out_mask_ptr"), py::arg("confidence_ptr"),
      py::arg("workspace_ptr"), py::arg("workspace_bytes"), py::arg("stream"),
      py::call_guard<py::gil_scoped_release>(),
      R"doc(One MaskGIT / Show-o decode step on ``stream`` (contract: unif2ace.ops.mask_sampling).

logits (and uncond, or 0) [B, L, K] of ``dtype`` (0 fp32, 1 bf16, 2 fp16), element strides
(stride_b, stride_l, 1), read only; ids int64 [B, L]; mask_len int64 [B]; gumbel_ptr 0 (Philox) or
float32 [B, L, K]; choice_ptr 0 (Philox) or float32 [B, L]; writes out_ids int64, out_mask bool and
confidence float32 [B, L]. guidance g: z = fp32(1+g)*cond - fp32(g)*uncond without FMA;
inv_temperature is fp32(1/T); choice_temperature tau (tau*G skipped at 0). workspace: from
``maskgit_step_workspace_bytes`` (16-byte aligned) or 0, 0 (fewer bytes only mean fewer column
splits). Asynchronous, no allocation, no host sync. ValueError for a bad dtype/shape/stride/null
pointer, RuntimeError when a launch fails.)doc");
  // ==== end mask sampling ========================================================================
  // ==== grouped MoE dispatch (issue 4): launcher contract in python/unif2ace/ops/moe.py =======
  {
    auto raise_moe = [](int status, const char* op) {
      if (status == unif2ace::kOk) return;
      std::string msg = std::string(op) + ": " + unif2ace::status_message(status);
      if (status == unif2ace::kCudaError) {
        msg += ": ";
        msg += unif2ace::moe_last_cuda_error();
        throw std::runtime_error(msg);
      }
      throw std::invalid_argument(msg);
    };
    m.def("moe_route_workspace_bytes", &unif2ace::moe_route_workspace_bytes_cuda, py::arg("T"),
          py::arg("num_experts"), "Bytes of workspace moe_route_fwd needs (host arithmetic).");
    m.def(
        "moe_route_fwd",
        [raise_moe](std::uintptr_t logits, std::int64_t T, std::int64_t E,
                    std::int64_t logits_row_stride, int dtype, std::uintptr_t group_offsets,
                    std::int64_t G, std::uintptr_t group_ids, std::uintptr_t bias,
                    std::int64_t top_k, int scoring, bool renormalize, std::int64_t n_group,
                    std::int64_t topk_group, float scaling, std::uintptr_t ids,
                    std::uintptr_t weights, std::uintptr_t counts, std::uintptr_t prob_sums,
                    std::uintptr_t workspace, std::int64_t workspace_bytes, std::uintptr_t stream) {
          raise_moe(unif2ace::moe_route_fwd_cuda(
                        as_ptr(logits), T, E, logits_row_stride, dtype,
                        static_cast<const std::int64_t*>(as_ptr(group_offsets)), G,
                        static_cast<const std::int64_t*>(as_ptr(group_ids)),
                        static_cast<const float*>(as_ptr(bias)), top_k, scoring,
                        renormalize ? 1 : 0, n_group, topk_group, scaling,
                        static_cast<std::int64_t*>(as_ptr(ids)),
                        static_cast<float*>(as_ptr(weights)),
                        static_cast<std::int32_t*>(as_ptr(counts)),
                        static_cast<float*>(as_ptr(prob_sums)), as_ptr(workspace),
                        workspace_bytes, as_ptr(stream)),
                    "moe_route_fwd");
        },
        py::call_guard<py::gil_scoped_release>(),
        "Top-k routing (contract §1): one warp per token, fp64 keys, asynchronous.");
    m.def("moe_plan_workspace_bytes", &unif2ace::moe_plan_workspace_bytes_cuda, py::arg("n"),
          py::arg("num_experts"), "Bytes of int32 workspace moe_plan needs (host arithmetic).");
    m.def(
        "moe_plan",
        [raise_moe](std::uintptr_t ids, int ids_is_int64, std::int64_t n, std::int64_t E,
                    std::int64_t block_m, std::uintptr_t counts, std::uintptr_t offsets,
                    std::uintptr_t sorted_slot, std::uintptr_t slot_pos, std::uintptr_t tile_expert,
                    std::uintptr_t tile_row, std::int64_t max_tiles, std::uintptr_t workspace,
                    std::int64_t workspace_bytes, std::uintptr_t stream) {
          auto i32 = [](std::uintptr_t p) { return static_cast<std::int32_t*>(as_ptr(p)); };
          raise_moe(unif2ace::moe_plan_cuda(as_ptr(ids), ids_is_int64, n, E, block_m, i32(counts),
                                            i32(offsets), i32(sorted_slot), i32(slot_pos),
                                            i32(tile_expert), i32(tile_row), max_tiles,
                                            as_ptr(workspace), workspace_bytes, as_ptr(stream)),
                    "moe_plan");
        },
        py::call_guard<py::gil_scoped_release>(),
        "Stable counting sort of the slots by expert (contract §3), asynchronous.");
    m.def(
        "moe_permute",
        [raise_moe](std::uintptr_t x, std::int64_t T, std::int64_t D, std::int64_t x_row_stride,
                    int elem_bytes, std::uintptr_t sorted_slot, std::int64_t n, std::int64_t top_k,
                    std::uintptr_t xs, std::uintptr_t stream) {
          raise_moe(unif2ace::moe_permute_cuda(
                        as_ptr(x), T, D, x_row_stride, elem_bytes,
                        static_cast<const std::int32_t*>(as_ptr(sorted_slot)), n, top_k,
                        as_ptr(xs), as_ptr(stream)),
                    "moe_permute");
        },
        py::call_guard<py::gil_scoped_release>(), "xs[p] = x[sorted_slot[p] / k] (contract §4).");
    m.def(
        "moe_combine",
        [raise_moe](std::uintptr_t src, std::int64_t n, std::int64_t D, std::int64_t src_row_stride,
                    int dtype, std::uintptr_t slot_pos, std::int64_t T, std::int64_t top_k,
                    std::uintptr_t weights, std::uintptr_t out, std::uintptr_t stream) {
          raise_moe(unif2ace::moe_combine_cuda(
                        as_ptr(src), n, D, src_row_stride, dtype,
                        static_cast<const std::int32_t*>(as_ptr(slot_pos)), T, top_k,
                        static_cast<const float*>(as_ptr(weights)), as_ptr(out), as_ptr(stream)),
                    "moe_combine");
        },
        py::call_guard<py::gil_scoped_release>(),
        "out[t] = sum_j w[t,j] src[slot_pos[t*k+j]] in fp32 (contract §5).");
    m.def(
        "moe_combine_bwd",
        [raise_moe](std::uintptr_t grad_out, std::int64_t grad_out_row_stride, std::uintptr_t src,
                    std::int64_t n, std::int64_t D, std::int64_t src_row_stride, int dtype,
                    std::uintptr_t slot_pos, std::int64_t T, std::int64_t top_k,
                    std::uintptr_t weights, std::uintptr_t grad_src, std::uintptr_t grad_weights,
                    std::uintptr_t stream) {
          raise_moe(unif2ace::moe_combine_bwd_cuda(
                        as_ptr(grad_out), grad_out_row_stride, as_ptr(src), n, D, src_row_stride,
                        dtype, static_cast<const std::int32_t*>(as_ptr(slot_pos)), T, top_k,
                        static_cast<const float*>(as_ptr(weights)), as_ptr(grad_src),
                        static_cast<float*>(as_ptr(grad_weights)), as_ptr(stream)),
                    "moe_combine_bwd");
        },
        py::call_guard<py::gil_scoped_release>(), "Backward of moe_combine (contract §6).");
  }
  // ==== end grouped MoE dispatch =================================================================
}

"""The "cuda" and "triton" launchers of the grouped MoE dispatch (issue 4), registered into the
dispatch dicts of :mod:`unif2ace.ops.moe` by :func:`register` (contract: the comment block at the
top of that file).

cuda: routing forward (one warp per token, E <= 256, k <= 32; larger falls back to the torch
spec), plan (histogram + scan + scatter), permute, combine and combine backward are CUDA kernels
(csrc/cuda/moe.cu); the expert GEMMs are the composed path (F.grouped_mm, no host sync); the
routing backward is torch (moe._route_bwd_torch: the closed form over all E columns, no host sync).
triton: routing forward (E <= 256, k <= 8, n_group <= 32; else the torch spec), permute, combine,
combine backward and the ScatterMoE-style grouped GEMMs (x gathered while loading the A tile,
activation fused into the up projection's epilogue, no xs saved) are Triton kernels
(triton_kernels/moe.py); the routing backward (moe._route_bwd_torch) and the plan are torch, the
backward's GEMMs are torch GEMMs over the Triton permute / combine.
"""

from __future__ import annotations

import torch

from unif2ace import _backend


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


_ROUTE_FALLBACK = None  # moe._route_torch, set by register() (this module is imported by moe.py)


# ---- cuda -------------------------------------------------------------------------------------


_ROUTE_CUDA_MAX_E = 256  # csrc/cuda/moe.cu kRouteMaxE: up to 8 candidates per lane of a warp


def route_cuda(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
               topk_group, scaling, ids, weights, counts, prob_sums):  # fmt: skip
    T, E = logits.shape
    if E > _ROUTE_CUDA_MAX_E or top_k > 32:
        _ROUTE_FALLBACK(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize,
                        n_group, topk_group, scaling, ids, weights, counts, prob_sums)  # fmt: skip
        return
    ext = _backend.cuda_ext()
    with torch.cuda.device(logits.device):
        ws_bytes = ext.moe_route_workspace_bytes(T, E)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
        ext.moe_route_fwd(
            logits.data_ptr(), T, E, logits.stride(0), _backend.DTYPE_CODES[logits.dtype],
            group_offsets.data_ptr(), group_offsets.numel() - 1, _ptr(group_ids), _ptr(bias),
            top_k, 0 if scoring == "softmax" else 1, bool(renormalize), n_group, topk_group,
            float(scaling), ids.data_ptr(), weights.data_ptr(), counts.data_ptr(),
            prob_sums.data_ptr(), ws.data_ptr(), ws_bytes, _stream(logits),
        )  # fmt: skip


def plan_cuda(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert,
              tile_row):  # fmt: skip
    ext = _backend.cuda_ext()
    n = ids.numel()
    with torch.cuda.device(ids.device):
        ws_bytes = ext.moe_plan_workspace_bytes(n, num_experts)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=ids.device)
        nt = tile_expert.numel()
        ext.moe_plan(
            ids.data_ptr(), int(ids.dtype == torch.int64), n, num_experts, block_m,
            counts.data_ptr(), offsets.data_ptr(), sorted_slot.data_ptr(), slot_pos.data_ptr(),
            tile_expert.data_ptr() if nt else 0, tile_row.data_ptr() if nt else 0, nt,
            ws.data_ptr(), ws_bytes, _stream(ids),
        )  # fmt: skip


def permute_cuda(x, sorted_slot, top_k, xs):
    T, D = x.shape
    with torch.cuda.device(x.device):
        _backend.cuda_ext().moe_permute(
            x.data_ptr(), T, D, x.stride(0), x.element_size(), sorted_slot.data_ptr(),
            sorted_slot.numel(), top_k, xs.data_ptr(), _stream(x),
        )  # fmt: skip


def combine_cuda(src, slot_pos, weights, out):
    T, D = out.shape
    N = slot_pos.numel()
    with torch.cuda.device(src.device):
        _backend.cuda_ext().moe_combine(
            src.data_ptr(), N, D, src.stride(0), _backend.DTYPE_CODES[src.dtype],
            slot_pos.data_ptr(), T, N // T if T else 1, _ptr(weights), out.data_ptr(),
            _stream(src),
        )  # fmt: skip


def combine_bwd_cuda(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    T, D = grad_out.shape
    N = slot_pos.numel()
    if grad_out.dtype != src.dtype:
        grad_out = grad_out.to(src.dtype)
    if D > 1 and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    with torch.cuda.device(src.device):
        _backend.cuda_ext().moe_combine_bwd(
            grad_out.data_ptr(), grad_out.stride(0), src.data_ptr(), N, D, src.stride(0),
            _backend.DTYPE_CODES[src.dtype], slot_pos.data_ptr(), T, N // T if T else 1,
            _ptr(weights), grad_src.data_ptr(), _ptr(grad_weights), _stream(src),
        )  # fmt: skip


# ---- triton -----------------------------------------------------------------------------------


def route_triton(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
                 topk_group, scaling, ids, weights, counts, prob_sums):  # fmt: skip
    from unif2ace.triton_kernels import moe as tk

    if not tk.route_supported(logits.shape[1], top_k, n_group):  # E > 256, k > 8, n_group > 32
        _ROUTE_FALLBACK(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize,
                        n_group, topk_group, scaling, ids, weights, counts, prob_sums)  # fmt: skip
        return
    tk.route(logits, group_offsets, group_ids, bias, top_k, scoring, renormalize, n_group,
             topk_group, scaling, ids, weights, counts, prob_sums)  # fmt: skip


def permute_triton(x, sorted_slot, top_k, xs):
    from unif2ace.triton_kernels import moe as tk

    tk.permute(x, sorted_slot, top_k, xs)


def combine_triton(src, slot_pos, weights, out):
    from unif2ace.triton_kernels import moe as tk

    tk.combine(src, slot_pos, weights, out)


def combine_bwd_triton(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    from unif2ace.triton_kernels import moe as tk

    tk.combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights)


def experts_fwd_triton(x, w_up, w_down, weights, plan, activation, y, h, out, xs):
    from unif2ace.triton_kernels import moe as tk

    tk.experts_fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs)


def register(ns: dict) -> None:
    """Add the "cuda" and "triton" entries to moe.py's dicts (``ns``: that module's globals)."""
    ns["_ROUTE"]["cuda"] = route_cuda
    ns["_ROUTE_BWD"]["cuda"] = ns["_route_bwd_torch"]
    ns["_PLAN"]["cuda"] = plan_cuda
    ns["_PERMUTE"]["cuda"] = permute_cuda
    ns["_COMBINE"]["cuda"] = combine_cuda
    ns["_COMBINE_BWD"]["cuda"] = combine_bwd_cuda
    ns["_EXPERTS_FWD"]["cuda"] = ns["_experts_fwd_composed"](permute_cuda, combine_cuda)
    ns["_EXPERTS_BWD"]["cuda"] = ns["_experts_bwd_composed"](
        permute_cuda, combine_cuda, combine_bwd_cuda
    )
    global _ROUTE_FALLBACK
    _ROUTE_FALLBACK = ns["_route_torch"]
    ns["_ROUTE"]["triton"] = route_triton
    ns["_ROUTE_BWD"]["triton"] = ns["_route_bwd_torch"]
    ns["_PLAN"]["triton"] = ns["_plan_torch"]
    ns["_PERMUTE"]["triton"] = permute_triton
    ns["_COMBINE"]["triton"] = combine_triton
    ns["_COMBINE_BWD"]["triton"] = combine_bwd_triton
    ns["_EXPERTS_FWD"]["triton"] = experts_fwd_triton
    ns["_EXPERTS_BWD"]["triton"] = ns["_experts_bwd_composed"](
        permute_triton, combine_triton, combine_bwd_triton
    )
    ns["_GATHERS_IN_KERNEL"].add("triton")

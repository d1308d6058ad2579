"""The "cuda" launchers of the grouped MoE family: the CUDA kernels of ``unif2ace._C_cuda``
(csrc/cuda/moe.cu). Contract: the module docstring of _torch.py.

Routing forward (one warp per token, E <= 256, k <= 32; larger falls back to the torch launcher),
plan (histogram + scan + scatter), permute, combine and combine backward are CUDA kernels; the
expert GEMMs are the composed path (_composed.py: F.grouped_mm, no host sync) over these
permute / combine kernels; the routing backward is the torch launcher (the closed form over all E
columns, no host sync).
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops.moe import _composed, _torch

_ROUTE_MAX_E = 256  # csrc/cuda/moe.cu kRouteMaxE: up to 8 candidates per lane of a warp


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _ptr(t) -> int:
    return 0 if t is None else t.data_ptr()


@_backend.register("moe.route", "cuda")
def route(
    logits,
    group_offsets,
    group_ids,
    bias,
    top_k,
    scoring,
    renormalize,
    n_group,
    topk_group,
    scaling,
    ids,
    weights,
    counts,
    prob_sums,
):
    T, E = logits.shape
    if E > _ROUTE_MAX_E or top_k > 32:
        _torch.route(
            logits,
            group_offsets,
            group_ids,
            bias,
            top_k,
            scoring,
            renormalize,
            n_group,
            topk_group,
            scaling,
            ids,
            weights,
            counts,
            prob_sums,
        )
        return
    ext = _backend.cuda_ext()
    with torch.cuda.device(logits.device):
        ws_bytes = ext.moe_route_workspace_bytes(T, E)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=logits.device)
        ext.moe_route_fwd(
            logits.data_ptr(),
            T,
            E,
            logits.stride(0),
            _backend.DTYPE_CODES[logits.dtype],
            group_offsets.data_ptr(),
            group_offsets.numel() - 1,
            _ptr(group_ids),
            _ptr(bias),
            top_k,
            0 if scoring == "softmax" else 1,
            bool(renormalize),
            n_group,
            topk_group,
            float(scaling),
            ids.data_ptr(),
            weights.data_ptr(),
            counts.data_ptr(),
            prob_sums.data_ptr(),
            ws.data_ptr(),
            ws_bytes,
            _stream(logits),
        )


route_bwd = _backend.register("moe.route_bwd", "cuda")(_torch.route_bwd)


@_backend.register("moe.plan", "cuda")
def plan(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row):
    ext = _backend.cuda_ext()
    n = ids.numel()
    with torch.cuda.device(ids.device):
        ws_bytes = ext.moe_plan_workspace_bytes(n, num_experts)
        ws = torch.empty(ws_bytes, dtype=torch.uint8, device=ids.device)
        nt = tile_expert.numel()
        ext.moe_plan(
            ids.data_ptr(),
            int(ids.dtype == torch.int64),
            n,
            num_experts,
            block_m,
            counts.data_ptr(),
            offsets.data_ptr(),
            sorted_slot.data_ptr(),
            slot_pos.data_ptr(),
            tile_expert.data_ptr() if nt else 0,
            tile_row.data_ptr() if nt else 0,
            nt,
            ws.data_ptr(),
            ws_bytes,
            _stream(ids),
        )


@_backend.register("moe.permute", "cuda")
def permute(x, sorted_slot, top_k, xs):
    T, D = x.shape
    with torch.cuda.device(x.device):
        _backend.cuda_ext().moe_permute(
            x.data_ptr(),
            T,
            D,
            x.stride(0),
            x.element_size(),
            sorted_slot.data_ptr(),
            sorted_slot.numel(),
            top_k,
            xs.data_ptr(),
            _stream(x),
        )


@_backend.register("moe.combine", "cuda")
def combine(src, slot_pos, weights, out):
    T, D = out.shape
    N = slot_pos.numel()
    with torch.cuda.device(src.device):
        _backend.cuda_ext().moe_combine(
            src.data_ptr(),
            N,
            D,
            src.stride(0),
            _backend.DTYPE_CODES[src.dtype],
            slot_pos.data_ptr(),
            T,
            N // T if T else 1,
            _ptr(weights),
            out.data_ptr(),
            _stream(src),
        )


@_backend.register("moe.combine_bwd", "cuda")
def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    T, D = grad_out.shape
    N = slot_pos.numel()
    if grad_out.dtype != src.dtype:
        grad_out = grad_out.to(src.dtype)
    if D > 1 and grad_out.stride(1) != 1:
        grad_out = grad_out.contiguous()
    with torch.cuda.device(src.device):
        _backend.cuda_ext().moe_combine_bwd(
            grad_out.data_ptr(),
            grad_out.stride(0),
            src.data_ptr(),
            N,
            D,
            src.stride(0),
            _backend.DTYPE_CODES[src.dtype],
            slot_pos.data_ptr(),
            T,
            N // T if T else 1,
            _ptr(weights),
            grad_src.data_ptr(),
            _ptr(grad_weights),
            _stream(src),
        )


experts_fwd = _backend.register("moe.experts_fwd", "cuda")(_composed.experts_fwd(permute, combine))
experts_bwd = _backend.register("moe.experts_bwd", "cuda")(
    _composed.experts_bwd(permute, combine, combine_bwd)
)

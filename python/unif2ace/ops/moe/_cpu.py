"""The "cpu" launchers of the grouped MoE family: the C++ kernels of ``unif2ace._C``
(csrc/cpu/moe.cpp). Contract: the module docstring of _torch.py.

Routing, its backward, the plan, permute, combine and combine backward are C++ kernels; the expert
GEMMs are the composed path (_composed.py: a torch.mm per expert) over these permute / combine
kernels and the C++ activations below.
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops.moe import _composed
from unif2ace.ops.moe.reference import activate

_SCORING_CODES = {"softmax": 0, "sigmoid": 1}


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


@_backend.register("moe.route", "cpu")
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
    _backend.cpu_ext().moe_route_fwd(
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
        _SCORING_CODES[scoring],
        renormalize,
        n_group,
        topk_group,
        float(scaling),
        ids.data_ptr(),
        weights.data_ptr(),
        counts.data_ptr(),
        prob_sums.data_ptr(),
    )


@_backend.register("moe.route_bwd", "cpu")
def route_bwd(
    logits,
    group_offsets,
    group_ids,
    ids,
    grad_weights,
    grad_prob_sums,
    scoring,
    renormalize,
    scaling,
    grad_logits,
):
    T, E = logits.shape
    _backend.cpu_ext().moe_route_bwd(
        logits.data_ptr(),
        T,
        E,
        logits.stride(0),
        _backend.DTYPE_CODES[logits.dtype],
        group_offsets.data_ptr(),
        group_offsets.numel() - 1,
        _ptr(group_ids),
        ids.data_ptr(),
        ids.shape[1],
        _SCORING_CODES[scoring],
        renormalize,
        float(scaling),
        _ptr(grad_weights),
        _ptr(grad_prob_sums),
        grad_logits.data_ptr(),
    )


@_backend.register("moe.plan", "cpu")
def plan(ids, num_experts, block_m, counts, offsets, sorted_slot, slot_pos, tile_expert, tile_row):
    _backend.cpu_ext().moe_plan(
        ids.data_ptr(),
        0 if ids.dtype == torch.int32 else 1,
        ids.numel(),
        num_experts,
        block_m,
        counts.data_ptr(),
        offsets.data_ptr(),
        sorted_slot.data_ptr(),
        slot_pos.data_ptr(),
        _ptr(tile_expert),
        _ptr(tile_row),
        tile_expert.numel(),
    )


@_backend.register("moe.permute", "cpu")
def permute(x, sorted_slot, top_k, xs):
    T, D = x.shape
    _backend.cpu_ext().moe_permute(
        x.data_ptr(),
        T,
        D,
        x.stride(0),
        x.element_size(),
        sorted_slot.data_ptr(),
        sorted_slot.numel(),
        top_k,
        xs.data_ptr(),
    )


@_backend.register("moe.combine", "cpu")
def combine(src, slot_pos, weights, out):
    T, D = out.shape
    _backend.cpu_ext().moe_combine(
        src.data_ptr(),
        src.shape[0],
        D,
        src.stride(0),
        _backend.DTYPE_CODES[src.dtype],
        slot_pos.data_ptr(),
        T,
        slot_pos.numel() // max(T, 1),
        _ptr(weights),
        out.data_ptr(),
    )


@_backend.register("moe.combine_bwd", "cpu")
def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    T, D = grad_out.shape
    _backend.cpu_ext().moe_combine_bwd(
        grad_out.data_ptr(),
        grad_out.stride(0),
        src.data_ptr(),
        src.shape[0],
        D,
        src.stride(0),
        _backend.DTYPE_CODES[src.dtype],
        slot_pos.data_ptr(),
        T,
        slot_pos.numel() // max(T, 1),
        _ptr(weights),
        grad_src.data_ptr(),
        _ptr(grad_weights),
    )


# The activations in one C++ pass each way, the backward fused with the recomputation of a: faster
# than torch's silu + mul and gelu_backward + gelu (docs/results.md), except the erf GELU forward,
# where torch's own is the faster one and stays.
def act_fwd(h, activation):
    if activation == "gelu":  # torch's erf GELU forward is the faster one (above)
        return activate(h, activation)
    N, Fu = h.shape
    Fd = Fu // 2 if activation == "silu_glu" else Fu
    a = h.new_empty(N, Fd)
    ext, code = _backend.cpu_ext(), _backend.DTYPE_CODES[h.dtype]
    if activation == "silu_glu":
        ext.moe_silu_glu_fwd(h.data_ptr(), N, Fd, h.stride(0), code, a.data_ptr())
    else:
        ext.moe_gelu_fwd(
            h.data_ptr(), N, Fd, h.stride(0), activation == "gelu_tanh", code, a.data_ptr()
        )
    return a


def act_bwd(h, da, activation, consume=False):
    """(dh, a); consume=True writes dh over h (the saved pre-activation is used up)."""
    N, Fu = h.shape
    Fd = Fu // 2 if activation == "silu_glu" else Fu
    a = h.new_empty(N, Fd)
    dh = h if consume else torch.empty_like(h)
    ext, code = _backend.cpu_ext(), _backend.DTYPE_CODES[h.dtype]
    if activation == "silu_glu":
        ext.moe_silu_glu_bwd(
            h.data_ptr(), da.data_ptr(), N, Fd, h.stride(0), code, dh.data_ptr(), a.data_ptr()
        )
    else:
        ext.moe_gelu_bwd(
            h.data_ptr(),
            da.data_ptr(),
            N,
            Fd,
            h.stride(0),
            activation == "gelu_tanh",
            code,
            dh.data_ptr(),
            a.data_ptr(),
        )
    return dh, a


experts_fwd = _backend.register("moe.experts_fwd", "cpu")(
    _composed.experts_fwd(permute, combine, act_fwd)
)
experts_bwd = _backend.register("moe.experts_bwd", "cpu")(
    _composed.experts_bwd(permute, combine, combine_bwd, act_bwd)
)

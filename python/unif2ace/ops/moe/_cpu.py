"""The "cpu" launchers of the grouped MoE family: the C++ kernels of ``unif2ace._C``
(csrc/cpu/moe.cpp). Contract: the module docstring of _torch.py.

Routing, its backward, the plan, permute, combine and combine backward are C++ kernels; the expert
GEMMs are the composed path (_composed.py: a torch.mm per expert) over these permute / combine
kernels and the C++ activations below.
"""

from __future__ import annotations

import torch

from unif2ace import _backend
from unif2ace.ops._native import desc
from unif2ace.ops.moe import _composed
from unif2ace.ops.moe.reference import activate

_SCORING_CODES = {"softmax": 0, "sigmoid": 1}


def route_args(logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums):
    """The arguments of ``moe_route_fwd`` (``unif2ace._C`` and, followed by its workspace and
    stream, ``unif2ace._C_cuda``) from the launcher's."""
    return (
        desc(logits),
        desc(group_offsets),
        desc(group_ids),
        desc(bias),
        opts.top_k,
        _SCORING_CODES[opts.scoring],
        bool(opts.renormalize),
        opts.n_group,
        opts.topk_group,
        float(opts.scaling),
        desc(ids),
        desc(weights),
        desc(counts),
        desc(prob_sums),
    )


def plan_args(ids, num_experts, block_m, *outs) -> tuple:
    """The arguments of ``moe_plan`` from the launcher's (``outs`` = counts, offsets, sorted_slot,
    slot_pos, tile_expert, tile_row); the binding reads num_experts from counts."""
    return (desc(ids), block_m, *(desc(t) for t in outs))


@_backend.register("moe.route", "cpu")
def route(*args):
    _backend.cpu_ext().moe_route_fwd(*route_args(*args))


@_backend.register("moe.route_bwd", "cpu")
def route_bwd(
    logits, group_offsets, group_ids, ids, grad_w, grad_ps, scoring, renorm, scaling, out
):
    # (the contract's grad_weights, grad_prob_sums, renormalize, grad_logits)
    tensors = (logits, group_offsets, group_ids, ids)
    grads = (grad_w, grad_ps, out)
    code, scale = _SCORING_CODES[scoring], float(scaling)
    _backend.cpu_ext().moe_route_bwd(*map(desc, tensors), code, renorm, scale, *map(desc, grads))


@_backend.register("moe.plan", "cpu")
def plan(*args):
    _backend.cpu_ext().moe_plan(*plan_args(*args))


@_backend.register("moe.permute", "cpu")
def permute(x, sorted_slot, top_k, xs):
    _backend.cpu_ext().moe_permute(desc(x), desc(sorted_slot), top_k, desc(xs))


@_backend.register("moe.combine", "cpu")
def combine(src, slot_pos, weights, out):
    if out.shape[0] == 0:  # no tokens: nothing to write (the binding cannot infer k from T = 0)
        return
    _backend.cpu_ext().moe_combine(desc(src), desc(slot_pos), desc(weights), desc(out))


@_backend.register("moe.combine_bwd", "cpu")
def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    if grad_out.shape[0] == 0:  # no tokens, no slots: the gradients are empty
        return
    _backend.cpu_ext().moe_combine_bwd(
        desc(grad_out), desc(src), desc(slot_pos), desc(weights), desc(grad_src), desc(grad_weights)
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
    if activation == "silu_glu":
        _backend.cpu_ext().moe_silu_glu_fwd(desc(h), desc(a))
    else:
        _backend.cpu_ext().moe_gelu_fwd(desc(h), activation == "gelu_tanh", desc(a))
    return a


def act_bwd(h, da, activation, consume=False):
    """(dh, a); consume=True writes dh over h (the saved pre-activation is used up)."""
    N, Fu = h.shape
    Fd = Fu // 2 if activation == "silu_glu" else Fu
    a = h.new_empty(N, Fd)
    dh = h if consume else torch.empty_like(h)
    if activation == "silu_glu":
        _backend.cpu_ext().moe_silu_glu_bwd(desc(h), desc(da), desc(dh), desc(a))
    else:
        _backend.cpu_ext().moe_gelu_bwd(
            desc(h), desc(da), activation == "gelu_tanh", desc(dh), desc(a)
        )
    return dh, a


experts_fwd = _backend.register("moe.experts_fwd", "cpu")(
    _composed.experts_fwd(permute, combine, act_fwd)
)
experts_bwd = _backend.register("moe.experts_bwd", "cpu")(
    _composed.experts_bwd(permute, combine, combine_bwd, act_bwd)
)

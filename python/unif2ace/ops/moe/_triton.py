"""The "triton" launchers of the grouped MoE family: the kernels of
``unif2ace.triton_kernels.moe_route`` (routing) and ``unif2ace.triton_kernels.moe`` (dispatch).
Contract: the module docstring of _torch.py.

Routing forward (E <= 256, k <= 8, n_group <= 32; else the torch launcher), permute, combine,
combine backward and the ScatterMoE-style grouped GEMMs (x gathered while loading the A tile,
activation fused into the up projection's epilogue, no xs saved) are Triton kernels; the routing
backward and the plan are the torch launchers, and the backward's GEMMs are the composed path
(_composed.py: torch GEMMs) over the Triton permute / combine.

Every Triton launch runs with its tensors' GPU as the current device (``_launch.on_device`` in the
launch functions of ``triton_kernels/moe.py`` and ``moe_route.py``): Triton launches on the
current device and stream, so a model on ``cuda:1`` would otherwise run its kernels on ``cuda:0``.
"""

from __future__ import annotations

from unif2ace import _backend
from unif2ace.ops.moe import _composed, _torch


def _kernels():
    """unif2ace.triton_kernels.moe, imported on first use: triton is heavy and optional."""
    from unif2ace.triton_kernels import moe

    return moe


@_backend.register("moe.route", "triton")
def route(logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums):
    from unif2ace.triton_kernels import moe_route  # lazy: triton is heavy and optional

    supported = moe_route.route_supported(logits.shape[1], opts.top_k, opts.n_group)
    launch = moe_route.route if supported else _torch.route
    launch(logits, group_offsets, group_ids, bias, opts, ids, weights, counts, prob_sums)


route_bwd = _backend.register("moe.route_bwd", "triton")(_torch.route_bwd)
plan = _backend.register("moe.plan", "triton")(_torch.plan)


@_backend.register("moe.permute", "triton")
def permute(x, sorted_slot, top_k, xs):
    _kernels().permute(x, sorted_slot, top_k, xs)


@_backend.register("moe.combine", "triton")
def combine(src, slot_pos, weights, out):
    _kernels().combine(src, slot_pos, weights, out)


@_backend.register("moe.combine_bwd", "triton")
def combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights):
    _kernels().combine_bwd(grad_out, src, slot_pos, weights, grad_src, grad_weights)


@_backend.register("moe.experts_fwd", "triton")
def experts_fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs):
    _kernels().experts_fwd(x, w_up, w_down, weights, plan, activation, y, h, out, xs)


experts_bwd = _backend.register("moe.experts_bwd", "triton")(
    _composed.experts_bwd(permute, combine, combine_bwd)
)
